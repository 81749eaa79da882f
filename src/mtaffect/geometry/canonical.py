"""MediaPipe's canonical face model, read from the vendored bundle without protobuf or mediapipe.

The bundle's ``geometry_pipeline_metadata_landmarks.binarypb`` is a serialized ``GeometryPipelineMetadata``
(MediaPipe's ``geometry_pipeline_metadata.proto`` and ``mesh_3d.proto``). Field numbers, as found by
parsing the vendored file (they match the .proto; note the mesh is field 1, not 3):

- ``GeometryPipelineMetadata``: 1 ``canonical_mesh`` (Mesh3d), 2 ``procrustes_landmark_basis`` (repeated
  WeightedLandmarkRef), 3 ``input_source`` (enum; 1 = FACE_LANDMARK_PIPELINE: relative z scaled like x);
- ``WeightedLandmarkRef``: 1 ``landmark_id`` (uint32), 2 ``weight`` (float);
- ``Mesh3d``: 1 ``vertex_type`` (0 = VERTEX_PT: x, y, z, u, v per vertex), 2 ``primitive_type``
  (0 = TRIANGLE), 3 ``vertex_buffer`` (float, packed or not), 4 ``index_buffer`` (uint32, packed or not).

Reading those few wire types takes forty lines; a protobuf runtime would be a dependency for one file.
The canonical face (cm) is a mean face looking into the camera: x to the viewer's right (landmark 33,
the outer corner of the eye on the image's left, has x < 0), y up, z towards the viewer (the nose tip is
in front), origin roughly at the centre of the head. Its vertex ids are the landmark ids.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import numpy as np

from mtaffect.geometry.bundle import CANONICAL_FACE, BundleError, read_member

NUM_VERTICES: Final[int] = 468
_VERTEX_PT: Final[int] = 0  # Mesh3d.VertexType: x, y, z, u, v
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class CanonicalFace:
    """The canonical face: arrays are read-only (the value is cached and shared)."""

    vertices: np.ndarray  #: (468, 3) float64, cm; x to the viewer's right, y up, z towards the viewer
    procrustes_ids: np.ndarray  #: (k,) int64 landmark ids MediaPipe fits the pose on (rigid points)
    procrustes_weights: np.ndarray  #: (k,) float64, > 0, normalised to sum 1
    triangles: np.ndarray  #: (t, 3) int64 vertex ids of the mesh's triangles


def _varint(buf: bytes, i: int, name: str) -> tuple[int, int]:
    value = shift = 0
    while shift < 70:
        if i >= len(buf):
            raise BundleError(f"{name}: truncated varint at byte {i}")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
    raise BundleError(f"{name}: varint longer than 10 bytes at byte {i}")


def _fields(buf: bytes, name: str) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, int or raw bytes) of one message, in order."""
    out: list[tuple[int, int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i, name)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise BundleError(f"{name}: field number 0 at byte {i}")
        if wire == _WIRE_VARINT:
            value, i = _varint(buf, i, name)
            out.append((field, wire, value))
            continue
        if wire == _WIRE_LEN:
            size, i = _varint(buf, i, name)
        elif wire in (_WIRE_FIXED32, _WIRE_FIXED64):
            size = 4 if wire == _WIRE_FIXED32 else 8
        else:
            raise BundleError(f"{name}: unsupported wire type {wire} (field {field}) at byte {i}")
        if i + size > len(buf):
            raise BundleError(f"{name}: field {field} runs past the end of its message")
        out.append((field, wire, buf[i : i + size]))
        i += size
    return out


def _floats(fields: list, number: int, name: str) -> np.ndarray:
    """A repeated float field, packed (one length-delimited run) or not (fixed32 each), concatenated."""
    parts = []
    for f, wire, v in fields:
        if f != number:
            continue
        if wire not in (_WIRE_FIXED32, _WIRE_LEN) or len(v) % 4:
            raise BundleError(f"{name}: field {number} is not a float")
        parts.append(np.frombuffer(v, "<f4"))
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def _uints(fields: list, number: int, name: str) -> np.ndarray:
    """A repeated uint32 field, packed or not."""
    values: list[int] = []
    for f, wire, v in fields:
        if f != number:
            continue
        if wire == _WIRE_VARINT:
            values.append(v)
        elif wire == _WIRE_LEN:
            i = 0
            while i < len(v):
                x, i = _varint(v, i, name)
                values.append(x)
        else:
            raise BundleError(f"{name}: field {number} is not an integer")
    if values and max(values) >= 2**32:
        raise BundleError(f"{name}: field {number} is not a uint32")
    return np.array(values, np.int64)


def _one(fields: list, number: int, wire: int, name: str, what: str):
    found = [v for f, w, v in fields if f == number]
    if len(found) != 1 or [w for f, w, _ in fields if f == number] != [wire]:
        raise BundleError(f"{name}: expected one {what} (field {number})")
    return found[0]


def parse_canonical_face(data: bytes, name: str = CANONICAL_FACE) -> CanonicalFace:
    """A serialized ``GeometryPipelineMetadata`` -> :class:`CanonicalFace`; BundleError names ``name``."""
    top = _fields(data, name)
    mesh = _fields(_one(top, 1, _WIRE_LEN, name, "canonical mesh"), name)
    # field 1 is a varint (an int here); proto2's default is 0
    vertex_type = next((v for f, _, v in mesh if f == 1 and isinstance(v, int)), 0)
    if vertex_type != _VERTEX_PT:
        raise BundleError(f"{name}: canonical mesh vertex type {vertex_type}, expected VERTEX_PT (0)")
    vb = _floats(mesh, 3, name)
    if len(vb) != 5 * NUM_VERTICES or not np.isfinite(vb).all():
        raise BundleError(
            f"{name}: expected {NUM_VERTICES} finite (x, y, z, u, v) vertices, got {len(vb)} floats"
        )
    tri = _uints(mesh, 4, name)
    if len(tri) % 3 or (len(tri) and tri.max() >= NUM_VERTICES):
        raise BundleError(f"{name}: the index buffer is not triangles of the {NUM_VERTICES} vertices")
    ids, weights = [], []
    for f, w, v in top:
        if f != 2:
            continue
        if w != _WIRE_LEN or not isinstance(v, bytes):
            raise BundleError(f"{name}: procrustes landmark basis entry is not a message")
        ref = _fields(v, name)
        ids.append(_one(ref, 1, _WIRE_VARINT, name, "procrustes landmark id"))
        weights.append(struct.unpack("<f", _one(ref, 2, _WIRE_FIXED32, name, "procrustes weight"))[0])
    pw = np.array(weights, np.float64)
    if len(ids) < 3 or max(ids) >= NUM_VERTICES or not (np.isfinite(pw).all() and (pw > 0).all()):
        raise BundleError(f"{name}: the procrustes landmark basis needs >= 3 landmarks with weights > 0")
    face = CanonicalFace(
        vb.reshape(-1, 5)[:, :3].copy(), np.array(ids, np.int64), pw / pw.sum(), tri.reshape(-1, 3)
    )
    for a in (face.vertices, face.procrustes_ids, face.procrustes_weights, face.triangles):
        a.setflags(write=False)
    return face


@lru_cache(maxsize=1)
def canonical_face() -> CanonicalFace:
    """The canonical face of the vendored bundle (parsed once)."""
    return parse_canonical_face(read_member(CANONICAL_FACE))


__all__ = ["NUM_VERTICES", "CanonicalFace", "canonical_face", "parse_canonical_face"]
