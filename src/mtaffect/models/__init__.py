"""Multi-task recipes over cached backbone outputs (see :mod:`mtaffect.models.base` for the contract)."""
