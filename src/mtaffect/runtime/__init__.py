"""The onnxruntime engine: run an export folder (``mtaffect export``) without torch.

Needs numpy, Pillow and onnxruntime only (see the README's "Deploying without torch")::

    from mtaffect.runtime import load

    rt = load("export/")  # checks every file's sha256
    detections, probs = rt.analyse(image)  # uint8 RGB (H, W, 3) -> faces and AffectOutputs

For video, ``rt.detector(...)`` is the MTCNN cascade (``detect``/``refine``), ``rt.faces(image,
detections)`` the aligned, resized faces and ``rt.model.run(faces)`` / ``rt.model.predict(features)``
the face graph and its heads (temporal models over a track's feature window).
"""

from mtaffect.faces.cascade import Cascade, FaceDetections
from mtaffect.models.outputs import AffectOutputs
from mtaffect.runtime.engine import ExportedFaceModel, OrtNets, Runtime, load, make_session
from mtaffect.runtime.manifest import ExportError, read_manifest

__all__ = [
    "AffectOutputs",
    "Cascade",
    "ExportError",
    "ExportedFaceModel",
    "FaceDetections",
    "OrtNets",
    "Runtime",
    "load",
    "make_session",
    "read_manifest",
]
