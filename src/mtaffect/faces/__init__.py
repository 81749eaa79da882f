"""Face detection (MTCNN with embedded weights) and 112x112 crops (5-point alignment or box crop)."""

from mtaffect.faces.align import (
    REFERENCE_5PT_112,
    align_face,
    align_faces,
    crop_box,
    crop_boxes,
    similarity_transform,
)
from mtaffect.faces.mtcnn import MTCNN, FaceDetections

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
