"""Training: Lightning loop over feature stores or images (backbone in the loop), cross-validation,
strategy search, CLI commands.

Entry points: :func:`mtaffect.train.fit.fit` / ``fit_from_root``, :func:`mtaffect.train.config.load_config`,
:func:`mtaffect.train.cv.cross_validate`; training from images lives in :mod:`mtaffect.train.images`.
Nothing heavy is imported here so the CLI starts without Lightning; the first ``import lightning``
afterwards skips torchmetrics' optional integrations (:mod:`mtaffect.train.lean_imports`).
"""

from mtaffect.train.lean_imports import install as _install_lean_imports

_install_lean_imports()
