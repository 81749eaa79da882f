"""Image training data: the official layout's face crops, decoded in workers, augmented on the device.

:class:`ImageDataModule` is the store path's :class:`~mtaffect.train.data.MTLDataModule` with images as
its source: the same labelled units (rows, or windows of consecutive annotated frames of one video),
the same label masks and task selection, the same rank sharding (each DDP rank decodes only its own
share). What differs:

- the source is an :class:`ImageSource` over ``<root>/cropped_aligned``: each batch is decoded by
  DataLoader workers (``data.workers``) with :mod:`mtaffect.features.decode`, exactly as extraction
  decodes (same size, colour, filter), into one uint8 array (4x less host-to-device traffic than floats);
- after the batch reaches the device (``on_after_batch_transfer``) pixels become [0, 1] floats, training
  batches are augmented (:mod:`mtaffect.train.images.augment`, seeded per batch, one transform per
  window) and everything is normalised with the backbone's mean/std: the model receives ``pixels``;
- named feature stores (``stores``, e.g. features exported from task models: inputs ``features@au``)
  are read beside the pixels, for the same rows (:class:`~mtaffect.features.reader.InputSource`);
- images that are missing when training starts, or that a named store failed to extract, are excluded
  and counted, as a store's failed images are (the report's ``excluded_invalid``); an image that fails
  to decode later (e.g. truncated) is dropped from its batch (for windows: its step is masked), counted
  in :attr:`ImageDataModule.failures` (a run's ``metrics.json``: ``rows.failed_to_decode``) and
  reported in a warning, never silently; an epoch in which not one training (or validation) image
  decodes is an :class:`UnreadableImagesError` before anything of it is saved.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mtaffect.data.annotations import LabelTable
from mtaffect.features.base import normalise, pixels_to_unit
from mtaffect.features.decode import ImageReader
from mtaffect.features.reader import InputSource, StoreSet
from mtaffect.features.store import MissingImagesError, StoreError
from mtaffect.schema import CROPPED_DIR
from mtaffect.train.data import (
    JoinReport,
    LabelArrays,
    MTLDataModule,
    label_arrays,
    labelled,
)
from mtaffect.train.images.augment import Augmenter, batch_seed

#: How many failed images are named one by one before only the count is reported.
_NAMED_FAILURES = 5


class UnreadableImagesError(ValueError):
    """Not one image of a training or validation epoch could be decoded: training on nothing (loss 0) or
    selecting on nothing would pass for a trained model."""


class ImageSource:
    """The model input of image training: uint8 ``pixels`` (positions.shape + (S, S[, 3])) and ``ok``,
    plus the arrays of named stores (``extra``) for the same positions."""

    in_memory = False  # what the store path reports about its source

    def __init__(self, reader: ImageReader, extra: InputSource | None = None) -> None:
        self.reader = reader
        self.extra = extra

    def first_rows(self, positions: np.ndarray) -> np.ndarray:
        """Sort key of units within a batch (the store path's hook): the image list's order, which keeps a
        video's frames together on disk."""
        pos = np.asarray(positions, dtype=np.int64)
        return pos if pos.ndim == 1 else pos[:, 0]

    def get(self, positions: np.ndarray) -> dict:
        pixels, ok, failed = self.reader.read(positions)
        out = {"pixels": torch.from_numpy(pixels), "ok": torch.from_numpy(ok), "failed": failed}
        if self.extra is not None:
            out.update(self.extra.get(positions))
        return out


def _drop_failed(batch: dict, ok: torch.Tensor, training: bool) -> dict:
    """Leave the images that failed to decode out of a batch: rows are removed, window steps masked."""
    if "step_mask" in batch:
        batch["step_mask"] = batch["step_mask"] & ok
        return batch
    keep = ok.nonzero().squeeze(1)
    if keep.numel() == 0 and training:  # BatchNorm cannot train on an empty batch: no label, zero loss
        for key in ("va_mask", "expr_mask", "au_mask"):
            batch[key] = torch.zeros_like(batch[key])
        return batch
    n = ok.shape[0]
    return {k: v[keep] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v for k, v in batch.items()}


class ImageDataModule(MTLDataModule):
    """Units of labelled face crops under ``root`` for a backbone with ``size``/``colour``/``mean``/``std``.

    ``augment`` transforms training batches (``None``: none). Other arguments as
    :class:`~mtaffect.train.data.MTLDataModule` (batch sizes count images: temporal models get
    ``batch_size // window`` windows).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train: LabelTable,
        val: LabelTable | None,
        *,
        size: int,
        colour: str,
        mean: Sequence[float],
        std: Sequence[float],
        temporal: bool,
        augment: Augmenter | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        window: int = 32,
        stride: int = 16,
        window_edge: str = "pad",
        seed: int = 0,
        workers: int | str = "auto",
        pin_memory: bool = False,
        stores: StoreSet | None = None,
        store_inputs: Sequence[str] = (),
        in_memory: bool | str = "auto",
        memory_limit_gb: float = 8.0,
    ) -> None:
        self.folder = Path(root) / CROPPED_DIR
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"{self.folder} not found: training from images reads the face crops of the official layout "
                f"(<root>/{CROPPED_DIR}/<video>/<frame>.jpg)"
            )
        self.size, self.colour = int(size), colour
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.missing: list[str] = []  # images absent when training started (excluded)
        self.failures: dict[str, str] = {}  # images that failed to decode during training (dropped)
        # this epoch's images per phase ("train"/"val"): decoded, read, and the first few failures
        self._epoch_counts: dict[str, list[int]] = {}
        self._epoch_failed: dict[str, list[tuple[str, str]]] = {}
        self._names: list[np.ndarray] = []
        self._batch_no: dict[tuple[int, int], int] = {}
        self.stores, self.store_inputs = stores, tuple(store_inputs)
        if self.store_inputs and stores is None:
            raise ValueError(f"the model reads {list(self.store_inputs)}: give the named stores holding them")
        self._store_rows: list[np.ndarray] = []  # row of each position in the named stores
        super().__init__(
            None,
            train,
            val,
            inputs=("pixels", *self.store_inputs),
            temporal=temporal,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            window=window,
            stride=stride,
            window_edge=window_edge,
            seed=seed,
            workers=workers,
            pin_memory=pin_memory,
            in_memory=in_memory,
            memory_limit_gb=memory_limit_gb,
        )

    # ---- the source hooks of MTLDataModule ------------------------------------------------------------
    def _join(self, labels: LabelTable, what: str) -> tuple[LabelArrays, JoinReport]:
        """Labelled images whose file exists; the others are excluded and counted (like failed extraction)."""
        table = labelled(labels)
        folder = os.fspath(self.folder)
        ok = np.fromiter((os.path.isfile(os.path.join(folder, n)) for n in table.images), bool, len(table))
        missing = [str(n) for n in table.images[~ok]]
        if missing:
            self.missing.extend(missing)
            warnings.warn(
                f"{len(missing)} image(s) of the {what} are missing under {self.folder} and are excluded "
                f"(e.g. {missing[:3]})",
                stacklevel=3,
            )
        store_rows = np.zeros(len(table), dtype=np.int64)
        invalid = 0
        if self.stores is not None and self.store_inputs:
            try:
                store_rows = self.stores.rows(table.images)
            except MissingImagesError as exc:
                raise StoreError(
                    f"{len(exc.missing)} image(s) of the {what} are not in the named stores {self.stores} "
                    f"(e.g. {exc.missing[:3]}); extract the stores over every split the training reads"
                ) from exc
            in_stores = self.stores.valid(store_rows)
            invalid = int((ok & ~in_stores).sum())
            ok &= in_stores
        offset = sum(len(n) for n in self._names)
        kept = np.flatnonzero(ok)
        arrays = label_arrays(table, np.zeros(len(table), dtype=np.int64)).take(kept)
        arrays.rows = offset + np.arange(len(arrays), dtype=np.int64)  # positions in the image list
        self._names.append(arrays.images)
        self._store_rows.append(store_rows[kept])
        report = JoinReport(labelled=len(table), excluded_invalid=len(missing) + invalid, used=len(arrays))
        return arrays, report

    def _make_source(self, keep: np.ndarray | None) -> ImageSource:
        """Every rank lists all positions' names (cheap); it decodes only the batches of its share."""
        names = np.concatenate(self._names) if self._names else np.zeros(0, dtype=object)
        extra = None
        if self.store_inputs and self.stores is not None:
            rows = np.concatenate(self._store_rows)[self.rows]
            extra = InputSource(
                self.stores, rows, self.store_inputs, self.in_memory_option, self.memory_limit_gb, keep=keep
            )
        return ImageSource(ImageReader(self.folder, names[self.rows], self.size, self.colour), extra)

    @property
    def workers(self) -> int:
        """JPEG-decoding DataLoader processes: ``data.workers``, or auto: 2 (fewer on a small CPU share)."""
        if self.workers_option != "auto":
            return int(self.workers_option)
        return max(0, min(2, self.cpus() - 1))

    # ---- on the device -------------------------------------------------------------------------------
    def _seed(self) -> int:
        """The batch's augmentation seed from the stage's seed (``set_stage``: derived from the run seed
        and the stage index), the epoch within the stage, the rank and the batch: a run resumed at an
        epoch draws exactly the transforms an uninterrupted run draws."""
        t = self.trainer
        epoch, rank = (self.epoch_offset + t.current_epoch, t.global_rank) if t is not None else (0, 0)
        key = (self.seed, epoch)
        n = self._batch_no.get(key, 0)
        self._batch_no[key] = n + 1
        return batch_seed(self.seed, epoch, rank, n)

    def _note_failures(self, failed: list[tuple[str, str]]) -> None:
        for name, why in failed:
            if name in self.failures:
                continue
            self.failures[name] = why
            if len(self.failures) <= _NAMED_FAILURES:
                warnings.warn(f"{name}: {why}; left out of its batches", stacklevel=2)

    def prepare_pixels(self, pixels: torch.Tensor, training: bool) -> torch.Tensor:
        """uint8 pixels -> [0, 1] floats -> (training) augmented -> normalised, on their device."""
        x = pixels_to_unit(pixels, self.colour)
        if training and self.augment is not None and not self.augment.identity:
            x = self.augment(x, self._seed())
        return normalise(x, self.mean, self.std)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        t = self.trainer
        return self.device_batch(batch, training=bool(t is not None and t.training))

    def device_batch(self, batch: dict, training: bool) -> dict:
        """A decoded batch, once on its device, as the model reads it: ``pixels`` normalised (and
        augmented when ``training``), images that failed to decode left out."""
        if "pixels" not in batch:
            return batch
        ok = batch.pop("ok")
        failed = batch.pop("failed", [])
        batch["pixels"] = self.prepare_pixels(batch["pixels"], training)
        batch = self.float32_inputs(batch, self.store_inputs)  # named stores' rows
        phase = "train" if training else "val"
        counts = self._epoch_counts.setdefault(phase, [0, 0])
        n = int(ok.numel())
        counts[0] += n if not failed else int(ok.sum())  # ok is all true unless some image failed: no sync
        counts[1] += n
        if failed:
            self._note_failures(failed)
            shown = self._epoch_failed.setdefault(phase, [])
            shown.extend(failed[: max(0, 3 - len(shown))])
            batch = _drop_failed(batch, ok, training)
        return batch

    def start_epoch(self, phase: str) -> None:
        """Forget the counts of ``phase`` ("train" or "val"): a new epoch of it begins."""
        self._epoch_counts.pop(phase, None)
        self._epoch_failed.pop(phase, None)

    def epoch_counts(self, phase: str) -> tuple[int, int]:
        """(images decoded, images read) in this epoch of ``phase`` so far (this rank's)."""
        decoded, read = self._epoch_counts.get(phase, (0, 0))
        return decoded, read

    def unreadable_error(self, phase: str, read: int, epoch: int) -> UnreadableImagesError:
        """The error for an epoch of ``phase`` in which not one of ``read`` images decoded."""
        what = "training" if phase == "train" else "validation"
        shown = "; ".join(f"{name}: {why}" for name, why in self._epoch_failed.get(phase, []))
        return UnreadableImagesError(
            f"{self.folder}: not one of the {read} {what} images read in epoch {epoch} could be decoded "
            f"(e.g. {shown or 'no reason given'}); {'training on' if phase == 'train' else 'selecting on'} "
            "nothing would pass for a trained model: check the files (empty, truncated, not images?)"
        )

    def teardown(self, stage: str) -> None:
        if len(self.failures) > _NAMED_FAILURES:
            warnings.warn(
                f"{len(self.failures)} images failed to decode during training and were left out of their "
                "batches (see ImageDataModule.failures)",
                stacklevel=2,
            )


__all__ = ["ImageDataModule", "ImageSource", "UnreadableImagesError"]
