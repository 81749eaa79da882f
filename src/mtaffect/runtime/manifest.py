"""``export.json``: what an export folder holds and how to feed it (format ``mtaffect-export``, version 1,
the one header of :mod:`mtaffect.persist`).

Written by ``mtaffect export`` (:mod:`mtaffect.export`), read by the onnxruntime engine and by anyone
deploying the graphs elsewhere (C++, mobile): the inputs and outputs of each graph, the preprocessing
that turns a photo into the face model's input, the post-processing thresholds, the opset, and a
sha256 of every file, checked on load. The full description is in docs/formats.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Final, TypeGuard

from mtaffect.persist import EXPORT, read_header_file, write_json
from mtaffect.schema import NUM_AUS

MANIFEST: Final[str] = str(EXPORT.marker)
#: Graph files of an export folder.
FACE_MODEL: Final[str] = "face_model.onnx"
FACE_MODEL_INT8: Final[str] = "face_model.int8.onnx"
HEAD: Final[str] = "head.onnx"
MTCNN_FILES: Final[dict[str, str]] = {
    "pnet": "mtcnn_pnet.onnx",
    "rnet": "mtcnn_rnet.onnx",
    "onet": "mtcnn_onet.onnx",
}


class ExportError(ValueError):
    """An export folder is missing, damaged, or was written by a newer mtaffect."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {sha256, bytes}} of every file in ``folder`` (the manifest itself excepted)."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``export.json`` into ``folder`` (called on the temporary folder before it is renamed);
    ``manifest`` starts with the header of :mod:`mtaffect.persist` (``header(EXPORT, ...)``)."""
    return write_json(folder / MANIFEST, manifest)


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The checked manifest of an export folder; with ``verify`` every listed file must match its sha256.

    Every field a reader uses is checked (:func:`check_manifest`), so a damaged or hostile manifest fails
    here naming the key; every file it names is a plain name inside the folder.
    """
    root = Path(folder)
    path = root / MANIFEST
    if not root.is_dir():
        raise ExportError(f"no export folder at {root}; make one with `mtaffect export --out {root}`")
    if not path.is_file():
        raise ExportError(f"{root} is not an mtaffect export: {MANIFEST} is missing")
    manifest = read_header_file(path, EXPORT, ExportError)
    check_manifest(manifest, str(path))
    for name, record in manifest["files"].items():
        p = root / name
        if not p.is_file() or p.is_symlink():
            raise ExportError(f"{p} is missing; the export is incomplete, export again")
        if verify and sha256_file(p) != record["sha256"]:
            raise ExportError(
                f"{p} does not match the sha256 in {MANIFEST}; the file is damaged, export again"
            )
    return manifest


def check_manifest(manifest: dict[str, Any], where: str) -> None:
    """Check the fields a reader of ``export.json`` uses: file names stay inside the folder and are
    listed with a sha256; sizes, flags and thresholds have their types and ranges."""

    def fail(key: str, what: str, value: Any) -> ExportError:
        text = repr(value)
        return ExportError(f"{where}: {key} {what}, got {text if len(text) <= 60 else text[:57] + '...'}")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise fail("files", "must map the folder's file names to {sha256, bytes}", files)
    for name, record in files.items():
        if not _plain_name(name):
            raise fail(f"files[{name!r}]", "must be a plain file name inside the export folder", name)
        if not isinstance(record, dict) or not _is_sha256(record.get("sha256")):
            raise fail(f"files[{name!r}].sha256", "must be 64 hexadecimal digits", record)
    face = manifest.get("face_model")
    if not isinstance(face, dict):
        raise fail("face_model", "must be a mapping", face)

    def listed(key: str, value: Any, optional: bool) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or value not in files:
            raise fail(key, "must name a file listed in files", value)

    listed("face_model.file", face.get("file"), False)
    listed("face_model.int8_file", face.get("int8_file"), True)
    listed("face_model.head_file", face.get("head_file"), True)
    if not isinstance(face.get("temporal"), bool):
        raise fail("face_model.temporal", "must be true or false", face.get("temporal"))
    window = face.get("window")
    if window is not None and (not _is_int(window) or window < 1):
        raise fail("face_model.window", "must be null or a positive integer", window)
    for key in ("outputs", "head_inputs", "backbone"):
        if not isinstance(face.get(key), dict) or not face[key]:
            raise fail(f"face_model.{key}", "must be a non-empty mapping", face.get(key))
    if not isinstance(face["backbone"].get("name"), str):
        raise fail("face_model.backbone.name", "must be a backbone name", face["backbone"].get("name"))
    pre = manifest.get("preprocessing")
    size = (pre.get("resize") or {}).get("size") if isinstance(pre, dict) else None
    if not _is_int(size) or not 1 <= size <= 4096:
        raise fail("preprocessing.resize.size", "must be an integer between 1 and 4096", size)
    assert isinstance(pre, dict)  # the size came from it
    if pre.get("colour") not in ("RGB", "L"):
        raise fail("preprocessing.colour", 'must be "RGB" or "L"', pre.get("colour"))
    post = manifest.get("postprocessing")
    thr = post.get("au_thresholds") if isinstance(post, dict) else None
    ok = isinstance(thr, list) and len(thr) == NUM_AUS and all(_is_probability(t) for t in thr)
    if not ok:
        raise fail("postprocessing.au_thresholds", f"must be {NUM_AUS} numbers between 0 and 1", thr)
    assert isinstance(post, dict)  # the thresholds came from it
    if post.get("au_source", "model") not in ("model", "expression"):
        raise fail("postprocessing.au_source", 'must be "model" or "expression"', post.get("au_source"))
    det = manifest.get("detector")
    if det is not None:
        nets = det.get("files") if isinstance(det, dict) else None
        if not isinstance(nets, dict):
            raise fail("detector.files", "must map pnet, rnet and onet to files", nets)
        for net in MTCNN_FILES:
            listed(f"detector.files.{net}", nets.get(net), False)


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
    )


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1  # NaN: False


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
