"""Facial geometry measured by MediaPipe's Face Landmarker v2 (vendored, run with LiteRT; no torch).

- :mod:`~mtaffect.geometry.bundle`: the vendored ``face_landmarker.task`` and its parts, sha256-checked;
- :mod:`~mtaffect.geometry.landmarker`: 478 3D landmarks and 52 blendshapes of faces we detected;
- :mod:`~mtaffect.geometry.canonical`, :mod:`~mtaffect.geometry.headpose`: head pose from a rigid fit of the
  landmarks to MediaPipe's canonical face (expression does not move it);
- :mod:`~mtaffect.geometry.gaze`: gaze angles from the irises and eye corners;
- :mod:`~mtaffect.geometry.au_evidence`: AU probabilities and intensities from blendshape evidence combined
  with an expression model's AU priors.
"""
