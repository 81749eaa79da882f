"""Reading a feature store's arrays for a fixed list of rows, as tensors ready for a model.

:class:`InputSource` serves the model's input arrays by row: from RAM (loaded once when they fit
``memory_limit_gb``: float32, or float16 when only that fits) or straight from the memory-mapped
store (O(batch) memory). Training, cross-validation and ``predict_store`` all read through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtaffect.features.store import FeatureStore, StoreError


class InputSource:
    """The model's input arrays for a fixed list of store rows, in RAM or read from the store per batch."""

    def __init__(
        self, store: FeatureStore, rows: np.ndarray, inputs: Sequence[str], in_memory: bool | str = "auto",
        memory_limit_gb: float = 8.0,
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
        limit = memory_limit_gb * 2**30
        self.in_memory = self.nbytes(2) <= limit if in_memory == "auto" else bool(in_memory)
        # float32 in RAM when it fits (a batch is then one index_select, no conversion), else float16
        self.dtype = torch.float32 if self.nbytes(4) <= limit else torch.float16
        self._ram: dict[str, torch.Tensor] = {}
        if self.in_memory:
            for name in self.inputs:
                self._ram[name] = self._load(name)

    def nbytes(self, itemsize: int = 2) -> int:
        """Bytes of the selected rows of every input array at ``itemsize`` bytes a value."""
        per_row = sum(int(np.prod(self.store._arrays[name].shape[1:])) for name in self.inputs)
        return itemsize * per_row * len(self.rows)

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        return getattr(self.store, name)(rows)

    def _load(self, name: str, chunk: int = 32768) -> torch.Tensor:
        shape = self.store._arrays[name].shape[1:]
        out = torch.empty((len(self.rows), *shape), dtype=self.dtype)
        order = np.argsort(self.rows, kind="stable")  # sequential disk reads
        for s in range(0, len(order), chunk):
            part = order[s : s + chunk]
            out[torch.from_numpy(part)] = torch.from_numpy(self._read(name, self.rows[part])).to(self.dtype)
        return out

    def get(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """float32 arrays for ``positions`` (indices into ``rows``), any index shape (e.g. (B, T))."""
        flat = torch.from_numpy(np.asarray(positions, dtype=np.int64).reshape(-1))
        out: dict[str, torch.Tensor] = {}
        for name in self.inputs:
            if self.in_memory:  # index_select is several times faster than advanced indexing here
                t = torch.index_select(self._ram[name], 0, flat).float()
            else:
                rows = self.rows[flat.numpy()]
                uniq, inv = np.unique(rows, return_inverse=True)  # sorted reads, each row once
                t = torch.from_numpy(self._read(name, uniq))[torch.from_numpy(inv.reshape(-1))]
            out[name] = t.reshape(*np.shape(positions), *t.shape[1:])
        return out


__all__ = ["InputSource"]
