"""ONNX export of a prediction model and MTCNN (``mtaffect export``), checked against PyTorch.

``export_model("default" | "RUN/best", "DIR")`` writes an export folder that :mod:`mtaffect.runtime`
runs with onnxruntime and without torch (docs/formats.md describes the folder). Exporting needs torch,
``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``export`` extra).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "export_model": "mtaffect.export.exporter",
    "ExportCheckError": "mtaffect.export.exporter",
    "DEFAULT_OPSET": "mtaffect.export.exporter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mtaffect.export' has no attribute {name!r}")
