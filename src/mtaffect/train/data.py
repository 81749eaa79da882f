"""Training data: feature-store rows joined with their labels, as row batches or temporal windows.

- :func:`join_labels` maps each labelled image to its store row, drops images whose extraction failed
  (``valid=False``, counted) and turns the missing-label codes into values + masks.
- Units are rows, or windows of consecutive annotated frames of one video
  (:func:`mtaffect.data.units.make_windows`, one definition for every path); inputs are read through
  :class:`mtaffect.features.reader.InputSource`.
- :class:`UnitDataset` + :class:`ShardedBatches`: a dataset indexed by a whole batch of units (rows
  or windows) at once, so a batch costs one fancy-index per array instead of per-row Python calls
  and a collate (what makes 142k rows per epoch cheap). Under DDP each rank takes a disjoint share.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mtaffect.data.annotations import LabelTable
from mtaffect.data.units import make_windows
from mtaffect.features.reader import InputSource
from mtaffect.features.store import FeatureStore, MissingImagesError, StoreError
from mtaffect.schema import MISSING_AU, MISSING_EXPR, MISSING_VA


@dataclass
class LabelArrays:
    """Labels aligned with store rows: values (missing filled with 0) and per-task validity masks."""

    images: np.ndarray  # (n,) object
    video: np.ndarray  # (n,) object
    frame: np.ndarray  # (n,) int64
    rows: np.ndarray  # (n,) int64 store row of each image
    va: np.ndarray  # (n, 2) float32
    va_mask: np.ndarray  # (n, 2) bool
    expr: np.ndarray  # (n,) int64
    expr_mask: np.ndarray  # (n,) bool
    au: np.ndarray  # (n, 12) float32
    au_mask: np.ndarray  # (n, 12) bool

    def __len__(self) -> int:
        return len(self.rows)

    def task_rows(self) -> dict[str, int]:
        """Rows with at least one label of each task."""
        return {
            "au": int(self.au_mask.any(1).sum()),
            "expr": int(self.expr_mask.sum()),
            "va": int(self.va_mask.any(1).sum()),
        }

    def take(self, idx: np.ndarray) -> LabelArrays:
        return LabelArrays(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})

    def codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Back to the official codes (valence, arousal, expression, aus) for the metric."""
        va = np.where(self.va_mask, self.va, MISSING_VA)
        return (
            va[:, 0],
            va[:, 1],
            np.where(self.expr_mask, self.expr, MISSING_EXPR),
            np.where(self.au_mask, self.au, MISSING_AU).astype(np.int8),
        )


@dataclass
class JoinReport:
    labelled: int  # rows with any label
    excluded_invalid: int  # rows whose image failed extraction
    used: int


def labelled(labels: LabelTable) -> LabelTable:
    """The rows of ``labels`` with at least one label (the units a training or validation set uses)."""
    keep = np.flatnonzero(labels.any_label_mask)
    return labels.subset(keep) if len(keep) != len(labels) else labels


def label_arrays(table: LabelTable, rows: np.ndarray) -> LabelArrays:
    """``table``'s labels as values (missing filled with 0) + per-task masks, with each image's ``rows``
    (its row in whatever source reads the inputs: a feature store, or an image list)."""
    valence, arousal = table.valence, table.arousal
    va = np.stack([valence, arousal], axis=1).astype(np.float32)
    va_mask = va != MISSING_VA
    expr = table.expression
    au = table.aus
    return LabelArrays(
        images=table.images,
        video=table.frame["video"].to_numpy(dtype=object),
        frame=table.frame["frame"].to_numpy(dtype=np.int64),
        rows=np.asarray(rows, dtype=np.int64),
        va=np.where(va_mask, va, 0).astype(np.float32),
        va_mask=va_mask,
        expr=np.where(expr != MISSING_EXPR, expr, 0).astype(np.int64),
        expr_mask=expr != MISSING_EXPR,
        au=np.where(au != MISSING_AU, au, 0).astype(np.float32),
        au_mask=au != MISSING_AU,
    )


def join_labels(
    store: FeatureStore, labels: LabelTable, what: str = "labels"
) -> tuple[LabelArrays, JoinReport]:
    """Labelled images of ``labels`` -> store rows + label arrays; failed images are excluded and counted."""
    table = labelled(labels)
    try:
        rows = store.rows(table.images)
    except MissingImagesError as exc:
        src = labels.source or what
        raise StoreError(
            f"{len(exc.missing)} image(s) of {src} are not in the feature store {store.path} "
            f"(e.g. {exc.missing[:3]}); extract a store that covers this split"
        ) from exc
    ok = store.valid(rows) if len(rows) else np.zeros(0, dtype=bool)
    arrays = label_arrays(table, rows)
    report = JoinReport(labelled=len(table), excluded_invalid=int((~ok).sum()), used=int(ok.sum()))
    return arrays.take(np.flatnonzero(ok)), report


class UnitDataset(Dataset):
    """Units (rows (U,) or windows (U, T)) over an :class:`InputSource`, indexed by a whole batch of ids."""

    def __init__(
        self, source: InputSource, units: np.ndarray, step_mask: np.ndarray | None = None,
        labels: LabelArrays | None = None, offset: int = 0,
    ) -> None:  # fmt: skip
        self.source = source
        self.offset = offset  # labels index the split; input positions are shifted by ``offset``
        self.units = np.asarray(units, dtype=np.int64)
        self.step_mask = None if step_mask is None else torch.from_numpy(np.asarray(step_mask, dtype=bool))
        self.labels = labels
        if labels is not None:
            self._lab = {
                "va": torch.from_numpy(labels.va),
                "va_mask": torch.from_numpy(labels.va_mask),
                "expr": torch.from_numpy(labels.expr),
                "expr_mask": torch.from_numpy(labels.expr_mask),
                "au": torch.from_numpy(labels.au),
                "au_mask": torch.from_numpy(labels.au_mask),
            }

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, ids: np.ndarray | Sequence[int]) -> dict[str, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        pos = self.units[ids]
        batch = self.source.get(pos + self.offset)
        tpos = torch.from_numpy(pos)
        batch["index"] = tpos
        if self.step_mask is not None:
            batch["step_mask"] = self.step_mask[torch.from_numpy(ids)]
        if self.labels is not None:
            for k, v in self._lab.items():
                batch[k] = v[tpos]
        return batch


class ShardedBatches(Sampler):
    """Batches of unit ids; under DDP each rank gets a disjoint share.

    Training (``pad=True``) uses :class:`torch.utils.data.DistributedSampler` semantics (shuffled by
    seed + epoch, padded so all ranks run the same number of steps). Evaluation (``pad=False``) splits
    ``rank::world`` without padding, so no row is scored twice.
    """

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
        pad: bool = True,
    ) -> None:  # fmt: skip
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.pad = rank, world, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        if self.world > 1 and self.pad:
            ds = DistributedSampler(
                range(self.n), num_replicas=self.world, rank=self.rank, shuffle=self.shuffle, seed=self.seed
            )
            ds.set_epoch(self.epoch)
            return np.fromiter(iter(ds), dtype=np.int64)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[np.ndarray]:
        idx = self.indices()
        for s in range(0, len(idx), self.batch_size):
            yield idx[s : s + self.batch_size]

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world) if self.pad else len(range(self.rank, self.n, self.world))
        return math.ceil(per_rank / self.batch_size)


def loader(dataset: UnitDataset, sampler: ShardedBatches) -> DataLoader:
    """A DataLoader that hands whole batches from the dataset through (no per-row work, no collate)."""
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)


class MTLDataModule(L.LightningDataModule):
    """Train / validation datasets over one store; rows or windows as the model wants.

    Where the inputs come from is three hooks: :meth:`_join` (labels -> label arrays + report),
    :meth:`_make_source` (the reader of the inputs) and :meth:`_loader`; image training
    (:class:`mtaffect.train.images.data.ImageDataModule`) overrides them and shares the rest (units,
    task selection, sharding).
    """

    def __init__(
        self, store: FeatureStore, train: LabelTable, val: LabelTable | None, *, inputs: Sequence[str],
        temporal: bool, batch_size: int = 256, eval_batch_size: int = 4096, window: int = 32,
        stride: int = 16, in_memory: bool | str = "auto", memory_limit_gb: float = 8.0, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.store, self.temporal = store, temporal
        # batch sizes count frames: temporal models get batch_size // window windows per batch
        per_unit = window if temporal else 1
        self.batch_size = max(1, batch_size // per_unit)
        self.eval_batch_size = max(1, eval_batch_size // per_unit)
        self.seed = seed
        self.window, self.stride = window, stride
        self.train_labels, self.train_report = self._join(train, "training labels")
        if val is not None:
            self.val_labels, self.val_report = self._join(val, "validation labels")
        else:
            self.val_labels, self.val_report = None, None
        n_train = len(self.train_labels)
        rows = self.train_labels.rows
        if self.val_labels is not None:
            rows = np.concatenate([rows, self.val_labels.rows])
        self.source = self._make_source(rows, inputs, in_memory, memory_limit_gb)
        self._all_train = self._dataset(self.train_labels, 0, stride)
        self.train_set = self._all_train
        self.val_set = None if self.val_labels is None else self._dataset(self.val_labels, n_train, window)

    def _join(self, labels: LabelTable, what: str) -> tuple[LabelArrays, JoinReport]:
        return join_labels(self.store, labels, what)

    def _make_source(self, rows: np.ndarray, inputs: Sequence[str], in_memory: bool | str,
                     memory_limit_gb: float) -> InputSource:  # fmt: skip
        return InputSource(self.store, rows, inputs, in_memory, memory_limit_gb)

    def _loader(self, dataset: UnitDataset, sampler: ShardedBatches) -> DataLoader:
        return loader(dataset, sampler)

    def _dataset(self, labels: LabelArrays, offset: int, stride: int) -> UnitDataset:
        # Labels are indexed by position within their split; inputs by position in the joint source.
        if self.temporal:
            idx, mask = make_windows(labels.video, labels.frame, self.window, stride)
        else:
            idx, mask = np.arange(len(labels)), None
        return UnitDataset(self.source, idx, mask, labels, offset)

    def set_tasks(self, tasks: Sequence[str]) -> int:
        """Train only on units with a label of ``tasks`` (others give a zero loss); returns their number."""
        lab = self.train_labels
        has = np.zeros(len(lab), dtype=bool)
        if "au" in tasks:
            has |= lab.au_mask.any(1)
        if "expr" in tasks:
            has |= lab.expr_mask
        if "va" in tasks:
            has |= lab.va_mask.any(1)
        full = self._all_train
        units_has = has[full.units]
        keep = units_has if full.step_mask is None else (units_has & full.step_mask.numpy()).any(1)
        if keep.all():
            self.train_set = full
        else:
            mask = None if full.step_mask is None else full.step_mask.numpy()[keep]
            self.train_set = UnitDataset(self.source, full.units[keep], mask, lab, full.offset)
        return len(self.train_set)

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_sampler(self, rank: int = 0, world: int = 1) -> ShardedBatches:
        return ShardedBatches(
            len(self.train_set), self.batch_size, shuffle=True, seed=self.seed, rank=rank, world=world
        )

    def steps_per_epoch(self, world: int = 1) -> int:
        return len(self.train_sampler(0, world))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_sampler(*self._rank_world()))

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []  # type: ignore[return-value]
        rank, world = self._rank_world()
        return self._loader(
            self.val_set,
            ShardedBatches(
                len(self.val_set), self.eval_batch_size, shuffle=False, rank=rank, world=world, pad=False
            ),
        )
