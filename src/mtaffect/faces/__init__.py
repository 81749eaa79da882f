"""Face detection (MTCNN with embedded weights), which detections count (filtering), 112x112 crops
(5-point alignment or box crop), head pose from the landmarks and an appearance embedding.

:class:`MTCNN` (PyTorch) is imported on first use, so the numpy parts (alignment, the cascade,
filtering, pose, embedding) import without torch, as the onnxruntime engine needs.
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
from mtaffect.faces.embed import appearance_embedding
from mtaffect.faces.filtering import filter_detections
from mtaffect.faces.pose import head_pose

__all__ = [
    "MTCNN",
    "REFERENCE_5PT_112",
    "FaceDetections",
    "align_face",
    "align_faces",
    "appearance_embedding",
    "crop_box",
    "crop_boxes",
    "filter_detections",
    "head_pose",
    "similarity_transform",
]


def __getattr__(name: str) -> Any:
    if name == "MTCNN":
        from mtaffect.faces.mtcnn import MTCNN

        return MTCNN
    raise AttributeError(f"module 'mtaffect.faces' has no attribute {name!r}")
