"""Measuring: ``evaluate`` (a split, the shift suite), ``report`` (what it reports, typed),
``metrics``, ``plots``, ``shifts`` (the label-preserving shift suite), ``shortcuts``, ``audit``
and ``source_audit`` (data audits), ``calibration``."""
