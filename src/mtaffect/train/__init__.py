"""Training: Lightning loop over feature stores or images (backbone in the loop), cross-validation,
strategy search, CLI commands.

Entry points: :func:`mtaffect.train.fit.fit` / ``fit_from_root``, :func:`mtaffect.train.config.load_config`,
:func:`mtaffect.train.cv.cross_validate`; training from images lives in :mod:`mtaffect.train.images`.
Nothing is imported here, so the CLI starts without torch or Lightning: Lightning is imported by the
modules a training runs (:mod:`mtaffect.train.trainer`, :mod:`mtaffect.train.module`, ...) when the
training starts.
"""
