"""Training: ``fit(config)`` in ``fit``, the loops in ``engine``, settings in ``config``,
torchrun support in ``distributed``."""
