"""ONNX export of a prediction model and MTCNN (``mtaffect export``), checked against PyTorch.

``mtaffect.export.exporter.export_model("default" | "RUN/best", "DIR")`` writes an export folder that
:mod:`mtaffect.runtime` runs with onnxruntime and without torch (docs/formats.md describes the folder).
Exporting needs torch, ``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``export`` extra).
"""
