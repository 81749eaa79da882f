"""Training data: feature-store rows joined with their labels, as row batches or temporal windows.

- :func:`join_labels` maps each labelled image to its store row, drops images whose extraction failed
  (``valid=False``, counted) and turns the missing-label codes into values + masks.
- Units are rows, or windows of consecutive annotated frames of one video
  (:func:`mtaffect.data.units.make_windows`, one definition for every path); inputs are read through
  :class:`mtaffect.features.reader.InputSource`.
- :class:`UnitDataset` + :class:`ShardedBatches`: a dataset indexed by a whole batch of units (rows
  or windows) at once, so a batch costs one fancy-index per array instead of per-row Python calls
  and a collate (what makes 142k rows per epoch cheap).
- Under DDP every rank owns a fixed, disjoint share of the training units (:func:`rank_shares`:
  seeded blocks dealt round-robin) and of the validation units (``rank::world``), and loads only
  the rows of its share (:meth:`MTLDataModule.setup`, after the launcher has started the ranks).
  Each epoch shuffles a rank's share; shares are padded (by repeating units) so every rank runs
  the same number of steps.
- Memory-mapped inputs are read in DataLoader worker processes (prefetch) and handed over as the
  store's float16; the module casts them on its device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtaffect.data.annotations import LabelTable
from mtaffect.data.units import make_windows
from mtaffect.features.reader import InputSource, StoreSet
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
    store: FeatureStore | StoreSet, labels: LabelTable, what: str = "labels"
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
        self,
        source: InputSource | None,
        units: np.ndarray,
        step_mask: np.ndarray | None = None,
        labels: LabelArrays | None = None,
        offset: int = 0,
    ) -> None:
        self.source = source  # set (or replaced) when the data module loads this rank's share
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

    def subset(self, keep: np.ndarray) -> UnitDataset:
        """The units where ``keep`` is True (same source, labels and offset)."""
        mask = None if self.step_mask is None else self.step_mask.numpy()[keep]
        return UnitDataset(self.source, self.units[keep], mask, self.labels, self.offset)

    def __getitem__(self, ids: np.ndarray | Sequence[int]) -> dict[str, torch.Tensor]:
        if self.source is None:
            raise RuntimeError("the data module has not loaded its inputs yet (call setup())")
        ids = np.asarray(ids, dtype=np.int64)
        if not self.source.in_memory:  # the order inside a batch is free: read the store in row order
            ids = ids[np.argsort(self.source.first_rows(self.units[ids] + self.offset), kind="stable")]
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


def rank_shares(n: int, world: int, seed: int = 0, block: int = 1) -> np.ndarray:
    """Owner rank (0..world-1) of each of ``n`` units: fixed for the run, so a rank loads only its rows.

    Units are cut into blocks of ``block`` consecutive units (windows of one video overlap, so a block
    keeps most shared rows on one rank); the blocks are shuffled with ``seed`` and dealt round-robin.
    """
    if world <= 1:
        return np.zeros(n, dtype=np.int64)
    blocks = math.ceil(n / block)
    order = np.random.default_rng(seed).permutation(blocks)
    owner_of_block = np.empty(blocks, dtype=np.int64)
    owner_of_block[order] = np.arange(blocks) % world
    return np.repeat(owner_of_block, block)[:n]


class ShardedBatches(Sampler):
    """Batches of unit ids from one rank's share.

    Training (``shuffle=True``): the share is shuffled by ``seed`` and the epoch (``epoch_offset`` +
    the epoch Lightning sets, so a resumed run draws the same order) and padded to ``length`` by
    repeating its own units, so all ranks run the same number of steps. Evaluation: the share in order.
    """

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        length: int | None = None,
        epoch_offset: int = 0,
    ) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.length = len(self.ids) if length is None else int(length)
        self.epoch_offset = epoch_offset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        idx = self.ids
        if self.shuffle and len(idx):
            g = torch.Generator().manual_seed(self.seed + self.epoch_offset + self.epoch)
            idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        if self.length > len(idx) and len(idx):
            idx = np.resize(idx, self.length)  # repeats from the start, as DistributedSampler pads
        return idx

    def __iter__(self) -> Iterator[np.ndarray]:
        idx = self.indices()
        for s in range(0, len(idx), self.batch_size):
            yield idx[s : s + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(self.length / self.batch_size)


def cpus_per_process(local_world: int = 1) -> int:
    """CPUs this process may use when ``local_world`` processes share the node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_world))


def loader(
    dataset: UnitDataset,
    sampler: ShardedBatches,
    *,
    workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader that hands whole batches from the dataset through (no per-row work, no collate).

    With ``workers`` > 0 the batches are read in worker processes and prefetched. Its own generator
    keeps the global RNG (dropout) untouched by the loader, so a resumed run draws the same numbers.
    """
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


class MTLDataModule(L.LightningDataModule):
    """Train / validation datasets over one store; rows or windows as the model wants.

    Labels are joined at construction (cheap); the inputs are loaded by :meth:`setup` (Lightning calls
    it in every rank once the processes exist), for this rank's share only. :meth:`set_stage`
    chooses the units, batch size, seed and first epoch of the stage about to train.

    Where the inputs come from is three hooks: :meth:`_join` (labels -> label arrays + report),
    :meth:`_make_source` (the reader of the inputs, for the positions a rank reads) and
    :attr:`workers` (DataLoader processes); image training
    (:class:`mtaffect.train.images.data.ImageDataModule`) overrides them and shares the rest (units,
    task selection, rank shares, stages).
    """

    def __init__(
        self,
        store: FeatureStore | StoreSet | None,
        train: LabelTable,
        val: LabelTable | None,
        *,
        inputs: Sequence[str],
        temporal: bool,
        batch_size: int = 256,
        eval_batch_size: int = 4096,
        window: int = 32,
        stride: int = 16,
        window_edge: str = "pad",
        in_memory: bool | str = "auto",
        memory_limit_gb: float = 8.0,
        seed: int = 0,
        workers: int | str = "auto",
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.store, self.temporal, self.inputs = store, temporal, tuple(inputs)
        # batch sizes count frames: temporal models get batch_size // window windows per batch
        self.per_unit = window if temporal else 1
        self.batch_size = max(1, batch_size // self.per_unit)
        self.eval_batch_size = max(1, eval_batch_size // self.per_unit)
        self.seed, self.epoch_offset = seed, 0
        self.run_seed = seed  # fixes the rank shares; ``seed`` (shuffling) changes per stage
        self.window, self.stride, self.window_edge = window, stride, window_edge
        self.in_memory_option, self.memory_limit_gb = in_memory, memory_limit_gb
        self.workers_option, self.pin_memory = workers, pin_memory
        self.train_labels, self.train_report = self._join(train, "training labels")
        self.val_labels: LabelArrays | None
        self.val_report: JoinReport | None
        if val is not None:
            self.val_labels, self.val_report = self._join(val, "validation labels")
        else:
            self.val_labels, self.val_report = None, None
        self.n_train = len(self.train_labels)
        rows = self.train_labels.rows
        if self.val_labels is not None:
            rows = np.concatenate([rows, self.val_labels.rows])
        self.rows = rows  # store row of every input position (training rows first, then validation)
        self.source: Any = None
        self.loaded_for: tuple[int, int] | None = None
        self._all_train = self._dataset(self.train_labels, 0, stride)
        self.train_set = self._all_train
        self._keep = np.ones(len(self._all_train), dtype=bool)  # units of the current stage
        self.val_set = (
            None if self.val_labels is None else self._dataset(self.val_labels, self.n_train, window)
        )
        self.block = max(1, window // max(1, stride)) * 8 if temporal else 1

    def _dataset(self, labels: LabelArrays, offset: int, stride: int) -> UnitDataset:
        # Labels are indexed by position within their split; inputs by position in the joint source.
        if self.temporal:
            idx, mask = make_windows(labels.video, labels.frame, self.window, stride, self.window_edge)
        else:
            idx, mask = np.arange(len(labels)), None
        return UnitDataset(self.source, idx, mask, labels, offset)

    # ---- stages --------------------------------------------------------------------------------------
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
        self._keep = keep
        self.train_set = full if keep.all() else full.subset(keep)
        return len(self.train_set)

    def set_stage(
        self,
        tasks: Sequence[str],
        *,
        batch_size: int | None = None,
        seed: int | None = None,
        epoch_offset: int = 0,
    ) -> int:
        """Units, batch size (frames), shuffling seed and first epoch of the stage about to train."""
        if batch_size is not None:
            self.batch_size = max(1, batch_size // self.per_unit)
        if seed is not None:
            self.seed = seed
        self.epoch_offset = epoch_offset
        return self.set_tasks(tasks)

    # ---- this rank's share -----------------------------------------------------------------------------
    def owners(self, world: int) -> np.ndarray:
        """Owner rank of every training unit (fixed for the run: depends on the run's seed only)."""
        return rank_shares(len(self._all_train), world, self.run_seed, self.block)

    def train_ids(self, rank: int, world: int) -> tuple[np.ndarray, int]:
        """This rank's ids into ``train_set`` and the padded length every rank runs."""
        owner = self.owners(world)[self._keep]
        counts = np.bincount(owner, minlength=world)
        return np.flatnonzero(owner == rank), int(counts.max()) if len(owner) else 0

    def val_ids(self, rank: int, world: int) -> np.ndarray:
        return (
            np.arange(rank, len(self.val_set), world) if self.val_set is not None else np.zeros(0, np.int64)
        )

    def positions(self, rank: int, world: int) -> np.ndarray:
        """Input positions ``rank`` reads over the whole run: its training units of every stage and its
        validation units (a window's padding repeats one of its own positions)."""
        parts = [self._all_train.units[self.owners(world) == rank].reshape(-1)]
        if self.val_set is not None:
            parts.append(self.val_set.units[self.val_ids(rank, world)].reshape(-1) + self.n_train)
        return np.unique(np.concatenate(parts))

    def load(self, rank: int = 0, world: int = 1) -> Any:
        """Load (once) the inputs of ``rank``'s share; every dataset reads through the new source."""
        if self.source is not None and self.loaded_for == (rank, world):
            return self.source
        keep = None if world == 1 else self.positions(rank, world)
        self.source = self._make_source(keep)
        self.loaded_for = (rank, world)
        for ds in (self._all_train, self.train_set, self.val_set):
            if ds is not None:
                ds.source = self.source
        return self.source

    # ---- where the inputs come from (image training overrides these) ---------------------------------
    def _join(self, labels: LabelTable, what: str) -> tuple[LabelArrays, JoinReport]:
        assert self.store is not None  # None only for subclasses that read no store (they override this)
        return join_labels(self.store, labels, what)

    def _make_source(self, keep: np.ndarray | None) -> Any:
        """The reader of the inputs at every position of ``self.rows`` (only ``keep`` loaded into RAM)."""
        assert self.store is not None  # None only for subclasses that read no store (they override this)
        return InputSource(
            self.store, self.rows, self.inputs, self.in_memory_option, self.memory_limit_gb, keep=keep
        )

    def setup(self, stage: str | None = None) -> None:
        self.load(*self._rank_world())

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict:
        return self.float32_inputs(batch, self.inputs)

    @staticmethod
    def float32_inputs(batch: dict[str, torch.Tensor], keys: Sequence[str]) -> dict:
        """Store arrays (float16) among ``keys`` become float32 here, on the device (the host never copies
        them to float32)."""
        for key in keys:
            t = batch.get(key)
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                batch[key] = t.float()
        return batch

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    @property
    def workers(self) -> int:
        """DataLoader processes reading batches: ``data.workers``, or auto (none for rows in RAM: an
        index_select per batch leaves nothing to overlap; else up to 4, half this process's CPUs)."""
        if self.workers_option != "auto":
            return int(self.workers_option)
        if self.source is None or self.source.in_memory:
            return 0
        return min(4, max(1, self.cpus() // 2))

    def cpus(self) -> int:
        """CPUs this process may use (the node's divided by the processes on it)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        local = max(1, world // max(1, getattr(self.trainer, "num_nodes", 1) or 1))
        return cpus_per_process(local)

    # ---- loaders ---------------------------------------------------------------------------------------
    def train_sampler(self, rank: int = 0, world: int = 1) -> ShardedBatches:
        ids, length = self.train_ids(rank, world)
        return ShardedBatches(
            ids, self.batch_size, shuffle=True, seed=self.seed, length=length, epoch_offset=self.epoch_offset
        )

    def steps_per_epoch(self, world: int = 1) -> int:
        return len(self.train_sampler(0, world))

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        self.load(rank, world)
        return loader(
            self.train_set,
            self.train_sampler(rank, world),
            workers=self.workers,
            pin_memory=self.pin_memory,
            seed=self.seed,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.val_set is None:
            return []  # no validation loader (Lightning then skips validation)
        rank, world = self._rank_world()
        self.load(rank, world)
        sampler = ShardedBatches(self.val_ids(rank, world), self.eval_batch_size, shuffle=False)
        return loader(self.val_set, sampler, workers=self.workers, pin_memory=self.pin_memory)
