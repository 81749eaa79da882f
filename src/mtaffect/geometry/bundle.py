"""The vendored MediaPipe Face Landmarker bundle (``weights/face_landmarker.task``): its parts, checked.

The bundle is a zip of TFLite models and the canonical face model (see
``weights/LICENSE-face-landmarker.txt`` for its provenance). It is data: its members are read as bytes,
never executed, and the whole file is checked against the sha256 it was vendored with, so a damaged or
replaced file is an error naming it rather than wrong geometry.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Final

BUNDLE_PATH: Final[Path] = Path(__file__).resolve().parents[1] / "weights" / "face_landmarker.task"
BUNDLE_SHA256: Final[str] = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
LANDMARKS_MODEL: Final[str] = "face_landmarks_detector.tflite"
BLENDSHAPES_MODEL: Final[str] = "face_blendshapes.tflite"
CANONICAL_FACE: Final[str] = "geometry_pipeline_metadata_landmarks.binarypb"


class BundleError(ValueError):
    """The landmarker bundle is missing, damaged or not the one mtaffect was built with."""


@lru_cache(maxsize=4)
def _members(path: str, sha256: str | None) -> dict[str, bytes]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BundleError(
            f"{p}: cannot read the face landmarker bundle ({e.strerror}); reinstall mtaffect"
        ) from e
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(
            f"{p}: not the face landmarker bundle mtaffect ships (sha256 differs); reinstall mtaffect"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return {n: zf.read(n) for n in zf.namelist()}
    except zipfile.BadZipFile as e:
        raise BundleError(f"{p}: not a face landmarker bundle ({e})") from e


def read_member(name: str, path: str | Path | None = None) -> bytes:
    """One part of the bundle as bytes (``path`` None: the vendored bundle, sha256-checked)."""
    members = _members(str(path or BUNDLE_PATH), BUNDLE_SHA256 if path is None else None)
    if name not in members:
        raise BundleError(f"{path or BUNDLE_PATH}: the bundle has no {name}")
    return members[name]


__all__ = [
    "BLENDSHAPES_MODEL",
    "BUNDLE_PATH",
    "BUNDLE_SHA256",
    "CANONICAL_FACE",
    "LANDMARKS_MODEL",
    "BundleError",
    "read_member",
]
