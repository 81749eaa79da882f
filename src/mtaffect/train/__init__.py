"""Training: Lightning loop over feature stores, cross-validation, strategy search, CLI commands."""

from mtaffect.train.config import TrainConfig, load_config
from mtaffect.train.fit import TrainResult, fit, fit_from_root

__all__ = ["TrainConfig", "TrainResult", "fit", "fit_from_root", "load_config"]
