"""Decoding face crops for extraction, image training and prediction, in DataLoader worker processes.

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
``ok=False`` and the reason is returned, so one bad file cannot stop a run over 400k images. Files are
opened with :func:`mtaffect.io.open_regular`: a FIFO named like an image would block a plain ``open`` forever.

Every decoded image, here and in the application (``predict.sources.read_image``), goes through
:func:`to_8bit`, the one conversion to 8-bit RGB/L: 16-bit greyscale PNGs are scaled, not clipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

import numpy as np
import PIL
from PIL import Image

from mtaffect.io import NotRegularFileError, open_regular

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


class ImageDepthError(ValueError):
    """An image whose pixel values have no known 8-bit equivalent (float, or integers beyond 16 bits)."""


#: Pillow modes of 16-bit greyscale images (PNG opens as ``I;16``; some builds give ``I``).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as an 8-bit ``mode`` ("RGB" or "L") image; the one conversion every decoded image takes.

    Pillow's ``convert`` clips 16-bit greyscale values to 255, which turns a 16-bit PNG white; here they
    are scaled (``v * 255 / 65535``, rounded). Mode ``I`` (32-bit integers, e.g. an integer TIFF) does
    not say its depth: values within 0..255 are 8-bit and kept (scaling them as 16-bit would give a
    black image), larger ones up to 65535 are 16-bit and scaled. 16-bit colour PNGs already open as
    8-bit RGB. Float images and integers beyond 16 bits have no known range: :class:`ImageDepthError`.
    """
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im)
        top = int(values.max()) if values.size else 0
        if im.mode == "I" and values.size and (values.min() < 0 or top > 65535):
            raise ImageDepthError(
                f"a 32-bit integer image (values {values.min()}..{top}) has no known 8-bit "
                "equivalent; save it as an 8- or 16-bit PNG or a JPEG"
            )
        if im.mode == "I" and top <= 255:  # 32-bit container of 8-bit values: already 0..255
            scaled = values.astype(np.uint8)
        else:
            scaled = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        im = Image.fromarray(scaled, "L")
    elif im.mode == "F":
        raise ImageDepthError("a 32-bit float image has no known 8-bit equivalent; save it as PNG or JPEG")
    return im.convert(mode) if im.mode != mode else im


def decode_image(path: str | os.PathLike, size: int, mode: str) -> np.ndarray:
    """Decode one image to uint8 ``(size, size)`` ("L") or ``(size, size, 3)`` ("RGB"); raises on failure.

    Non-square images are resized to the square (aligned crops are square already).
    """
    with open_regular(path) as fh, Image.open(fh) as im:
        if im.format == "JPEG":
            # Largest DCT scaling whose result is still >= size: never upsampled, then resized below.
            im.draft(mode, (size, size))
        img = to_8bit(im, mode)
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
    if isinstance(exc, NotRegularFileError):
        return f"not a regular file: {exc.kind}"
    if isinstance(exc, IsADirectoryError | PermissionError):
        return f"cannot open: {type(exc).__name__}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a readable image"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"unreadable: {text}"[:200]


#: Image names: a list, or an object array of str (forked workers share it without a copy per item).
ImageNames = Sequence[str] | np.ndarray


def decode_rows(
    folder: str, names: ImageNames, rows: np.ndarray, size: int, mode: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``names[rows]`` under ``folder`` into one preallocated uint8 array; never raises.

    Returns ``pixels`` (B, S, S) for "L" or (B, S, S, 3) for "RGB" (black where decoding failed),
    ``ok`` (B,) and ``reasons`` (B strings, "" where ok).
    """
    shape = (len(rows), size, size) + ((3,) if mode == "RGB" else ())
    pixels = np.zeros(shape, dtype=np.uint8)
    ok = np.zeros(len(rows), dtype=bool)
    reasons = [""] * len(rows)
    for j, row in enumerate(rows):
        try:
            pixels[j] = decode_image(os.path.join(folder, names[row]), size, mode)
            ok[j] = True
        except Exception as exc:
            reasons[j] = failure_reason(exc)
    return pixels, ok, reasons


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
        names: ImageNames,
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
        pixels, ok, reasons = decode_rows(self.folder, self.names, rows, self.size, self.mode)
        return {"rows": rows, "pixels": pixels, "ok": ok, "reasons": reasons}


class ImageReader:
    """Decoded pixels of a fixed list of images by position, exactly as extraction decodes them.

    ``read(positions)`` takes any index shape (e.g. (B, T) windows), decodes each distinct image once
    and returns ``pixels`` (positions.shape + (S, S[, 3])) uint8, ``ok`` (positions.shape) and the
    ``(name, reason)`` of every failure. Image training and prediction from images read through it.
    """

    def __init__(self, folder: str | os.PathLike, names: Sequence[str], size: int, colour: str) -> None:
        self.folder = os.fspath(folder)
        self.names = np.asarray(names, dtype=object)
        self.size = int(size)
        self.mode = decode_mode(colour)

    def __len__(self) -> int:
        return len(self.names)

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        pos = np.asarray(positions, dtype=np.int64)
        uniq, inv = np.unique(pos.reshape(-1), return_inverse=True)
        pixels, ok, reasons = decode_rows(self.folder, self.names, uniq, self.size, self.mode)
        failed = [
            (str(self.names[r]), why) for r, good, why in zip(uniq, ok, reasons, strict=True) if not good
        ]
        inv = inv.reshape(-1)
        return pixels[inv].reshape(*pos.shape, *pixels.shape[1:]), ok[inv].reshape(pos.shape), failed


class ReaderBatches:
    """Item ``i`` is ``reader.read(batches[i])``: an :class:`ImageReader`'s batches for a DataLoader with
    decoding workers (``batch_size=None``), in order."""

    def __init__(self, reader: ImageReader, batches: Sequence[np.ndarray]) -> None:
        self.reader, self.batches = reader, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        return self.reader.read(self.batches[i])
