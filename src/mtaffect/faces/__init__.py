"""Face detection (MTCNN with embedded weights) and 112x112 crops (5-point alignment or box crop).

:class:`MTCNN` (PyTorch) is imported on first use, so the numpy parts (alignment, the cascade) import
without torch, as the onnxruntime engine needs.
"""

from __future__ import annotations

from typing import Any

from mtaffect.faces.align import (
    REFERENCE_5PT_112,
    align_face,
    align_faces,
    crop_box,
    crop_boxes,
    similarity_transform,
)
from mtaffect.faces.cascade import FaceDetections

__all__ = [
    "MTCNN",
    "REFERENCE_5PT_112",
    "FaceDetections",
    "align_face",
    "align_faces",
    "crop_box",
    "crop_boxes",
    "similarity_transform",
]


def __getattr__(name: str) -> Any:
    if name == "MTCNN":
        from mtaffect.faces.mtcnn import MTCNN

        return MTCNN
    raise AttributeError(f"module 'mtaffect.faces' has no attribute {name!r}")
