"""One place that turns a config and its inputs into what :func:`mtaffect.train.fit.fit` trains.

A recipe over a feature store (:class:`~mtaffect.train.data.MTLDataModule`, named stores beside it
as a :class:`~mtaffect.features.reader.StoreSet`), or, for a config with a ``backbone:`` section, the
backbone in the loop over a dataset's images (:func:`mtaffect.train.images.build.build_image_training`).
Both return a :class:`~mtaffect.train.training.Training`; the loop is the same for both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtaffect.data.annotations import LabelTable
from mtaffect.features.reader import StoreSet
from mtaffect.features.store import FeatureStore
from mtaffect.models.checkpoint import load_weights
from mtaffect.train.config import TrainConfig
from mtaffect.train.data import MTLDataModule
from mtaffect.train.images.build import build_image_training
from mtaffect.train.run import input_store_records, save_model
from mtaffect.train.training import Training, build_model, on_gpu


def pipeline_root(data: FeatureStore | str | os.PathLike) -> Path:
    """The dataset root a pipeline config trains from (it exports its own stores: an open
    :class:`FeatureStore` is a TypeError, as ``Path`` of one always was)."""
    if isinstance(data, FeatureStore):
        raise TypeError(f"a pipeline trains from a dataset root (a folder), not a FeatureStore ({data.path})")
    return Path(data)


def open_training_data(config: TrainConfig, data: Any, stores: Any = None) -> Any:
    """The data a config trains on: a :class:`FeatureStore` (opened once), or for a config with a
    ``backbone:`` section the dataset root (its images are read while training).

    ``stores`` (``{name: store}``, or a :class:`StoreSet`) adds named stores (inputs ``features@<name>``):
    the store path then reads a :class:`StoreSet` with ``data`` as its main store; image training reads
    them beside the images (:func:`named_stores`).
    """
    if config.from_images:
        if isinstance(data, FeatureStore | StoreSet):
            raise ValueError(
                f"{config.source or 'the config'} trains from images (it has a backbone section): give the "
                "dataset root, not a feature store"
            )
        return Path(data)
    if isinstance(data, StoreSet):
        return data
    main = data if isinstance(data, FeatureStore) else FeatureStore.open(data)
    named = named_stores(stores)
    return StoreSet({"": main, **named.stores}) if named is not None else main


def named_stores(stores: Any) -> StoreSet | None:
    """``{name: store or path}`` (or a :class:`StoreSet`) as a set of named stores; None for none."""
    if not stores:
        return None
    found = stores if isinstance(stores, StoreSet) else StoreSet.open(dict(stores))
    if "" in found.stores:
        raise ValueError("named stores need a name each (au=STORE); the main store is given on its own")
    return found


def build_training(
    config: TrainConfig,
    data: Any,
    train: LabelTable,
    val: LabelTable | None,
    *,
    trust_remote_code: bool = False,
    stores: Any = None,
) -> Training:
    """The model and data module of ``config`` over ``data``, store path and image path alike.

    Args:
        config: the run's config (a ``backbone:`` section selects the image path).
        data: a feature store (path, :class:`FeatureStore` or :class:`StoreSet`), or a dataset root.
        train: the training labels.
        val: the validation labels (None: no validation).
        trust_remote_code: a person's flag, never a config's: lets an ``hf:`` backbone in the loop run
            the code its repository ships.
        stores: named stores (see :func:`open_training_data`).

    Returns:
        The :class:`Training` (model, data module, checkpoint writer and reader).
    """
    data = open_training_data(config, data, stores)
    if config.from_images:
        return build_image_training(
            config, data, train, val, trust_remote_code=trust_remote_code, stores=named_stores(stores)
        )
    model = build_model(config, data, data.input_dims() if isinstance(data, StoreSet) else None)
    dm = MTLDataModule(
        data,
        train,
        val,
        inputs=model.inputs,
        temporal=bool(model.temporal),
        batch_size=config.data.batch_size,
        eval_batch_size=config.data.eval_batch_size,
        window=config.data.window,
        stride=config.data.stride,
        window_edge=config.data.window_edge,
        in_memory=config.data.in_memory,
        memory_limit_gb=config.data.memory_limit_gb,
        seed=config.trainer.seed,
        workers=config.data.workers,
        pin_memory=on_gpu(config),
    )

    record = {"name": data.backbone, "spec": data.spec, "fingerprint": data.fingerprint}
    input_stores = input_store_records(data if isinstance(data, StoreSet) else None, model.inputs)

    def save(path: Path, metrics: dict | None, overwrite: bool) -> Path:
        return save_model(
            path,
            model,
            config,
            metrics,
            backbone=record,
            sizes=data,
            input_stores=input_stores,
            overwrite=overwrite,
        )

    return Training(model=model, datamodule=dm, save=save, weights=load_weights)


__all__ = ["build_training", "named_stores", "open_training_data"]
