"""Reading a feature store's arrays for a fixed list of rows, as tensors ready for a model.

:class:`InputSource` serves the model's input arrays by position in a list of store rows:

- from RAM, loaded once when they fit ``memory_limit_gb`` (float32, or the store's float16 when only
  that fits), or straight from the memory-mapped store (O(batch) memory);
- memory-mapped batches come out as the store's float16, never copied to float32 on the host: the
  consumer casts on its device (``MTLModule`` after the transfer, ``predict_store`` likewise), which
  halves the bytes read, copied and sent to a GPU;
- ``keep`` restricts what is held to some positions (a DDP rank's share): only those rows are loaded,
  and asking for another position is an error rather than a silent read;
- it pickles as the store's path (DataLoader worker processes reopen the memory maps instead of
  copying them).

:func:`check_valid` is the one rule for images whose extraction failed (their rows are zeros):
an error that counts them and names the first few, unless the caller allows them.
Training, cross-validation and ``predict_store`` all read through this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtaffect.features.store import FeatureStore, StoreError


class FailedImagesError(StoreError):
    """Some requested images failed extraction: predicting them would silently use zero features."""

    def __init__(self, message: str, images: list[str]) -> None:
        super().__init__(message)
        self.images = images


def check_valid(
    store: FeatureStore, rows: np.ndarray, names: Sequence[str], *, allow_missing: bool = False
) -> np.ndarray:
    """Validity (bool per row) of ``rows``; :class:`FailedImagesError` on a failed one unless allowed."""
    ok = store.valid(rows) if len(rows) else np.zeros(0, dtype=bool)
    if not ok.all() and not allow_missing:
        bad = [str(n) for n, good in zip(names, ok, strict=True) if not good]
        raise FailedImagesError(
            f"{len(bad)} of {len(ok)} images failed extraction (missing or unreadable when {store.path} "
            f"was built; see its failed.csv), e.g. {bad[:5]}; their features are zeros. Re-extract them, or "
            "pass --allow-missing (allow_missing=True) to write their rows with valid = 0",
            bad,
        )
    return ok


class InputSource:
    """The model's input arrays for a fixed list of store rows, in RAM or read from the store per batch."""

    def __init__(
        self, store: FeatureStore, rows: np.ndarray, inputs: Sequence[str], in_memory: bool | str = "auto",
        memory_limit_gb: float = 8.0, keep: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.inputs = tuple(inputs)
        for name in self.inputs:
            if name == "logits" and store.num_logits == 0:
                raise StoreError(f"the model reads the backbone's logits but {store.path} holds none")
            if name == "tokens" and not store.has_tokens:
                raise StoreError(
                    f"the model reads patch tokens but {store.path} holds none; extract with --tokens"
                )
        # positions held (a DDP rank's share) and the map position -> index in what is held
        self.keep = None if keep is None else np.unique(np.asarray(keep, dtype=np.int64))
        self._local: np.ndarray | None = None
        if self.keep is not None:
            self._local = np.full(len(self.rows), -1, dtype=np.int64)
            self._local[self.keep] = np.arange(len(self.keep))
        limit = memory_limit_gb * 2**30
        self.in_memory = self.nbytes(2) <= limit if in_memory == "auto" else bool(in_memory)
        # float32 in RAM when it fits (a batch is then one index_select, no conversion), else float16
        self.dtype = torch.float32 if self.in_memory and self.nbytes(4) <= limit else torch.float16
        self._ram: dict[str, torch.Tensor] = {}
        if self.in_memory:
            for name in self.inputs:
                self._ram[name] = self._load(name)

    @property
    def held_rows(self) -> np.ndarray:
        """Store rows this source serves (all of ``rows``, or the ``keep`` share)."""
        return self.rows if self.keep is None else self.rows[self.keep]

    def nbytes(self, itemsize: int = 2) -> int:
        """Bytes of the held rows of every input array at ``itemsize`` bytes a value."""
        per_row = sum(int(np.prod(self.store._arrays[name].shape[1:])) for name in self.inputs)
        return itemsize * per_row * len(self.held_rows)

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The store's float16 values of ``rows`` (sorted rows read sequentially)."""
        return self.store._take(name, rows)

    def _load(self, name: str, chunk: int = 32768) -> torch.Tensor:
        held = self.held_rows
        shape = self.store._arrays[name].shape[1:]
        out = torch.empty((len(held), *shape), dtype=self.dtype)
        order = np.argsort(held, kind="stable")  # sequential disk reads
        for s in range(0, len(order), chunk):
            part = order[s : s + chunk]
            out[torch.from_numpy(part)] = torch.from_numpy(self._read(name, held[part])).to(self.dtype)
        return out

    def _held_index(self, flat: np.ndarray) -> np.ndarray:
        if self._local is None:
            return flat
        local = self._local[flat]
        if (local < 0).any():
            raise IndexError(
                f"position {int(flat[np.argmax(local < 0)])} is not in this source's share of the rows"
            )
        return local

    def get(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Arrays for ``positions`` (indices into ``rows``), any index shape (e.g. (B, T)).

        RAM: the held dtype (float32 when it fitted). Memory-mapped: the store's float16; read each
        distinct row once, in row order (callers that sort a batch by row skip the final gather).
        """
        flat = np.asarray(positions, dtype=np.int64).reshape(-1)
        out: dict[str, torch.Tensor] = {}
        if self.in_memory:
            idx = torch.from_numpy(self._held_index(flat))
            for name in self.inputs:  # index_select is several times faster than advanced indexing here
                t = torch.index_select(self._ram[name], 0, idx)
                out[name] = t.reshape(*np.shape(positions), *t.shape[1:])
            return out
        self._held_index(flat)  # a share is a share on disk too
        rows = self.rows[flat]
        uniq, inv = np.unique(rows, return_inverse=True)
        direct = len(uniq) == len(rows) and bool((np.diff(rows) > 0).all())
        for name in self.inputs:
            t = torch.from_numpy(self._read(name, uniq))  # numpy's gather: faster than into a preset buffer
            if not direct:
                t = t[torch.from_numpy(inv.reshape(-1))]
            out[name] = t.reshape(*np.shape(positions), *t.shape[1:])
        return out

    def first_rows(self, positions: np.ndarray) -> np.ndarray:
        """Store row of each unit's first position (units (U,) or (U, T)): the key that sorts reads."""
        pos = np.asarray(positions, dtype=np.int64)
        return self.rows[pos if pos.ndim == 1 else pos[:, 0]]

    # worker processes reopen the store instead of receiving a copy of its memory maps
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["store"] = str(self.store.path)
        return state

    def __setstate__(self, state: dict) -> None:
        state["store"] = FeatureStore.open(state["store"])
        self.__dict__.update(state)


__all__ = ["FailedImagesError", "InputSource", "check_valid"]
