"""Reading a feature store's arrays for a fixed list of rows, as tensors ready for a model.

:class:`InputSource` serves the model's input arrays by position in a list of store rows:

- from RAM, loaded once when they fit ``memory_limit_gb`` (float32, or the store's float16 when only
  that fits), or straight from the memory-mapped store (O(batch) memory);
- memory-mapped batches come out as the store's float16, never copied to float32 on the host: the
  consumer casts on its device (``MTLModule`` after the transfer, ``predict_store`` likewise), which
  halves the bytes read, copied and sent to a GPU;
- ``keep`` restricts what is held to some positions (a DDP rank's share): only those rows are loaded,
  and asking for another position is an error rather than a silent read;
- it pickles as the stores' paths (DataLoader worker processes reopen the memory maps instead of
  copying them).

Several stores, one image list: a :class:`StoreSet` names stores (``""`` the main one, e.g. ``au``,
``expr``, ``va`` for features exported from task models) whose image lists are identical, so one row
index reads every store. A model input ``features@au`` is the ``features`` array of the store named
``au`` (:func:`split_input`); ``features`` alone is the main store's. An image is valid when it is
valid in every store.

:func:`check_valid` is the one rule for images whose extraction failed (their rows are zeros):
an error that counts them and names the first few, unless the caller allows them.
Training, cross-validation and ``predict_store`` all read through this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtaffect.features.store import FeatureStore, StoreError, images_digest

#: Arrays of a store that a model may read.
STORE_ARRAYS: tuple[str, ...] = ("features", "logits", "tokens")


def split_input(name: str) -> tuple[str, str]:
    """A model input's array and store: ``"features@au"`` -> ``("features", "au")``, ``"features"`` ->
    ``("features", "")`` (the main store)."""
    array, sep, key = str(name).partition("@")
    if array not in STORE_ARRAYS or (sep and not key.isidentifier()):
        raise ValueError(
            f"model input {name!r} must be one of {', '.join(STORE_ARRAYS)}, optionally @<store name> "
            "(e.g. features@au: the features of the store named au)"
        )
    return array, key


def store_names(inputs: Iterable[str]) -> tuple[str, ...]:
    """The named stores some model inputs read: ``("features", "features@au", "logits@au")`` ->
    ``("au",)`` (each once, in order of first use; inputs without ``@`` are skipped unchecked)."""
    return tuple(dict.fromkeys(split_input(i)[1] for i in inputs if "@" in str(i)))


def store_images_sha256(store: FeatureStore) -> str:
    """What identifies a store's image list (recorded at extraction; computed for older stores)."""
    return store.meta.get("images_sha256") or images_digest(list(store.images))


class StoreSet:
    """Named feature stores with the same image list: ``""`` is the main store (plain ``features``,
    ``logits``, ``tokens``), any other name serves ``<array>@<name>`` inputs.

    The image lists must be identical (same names, same order), so a row index means the same image in
    every store; :meth:`open` refuses anything else, naming both stores. Where a main store is needed
    (a recipe's ``feature_dim``, the checkpoint's backbone) the main store answers.
    """

    def __init__(self, stores: Mapping[str, FeatureStore]) -> None:
        if not stores:
            raise ValueError("a store set needs at least one store")
        for key in stores:
            if key != "" and not str(key).isidentifier():
                raise ValueError(f"store name {key!r} must be a plain name such as au, expr or va")
        self.stores: dict[str, FeatureStore] = dict(stores)
        ref_key, ref = next(iter(self.stores.items()))
        ref_sha = store_images_sha256(ref)
        for key, st in self.stores.items():
            if st is not ref and store_images_sha256(st) != ref_sha:
                raise StoreError(
                    f"stores {_label(ref_key)} ({ref.path}, {len(ref)} images) and {_label(key)} ({st.path}, "
                    f"{len(st)} images) list different images; stores read together must be extracted over "
                    "the same image list (same splits, same dataset)"
                )
        self.reference = ref

    @classmethod
    def open(cls, stores: Mapping[str, str | os.PathLike | FeatureStore]) -> StoreSet:
        return cls({k: v if isinstance(v, FeatureStore) else FeatureStore.open(v) for k, v in stores.items()})

    @classmethod
    def of(cls, store: FeatureStore | StoreSet) -> StoreSet:
        return store if isinstance(store, StoreSet) else cls({"": store})

    def __iter__(self) -> Iterator[str]:
        return iter(self.stores)

    def __len__(self) -> int:
        return len(self.reference)

    def __repr__(self) -> str:
        return "StoreSet(" + ", ".join(f"{_label(k)}={str(s.path)!r}" for k, s in self.stores.items()) + ")"

    @property
    def named(self) -> dict[str, FeatureStore]:
        """The stores other than the main one, by name."""
        return {k: s for k, s in self.stores.items() if k}

    @property
    def main(self) -> FeatureStore:
        if "" not in self.stores:
            raise StoreError(
                f"no main feature store among {sorted(self.stores)}: pass one with --features STORE"
            )
        return self.stores[""]

    # the main store's description (what build_model and the checkpoint read)
    def __getattr__(self, name: str) -> Any:
        if name in (
            "path",
            "images",
            "meta",
            "spec",
            "backbone",
            "fingerprint",
            "feature_dim",
            "num_logits",
            "has_tokens",
            "token_shape",
            "num_failed",
            "check_compatible",
            "failures",
        ):
            owner = self.reference if name in ("path", "images") else self.main
            return getattr(owner, name)
        raise AttributeError(name)

    def store_of(self, input_name: str) -> tuple[FeatureStore, str]:
        """The store and array an input name reads; a clear error when that store is not in the set."""
        array, key = split_input(input_name)
        if key not in self.stores:
            given = ", ".join(_label(k) for k in self.stores)
            hint = f"--features {key}=STORE" if key else "--features STORE"
            raise StoreError(
                f"the model reads {input_name!r} but no store named {_label(key)} was given "
                f"(given: {given}); pass {hint}"
            )
        return self.stores[key], array

    def input_dims(self) -> dict[str, int]:
        """``{"features@<name>": feature dim}`` of every named store (what a fusing recipe is built with)."""
        return {f"features@{k}": s.feature_dim for k, s in self.named.items()}

    def rows(self, images: Sequence[str] | np.ndarray) -> np.ndarray:
        return self.reference.rows(images)

    def valid(self, rows: Any) -> np.ndarray:
        """An image is valid when every store extracted it."""
        first, *others = self.stores.values()  # the main store is always there
        ok = first.valid(rows)
        for st in others:
            ok = ok & st.valid(rows)
        return ok

    def _take(self, input_name: str, rows: Any) -> np.ndarray:
        st, array = self.store_of(input_name)
        return st._take(array, rows)

    def array_shape(self, input_name: str) -> tuple[int, ...]:
        st, array = self.store_of(input_name)
        if array not in st._arrays:
            st._take(array, np.zeros(0, dtype=np.int64))  # raises the store's own "holds no ..." error
        return tuple(st._arrays[array].shape[1:])

    def identity(self) -> dict[str, dict]:
        """What a run records of each store: path, images_sha256 and fingerprint."""
        return {
            k: {"path": str(s.path), "images_sha256": store_images_sha256(s), "fingerprint": s.fingerprint}
            for k, s in self.stores.items()
        }

    def paths(self) -> dict[str, str]:
        return {k: str(s.path) for k, s in self.stores.items()}


def _label(key: str) -> str:
    return repr(key) if key else "(main)"


class FailedImagesError(StoreError):
    """Some requested images failed extraction: predicting them would silently use zero features."""

    def __init__(self, message: str, images: list[str]) -> None:
        super().__init__(message)
        self.images = images


def check_valid(
    store: FeatureStore | StoreSet, rows: np.ndarray, names: Sequence[str], *, allow_missing: bool = False
) -> np.ndarray:
    """Validity (bool per row) of ``rows``; :class:`FailedImagesError` on a failed one unless allowed."""
    ok = store.valid(rows) if len(rows) else np.zeros(0, dtype=bool)
    if not ok.all() and not allow_missing:
        bad = [str(n) for n, good in zip(names, ok, strict=True) if not good]
        raise FailedImagesError(
            f"{len(bad)} of {len(ok)} images failed extraction (missing or unreadable when {_where(store)} "
            f"was built; see its failed.csv), e.g. {bad[:5]}; their features are zeros. Re-extract them, or "
            "pass --allow-missing (allow_missing=True) to write their rows with valid = 0",
            bad,
        )
    return ok


def _where(store: FeatureStore | StoreSet) -> str:
    if isinstance(store, StoreSet) and len(store.stores) > 1:
        return " / ".join(str(s.path) for s in store.stores.values())
    return str(store.path)


class InputSource:
    """The model's input arrays for a fixed list of store rows, in RAM or read from the store per batch.

    ``store`` is one store, or a :class:`StoreSet` for inputs named ``<array>@<store>``.
    """

    def __init__(
        self,
        store: FeatureStore | StoreSet,
        rows: np.ndarray,
        inputs: Sequence[str],
        in_memory: bool | str = "auto",
        memory_limit_gb: float = 8.0,
        keep: np.ndarray | None = None,
    ) -> None:
        self.stores = StoreSet.of(store)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.inputs = tuple(inputs)
        for name in self.inputs:
            st, array = self.stores.store_of(name)
            if array == "logits" and st.num_logits == 0:
                raise StoreError(f"the model reads the backbone's logits but {st.path} holds none")
            if array == "tokens" and not st.has_tokens:
                raise StoreError(
                    f"the model reads patch tokens but {st.path} holds none; extract with --tokens"
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
        per_row = sum(int(np.prod(self.stores.array_shape(name))) for name in self.inputs)
        return itemsize * per_row * len(self.held_rows)

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The store's float16 values of ``rows`` (sorted rows read sequentially)."""
        return self.stores._take(name, rows)

    def _load(self, name: str, chunk: int = 32768) -> torch.Tensor:
        held = self.held_rows
        shape = self.stores.array_shape(name)
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

    @property
    def store(self) -> FeatureStore:
        """The store the rows index (the main one of a set)."""
        return self.stores.reference

    # worker processes reopen the stores instead of receiving a copy of their memory maps
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["stores"] = self.stores.paths()
        return state

    def __setstate__(self, state: dict) -> None:
        state["stores"] = StoreSet({k: FeatureStore.open(p) for k, p in state["stores"].items()})
        self.__dict__.update(state)


__all__ = [
    "STORE_ARRAYS",
    "FailedImagesError",
    "InputSource",
    "StoreSet",
    "check_valid",
    "split_input",
    "store_images_sha256",
]
