"""Multi-task recipes over cached backbone outputs (see :mod:`mtaffect.models.base` for the contract),
and every model a user can name (:mod:`mtaffect.models.loading`)."""
