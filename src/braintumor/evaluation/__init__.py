"""Measuring: ``evaluate`` (a split, the shift suite), ``metrics``, ``plots``, ``shifts`` (the
label-preserving shift suite), ``shortcuts`` and ``audit`` (data audits), ``calibration``."""
