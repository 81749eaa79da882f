"""What the training loop trains, whichever path built it: :class:`Training` (model, data module,
checkpoint writer and reader), the recipe a config names (:func:`build_model`) and whether the run is
on a GPU. The store path (:mod:`mtaffect.train.build`) and the image path
(:mod:`mtaffect.train.images.build`) both build on this module, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtaffect.models.base import MTLModel
from mtaffect.train.config import TrainConfig


@dataclass
class Training:
    """What :func:`fit` trains: the model, its data module, and how its checkpoints are written and read.

    ``weights(folder)`` is the full state dict of ``model`` saved in a checkpoint folder (a fine-tuned
    backbone's weights included).
    """

    model: MTLModel
    datamodule: Any  # MTLDataModule (or a subclass)
    save: Callable[[Path, dict | None, bool], Path]  # (folder, metrics, overwrite) -> checkpoint folder
    weights: Callable[[Path], dict[str, torch.Tensor]]


def build_model(config: TrainConfig, store: Any, input_dims: dict[str, int] | None = None) -> MTLModel:
    """``create_model(recipe, feature_dim, num_logits, token_shape, **hparams)`` with a clear error.

    ``store`` is anything with those three sizes: a :class:`FeatureStore` or a backbone's spec.
    ``input_dims`` (``{"features@au": 768, ...}``, from named stores) go to recipes that fuse them.
    """
    from mtaffect.models.registry import create_model

    where = config.source or "the config"
    extra = {"input_dims": dict(input_dims)} if input_dims else {}
    try:
        model = create_model(
            config.model.recipe,
            feature_dim=store.feature_dim,
            num_logits=store.num_logits,
            token_shape=store.token_shape,
            **config.model.hparams,
            **extra,
        )
    except TypeError as exc:
        if extra and "input_dims" in str(exc):
            raise ValueError(
                f"{where}: recipe {config.model.recipe!r} reads no named feature stores; drop the "
                f"--features NAME=STORE options ({sorted(input_dims or {})})"
            ) from exc
        raise ValueError(f"{where}: model.hparams do not fit recipe {config.model.recipe!r}: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # e.g. a size torch cannot allocate
        raise ValueError(f"{where}: model.hparams do not fit recipe {config.model.recipe!r}: {exc}") from exc
    model.group_settings = dict(config.optim.groups)
    return model


def on_gpu(config: TrainConfig) -> bool:
    """Whether the run trains on CUDA (mixed precision applies; pinned host memory speeds up the copies)."""
    acc = config.trainer.accelerator
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


__all__ = ["Training", "build_model", "on_gpu"]
