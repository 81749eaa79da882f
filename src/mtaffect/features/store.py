"""The feature store: backbone outputs for every image, cached once, read by row at training time.

On-disk format (version 1). A store is a directory::

    <store>/
      meta.json      written last: its presence marks a finished store
      images.txt     UTF-8, one image name per line (``video/00012.jpg``); line i is row i
      features.npy   float16 (N, D)      pooled features
      logits.npy     float16 (N, K)      only when the backbone has a classifier (K = spec.num_logits)
      tokens.npy     float16 (N, T, C)   only when extracted with tokens (T, C = spec.token_shape)
      valid.npy      bool (N,)           False where the image was missing or unreadable
      failed.csv     ``image,reason``    one line per invalid row (header only when none failed)

``.npy`` files are standard NumPy arrays (``np.load(path, mmap_mode="r")`` reads them). Row i of
every array belongs to line i of ``images.txt``; rows of failed images are all zeros. ``meta.json``
(one JSON object) holds::

    format, format_version, mtaffect_version   the one header (:mod:`mtaffect.persist`)
    backbone          the backbone's spec name, e.g. "fer-minixception"
    spec              its BackboneSpec as a dict (input_size, colour, mean, std, feature_dim, ...)
    fingerprint       spec.fingerprint(): models trained on the store check it (check_compatible)
    preprocessing     {size, colour, resize: the PIL filter, jpeg_draft: true,
                       decode: "RGB" | "JPEG luma plane", pillow: version}
    preprocessing_core  the same without the Pillow version (what a resumed run must match)
    dtype             "float16"
    arrays            {name: shape} of the arrays present
    counts            {images, valid, failed}
    images_sha256     sha256 of images.txt; chunk_size: the extraction's unit of work
    batch_size, device, world_size, created (UTC ISO 8601), torch_version

Reading is O(batch) in memory whatever the store size: :meth:`FeatureStore.open` memory-maps the
arrays read-only and loads only ``images.txt`` and ``meta.json``; :meth:`FeatureStore.features` and
friends fancy-index the memmaps, so only the requested rows are read from disk and copied (as
float32). The name -> row index is a sorted permutation built on the first :meth:`FeatureStore.rows`
call (an int64 per image plus a sorted copy of the names), looked up by vectorised binary search.

An extraction in progress lives beside the store in ``<store>.partial/`` (same files, plus
``plan.json`` and ``progress/``); see :mod:`mtaffect.features.extract`.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np

from mtaffect import persist
from mtaffect.io import atomic_open
from mtaffect.persist import FEATURE_STORE

DTYPE: Final = np.float16
META: Final[str] = "meta.json"
IMAGES: Final[str] = "images.txt"
FAILED: Final[str] = "failed.csv"
#: Array name -> file name; ``valid`` is bool, every other array float16.
ARRAY_FILES: Final[dict[str, str]] = {
    "features": "features.npy",
    "logits": "logits.npy",
    "tokens": "tokens.npy",
    "valid": "valid.npy",
}
PARTIAL_SUFFIX: Final[str] = ".partial"

Rows = Sequence[int] | np.ndarray | slice


class StoreError(ValueError):
    """A feature store is missing, unfinished, inconsistent or does not fit the request."""


class MissingImagesError(StoreError, KeyError):
    """Some requested images are not in the store; ``missing`` lists them all."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def partial_path(store: str | os.PathLike) -> Path:
    """Where an unfinished extraction into ``store`` lives."""
    p = Path(store)
    return p.with_name(p.name + PARTIAL_SUFFIX)


# ---- names ------------------------------------------------------------------------------------------


def check_names(images: Sequence[str]) -> None:
    """Names must fit one per line in images.txt and be unique (they are the store's keys)."""
    for i, name in enumerate(images):
        if not isinstance(name, str) or not name or name != name.strip() or "\n" in name or "\r" in name:
            raise StoreError(
                f"image #{i} {name!r} cannot be a store key: names are non-empty strings without "
                "surrounding whitespace or line breaks"
            )
    if len(set(images)) != len(images):
        seen: set[str] = set()
        dups = []
        for n in images:
            if n in seen:
                dups.append(n)
            seen.add(n)
        raise StoreError(
            f"{len(dups)} duplicate image names (e.g. {dups[:3]}); a store holds each image once"
        )


def images_digest(images: Sequence[str]) -> str:
    """sha256 of the image list as written in images.txt: identifies what a store covers, in order."""
    h = hashlib.sha256()
    for name in images:
        h.update(name.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def write_images(path: Path, images: Sequence[str]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="\n", overwrite=True) as fh:
        fh.writelines(f"{name}\n" for name in images)


def read_images(path: Path, sha256: str | None = None) -> np.ndarray:
    """The names of images.txt; with ``sha256`` (meta.json's ``images_sha256``) checked against it.

    The hash ties every row to its name: an edited or reordered images.txt would silently mislabel
    every row, so it is refused.
    """
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: cannot read the image list ({exc})") from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(
            f"{path} does not match the images_sha256 recorded in {META}: the image list was edited or "
            "reordered after extraction, so rows would get the wrong names; restore it or extract again"
        )
    names = text.split("\n")
    if names and names[-1] == "":
        names.pop()
    return np.array(names, dtype=str)


def check_meta(meta: dict, where: str) -> None:
    """The fields of a finished store's meta.json that readers use, checked (a damaged or hand-edited
    file fails here, naming the key, instead of deep inside a reader)."""

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    arrays = meta.get("arrays")
    if (
        not isinstance(arrays, dict)
        or not {"features", "valid"} <= set(arrays)
        or not set(arrays) <= set(ARRAY_FILES)
        or not all(isinstance(s, list) and s and all(is_int(x) for x in s) for s in arrays.values())
    ):
        raise StoreError(
            f"{where}: arrays must map features, valid (and optionally logits, tokens) to shapes, "
            f"got {str(arrays)[:80]}"
        )
    counts = meta.get("counts")
    if not isinstance(counts, dict) or not all(is_int(counts.get(k)) for k in ("images", "failed")):
        raise StoreError(f"{where}: counts must hold the integers images and failed, got {str(counts)[:80]}")
    for key, kind in (("backbone", str), ("fingerprint", str), ("spec", dict)):
        if not isinstance(meta.get(key), kind):
            raise StoreError(f"{where}: {key} must be a {kind.__name__}, got {str(meta.get(key))[:80]}")
    sha = meta.get("images_sha256")
    if sha is not None and not isinstance(sha, str):
        raise StoreError(f"{where}: images_sha256 must be a hex string, got {sha!r}")


# ---- arrays -----------------------------------------------------------------------------------------


def array_shapes(n: int, feature_dim: int, num_logits: int, token_shape: tuple[int, int] | None) -> dict:
    """The arrays a store of ``n`` images holds and their shapes (``valid`` always)."""
    shapes: dict[str, tuple[int, ...]] = {"features": (n, feature_dim)}
    if num_logits:
        shapes["logits"] = (n, num_logits)
    if token_shape is not None:
        shapes["tokens"] = (n, *token_shape)
    shapes["valid"] = (n,)
    return shapes


def array_dtype(name: str) -> np.dtype:
    return np.dtype(bool) if name == "valid" else np.dtype(DTYPE)


def allocate_arrays(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Create zero-filled (sparse) .npy files of the given shapes: the rows are written in place later."""
    for name, shape in shapes.items():
        mm = np.lib.format.open_memmap(
            folder / ARRAY_FILES[name], mode="w+", dtype=array_dtype(name), shape=shape
        )
        del mm  # header + file size are on disk; the data stays sparse zeros until written


def npy_data_offset(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Byte offset of the data in a C-ordered .npy file, after checking its shape and dtype."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(fh)
        offset = fh.tell()
    if tuple(got_shape) != tuple(shape) or got_dtype != dtype or fortran:
        raise StoreError(
            f"{path}: holds {got_dtype} {tuple(got_shape)}, expected {dtype} {tuple(shape)}; "
            "the unfinished store is damaged: rerun with overwrite=True (CLI: --overwrite)"
        )
    return offset


class RowWriter:
    """Writes whole rows of one preallocated .npy file with ``pwrite`` at their byte offset.

    Plain positional writes (not a writable memmap) touch exactly the bytes of the rows written, so
    processes on several nodes can fill disjoint rows of one file on shared storage (NFS) without
    clobbering neighbouring pages; :meth:`sync` makes them durable before a chunk is marked done.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.offset = npy_data_offset(path, self.shape, self.dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        arr = np.ascontiguousarray(rows, dtype=self.dtype)
        if arr.shape[1:] != self.shape[1:] or start < 0 or start + len(arr) > self.shape[0]:
            raise StoreError(
                f"{self.path}: rows {start}..{start + len(arr)} of shape {arr.shape} do not fit {self.shape}"
            )
        view = arr.reshape(-1).view(np.uint8).data  # a memoryview of the bytes, no copy
        pos = self.offset + start * self.row_bytes
        while len(view):
            written = os.pwrite(self.fd, view, pos)
            view, pos = view[written:], pos + written

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_failed(path: Path, failures: Sequence[tuple[str, str]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="", overwrite=True) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "reason"])
        writer.writerows(failures)


def read_json(path: Path, what: str) -> dict:
    """A JSON object of a store's folder (:func:`mtaffect.persist.read_json` raising :class:`StoreError`)."""
    return persist.read_json(path, what, StoreError)


# ---- reading ----------------------------------------------------------------------------------------


class FeatureStore:
    """A finished store, memory-mapped read-only. Row order is the order of ``images``."""

    def __init__(self, path: Path, meta: dict, images: np.ndarray, arrays: dict[str, np.memmap]) -> None:
        self.path = path
        self.meta = meta
        self.images = images
        self._arrays = arrays
        self._order: np.ndarray | None = None  # argsort of images, built on the first rows() call
        self._sorted: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a finished store; raises :class:`StoreError` saying what is wrong and what to do."""
        p = Path(path)
        unfinished = p.name.endswith(PARTIAL_SUFFIX) or (not p.exists() and partial_path(p).exists())
        if unfinished or (p.is_dir() and not (p / META).exists() and (p / "plan.json").exists()):
            raise StoreError(
                f"{p}: the extraction into this store did not finish; rerun the same extract command to "
                "resume it"
            )
        if not p.exists():
            raise StoreError(f"no feature store at {p}; create one with `mtaffect extract`")
        if not (p / META).is_file():
            raise StoreError(f"{p} is not a feature store (no {META}); create one with `mtaffect extract`")
        meta = read_json(p / META, "store metadata")
        persist.check_header(meta, FEATURE_STORE, p / META, StoreError)
        check_meta(meta, str(p / META))
        images = read_images(p / IMAGES, meta.get("images_sha256"))
        arrays: dict[str, np.memmap] = {}
        for name, shape in meta["arrays"].items():
            file = p / ARRAY_FILES[name]
            try:
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise StoreError(
                    f"{file}: cannot memory-map ({exc}); the store is damaged, extract it again"
                ) from exc
            if arr.shape != tuple(shape) or arr.dtype != array_dtype(name):
                raise StoreError(
                    f"{file}: holds {arr.dtype} {arr.shape}, {META} says {array_dtype(name)} {tuple(shape)}; "
                    "the store is damaged, extract it again"
                )
            arrays[name] = arr
        if len(images) != meta["counts"]["images"] or arrays["features"].shape[0] != len(images):
            raise StoreError(
                f"{p}: {IMAGES} lists {len(images)} images but the arrays hold {arrays['features'].shape[0]} "
                "rows; the store is damaged, extract it again"
            )
        return cls(p, meta, images, arrays)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, backbone={self.backbone!r}, images={len(self)}, "
            f"feature_dim={self.feature_dim}, logits={self.num_logits}, tokens={self.has_tokens}, "
            f"failed={self.meta['counts']['failed']})"
        )

    # ---- description --------------------------------------------------------------------------------
    @property
    def spec(self) -> dict:
        return self.meta["spec"]

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def feature_dim(self) -> int:
        return int(self._arrays["features"].shape[1])

    @property
    def num_logits(self) -> int:
        return int(self._arrays["logits"].shape[1]) if "logits" in self._arrays else 0

    @property
    def has_tokens(self) -> bool:
        return "tokens" in self._arrays

    @property
    def token_shape(self) -> tuple[int, int] | None:
        if not self.has_tokens:
            return None
        _, n, dim = self._arrays["tokens"].shape
        return int(n), int(dim)

    @property
    def num_failed(self) -> int:
        return int(self.meta["counts"]["failed"])

    def failures(self) -> list[tuple[str, str]]:
        """(image, reason) of every invalid row, from failed.csv."""
        with open(self.path / FAILED, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
        return [(r[0], r[1]) for r in rows[1:]]

    def check_compatible(self, fingerprint: str, name: str | None = None) -> None:
        """Raise unless features from a backbone with ``fingerprint`` (named ``name``) are these ones."""
        if fingerprint != self.fingerprint:
            other = f"backbone {name!r} (fingerprint {fingerprint})" if name else f"fingerprint {fingerprint}"
            raise StoreError(
                f"{self.path} holds features of backbone {self.backbone!r} (fingerprint {self.fingerprint}), "
                f"not of {other}; features of different backbones (or weights) never mix: extract a store "
                "with the matching backbone"
            )

    # ---- rows -----------------------------------------------------------------------------------
    def rows(self, images: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row index (int64) of each name; :class:`MissingImagesError` naming those not in the store."""
        if self._order is None or self._sorted is None:
            self._order = np.argsort(self.images, kind="stable")
            self._sorted = self.images[self._order]
        query = np.asarray(images, dtype=str).reshape(-1)
        pos = np.searchsorted(self._sorted, query)
        found = np.zeros(len(query), dtype=bool)
        inside = pos < len(self._sorted)
        found[inside] = self._sorted[pos[inside]] == query[inside]
        if not found.all():
            missing = query[~found].tolist()
            raise MissingImagesError(
                f"{len(missing)} of {len(query)} images are not in {self.path} "
                f"(e.g. {missing[:5]}); extract a store that covers these splits",
                missing,
            )
        return self._order[pos].astype(np.int64)

    def _take(self, name: str, rows: Rows) -> np.ndarray:
        if name not in self._arrays:
            what = (
                "logits (the backbone has no classifier)"
                if name == "logits"
                else "tokens (extract with --tokens)"
            )
            raise StoreError(f"{self.path} holds no {what}")
        arr = self._arrays[name]
        if isinstance(rows, slice):
            return np.array(arr[rows])
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size and (idx.min() < -len(arr) or idx.max() >= len(arr)):
            raise StoreError(f"row index out of range for {self.path} ({len(arr)} rows)")
        return arr[idx]  # fancy indexing reads and copies only these rows

    def features(self, rows: Rows) -> np.ndarray:
        """float32 (len(rows), D)."""
        return self._take("features", rows).astype(np.float32)

    def logits(self, rows: Rows) -> np.ndarray:
        """float32 (len(rows), K)."""
        return self._take("logits", rows).astype(np.float32)

    def tokens(self, rows: Rows) -> np.ndarray:
        """float32 (len(rows), T, C)."""
        return self._take("tokens", rows).astype(np.float32)

    def valid(self, rows: Rows) -> np.ndarray:
        """bool (len(rows),): False for images that were missing or unreadable (their rows are zero)."""
        return self._take("valid", rows)
