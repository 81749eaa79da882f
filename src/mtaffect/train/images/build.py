"""From a config with a ``backbone:`` section to what :func:`mtaffect.train.fit.fit` trains (called by
:func:`mtaffect.train.build.build_training`).

:func:`build_image_training` builds the backbone (``create_backbone(name, **kwargs)``), the recipe on
its output sizes (the head), the :class:`~mtaffect.models.image_model.ImageMTLModel` around both, the
:class:`~mtaffect.train.images.data.ImageDataModule` and the checkpoint writer/reader. Checkpoints
have the store path's format: the head's weights, the backbone's name and (data-only) kwargs, and for
a fine-tuned backbone its weights in ``backbone/``. A frozen model's checkpoint is interchangeable with
one trained on a store of the same backbone (same fingerprint): it predicts from that store too.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from mtaffect.data.annotations import LabelTable
from mtaffect.features.base import Backbone
from mtaffect.features.reader import StoreSet
from mtaffect.models.checkpoint import load_mtl_model
from mtaffect.models.image_model import ImageMTLModel
from mtaffect.models.trained import TrainedAffectModel
from mtaffect.train.config import TrainConfig
from mtaffect.train.images.augment import Augmenter
from mtaffect.train.images.data import ImageDataModule
from mtaffect.train.run import input_store_records, save_model
from mtaffect.train.training import Training, build_model, on_gpu


def build_backbone(config: TrainConfig, trust_remote_code: bool = False) -> Backbone:
    """``create_backbone(backbone.name, **backbone.factory_kwargs())`` with a clear error
    (``trust_remote_code``: the person's flag, added by :func:`~mtaffect.features.registry.with_trust`)."""
    from mtaffect.features.registry import create_backbone, with_trust

    b = config.backbone
    kwargs = with_trust(b.name, b.factory_kwargs(), trust_remote_code)
    where = config.source or "the config"
    try:
        return create_backbone(b.name, **kwargs)
    except ValueError as exc:  # unknown or ill-typed options (the registry's message): name the config
        raise ValueError(f"{where}: {exc}") from exc


def build_image_training(
    config: TrainConfig,
    root: str | os.PathLike,
    train: LabelTable,
    val: LabelTable | None,
    *,
    trust_remote_code: bool = False,
    stores: StoreSet | None = None,
) -> Training:
    """Backbone in the loop + recipe + image data module + checkpoint I/O for ``config``.

    ``stores``: named feature stores read beside the images (a recipe's ``features@<name>`` inputs,
    e.g. the features exported from recipe 3's task models).
    """
    b = config.backbone
    backbone = build_backbone(config, trust_remote_code)
    spec = backbone.spec
    # a BackboneSpec has the store's feature_dim/num_logits/token_shape
    head = build_model(config, spec, stores.input_dims() if stores is not None else None)
    store_inputs = tuple(i for i in head.inputs if "@" in i)
    model = ImageMTLModel(
        backbone,
        head,
        mode=b.mode,
        frozen_blocks=b.frozen_blocks,
        lr=b.lr,
        weight_decay=b.weight_decay,
        layer_decay=b.layer_decay,
        train_stages=b.train_stages,
        grad_checkpointing=b.grad_checkpointing,
    )
    d = config.data
    if d.eval_batch_size > 4 * max(d.batch_size, 64):
        warnings.warn(
            f"data.eval_batch_size={d.eval_batch_size}: with a backbone in the loop each validation batch is "
            "decoded and run through the backbone at once; set it near data.batch_size",
            stacklevel=2,
        )
    augment = Augmenter.from_config(
        config.augment.preset, config.augment.ops, spec.input_size, len(spec.mean), config.augment.per_frame
    )
    dm = ImageDataModule(
        root,
        train,
        val,
        size=spec.input_size,
        colour=spec.colour,
        mean=spec.mean,
        std=spec.std,
        temporal=bool(head.temporal),
        augment=augment,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        window=d.window,
        stride=d.stride,
        window_edge=d.window_edge,
        seed=config.trainer.seed,
        workers=d.workers,
        pin_memory=on_gpu(config),
        stores=stores,
        store_inputs=store_inputs,
        in_memory=d.in_memory,
        memory_limit_gb=d.memory_limit_gb,
    )
    record = {
        "name": b.name,
        "kwargs": b.factory_kwargs(),
        "spec": asdict(spec),
        "fingerprint": spec.fingerprint(),
        "mode": b.mode,
    }
    finetune = b.mode == "finetune"
    input_stores = input_store_records(stores, store_inputs)

    def save(path: Path, metrics: dict | None, overwrite: bool) -> Path:
        return save_model(
            path,
            head,
            config,
            metrics,
            backbone=record,
            sizes=spec,
            input_stores=input_stores,
            backbone_weights=backbone if finetune else None,
            overwrite=overwrite,
        )

    def weights(path: Path) -> dict[str, torch.Tensor]:
        """The model's full state dict in a checkpoint: the head, and the stage's fine-tuned backbone
        (made trainable as the live one is) or, for a frozen one, the live backbone's own weights."""
        saved, cfg = load_mtl_model(path)
        state = {f"head.{k}": v for k, v in saved.state_dict().items()}
        if finetune:
            done = TrainedAffectModel(saved, cfg, path=path).create_backbone()
            done.prepare_finetune()
            bb_state = done.state_dict()
        else:
            bb_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        state.update({f"backbone.{k}": v for k, v in bb_state.items()})
        return state

    return Training(model=model, datamodule=dm, save=save, weights=weights)


def image_affect_model(model: ImageMTLModel, config: TrainConfig) -> TrainedAffectModel:
    """A trained image model in memory as a :class:`TrainedAffectModel` (e.g. to predict test images)."""
    spec = model.backbone.spec
    info = {
        "backbone": {
            "name": config.backbone.name,
            "kwargs": config.backbone.factory_kwargs(),
            "fingerprint": spec.fingerprint() if model.mode == "frozen" else None,
        },
        "temporal": bool(model.head.temporal),
        "window": config.data.window,
        "window_edge": config.data.window_edge,
        "inputs": list(model.head.inputs),
    }
    return TrainedAffectModel(model.head, info, backbone_module=model.backbone)


__all__ = ["build_backbone", "build_image_training", "image_affect_model"]
