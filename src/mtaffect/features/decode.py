"""Decoding face crops for extraction, in DataLoader worker processes.

For a small backbone on CPU, JPEG decoding is a large share of the cost of a feature cache, so the
decoder does as little work as the backbone needs:

- ``Image.draft`` lets libjpeg scale by 1/2, 1/4 or 1/8 in the DCT domain while decoding, when the
  target is at least two times smaller than the file;
- a greyscale backbone (``colour="L"``) gets the JPEG's luma plane directly (no chroma upsampling nor
  colour conversion; JPEG's Y is the same ITU-R 601 luma that ``convert("L")`` computes, up to
  rounding);
- a whole batch is decoded per ``__getitem__`` into one preallocated array: no per-image collation
  or inter-process message.

Failures (missing, unreadable, truncated files) never raise: the image is left black, flagged
``ok=False`` and the reason is returned, so one bad file cannot stop a run over 400k images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

import numpy as np
import PIL
from PIL import Image

#: The one resampling filter used for every resize: extraction must be reproducible.
RESAMPLE: Final = Image.Resampling.BILINEAR
RESAMPLE_NAME: Final[str] = "PIL.Image.BILINEAR (antialiased)"


def decode_mode(colour: str) -> str:
    """PIL mode to decode into for a backbone's ``spec.colour`` ("RGB" or "L")."""
    if colour not in ("RGB", "L"):
        raise ValueError(f"backbone colour must be 'RGB' or 'L', got {colour!r}")
    return colour


def preprocessing_description(size: int, colour: str) -> dict:
    """What decoding does to a file before the backbone sees it (recorded in a store's meta.json)."""
    return {
        "size": int(size),
        "colour": decode_mode(colour),
        "resize": RESAMPLE_NAME,
        "jpeg_draft": True,
        "decode": "JPEG luma plane" if colour == "L" else "RGB",
        "pillow": PIL.__version__,
    }


def decode_image(path: str | os.PathLike, size: int, mode: str) -> np.ndarray:
    """Decode one image to uint8 ``(size, size)`` ("L") or ``(size, size, 3)`` ("RGB"); raises on failure.

    Non-square images are resized to the square (aligned crops are square already).
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            # Largest DCT scaling whose result is still >= size: never upsampled, then resized below.
            im.draft(mode, (size, size))
        img = im.convert(mode) if im.mode != mode else im
        if img.size != (size, size):
            img = img.resize((size, size), RESAMPLE)
        else:
            img.load()
        return np.asarray(img)


def resize_array(image: np.ndarray, size: int, colour: str) -> np.ndarray:
    """An in-memory uint8 RGB face (H, W, 3) as extraction would present it: ``colour`` mode, ``size``
    square, same filter. Use it wherever faces reach a backbone outside a store (e.g. prediction), so
    training and inference see identically resized pixels."""
    mode = decode_mode(colour)
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.asarray(img)


def failure_reason(exc: BaseException) -> str:
    """A short, stable, one-line reason for failed.csv."""
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, IsADirectoryError | PermissionError):
        return f"cannot open: {type(exc).__name__}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a readable image"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"unreadable: {text}"[:200]


class BatchDecodeDataset:
    """Item ``i`` is a whole batch: the images ``names[batches[i]]`` under ``folder``, in one uint8 array.

    Returns a dict: ``rows`` int64 (B,), ``pixels`` uint8 (B, S, S) for "L" or (B, S, S, 3) for "RGB",
    ``ok`` bool (B,) and ``reasons`` (B strings, "" where ok). Use it with ``DataLoader(batch_size=None)``.
    Paths are joined here, in the workers: building 400k ``Path`` objects up front costs ~20 s.
    A plain map-style dataset (``__len__`` + ``__getitem__``), so this module imports without torch:
    the onnxruntime engine resizes faces with :func:`resize_array` too.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        names: Sequence[str],
        batches: Sequence[np.ndarray],
        size: int,
        colour: str,
    ) -> None:
        self.folder = os.fspath(folder)
        self.names = names
        self.batches = batches
        self.size = int(size)
        self.mode = decode_mode(colour)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        rows = np.asarray(self.batches[i], dtype=np.int64)
        shape = (len(rows), self.size, self.size) + ((3,) if self.mode == "RGB" else ())
        pixels = np.zeros(shape, dtype=np.uint8)
        ok = np.zeros(len(rows), dtype=bool)
        reasons = [""] * len(rows)
        for j, row in enumerate(rows):
            try:
                pixels[j] = decode_image(os.path.join(self.folder, self.names[row]), self.size, self.mode)
                ok[j] = True
            except Exception as exc:
                reasons[j] = failure_reason(exc)
        return {"rows": rows, "pixels": pixels, "ok": ok, "reasons": reasons}
