"""``export.json``: what an export folder holds and how to feed it (format ``mtaffect-export``, version 1).

Written by ``mtaffect export`` (:mod:`mtaffect.export`), read by the onnxruntime engine and by anyone
deploying the graphs elsewhere (C++, mobile): the inputs and outputs of each graph, the preprocessing
that turns a photo into the face model's input, the post-processing thresholds, the opset, and a
sha256 of every file, checked on load. The full description is in docs/formats.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Final

FORMAT: Final[str] = "mtaffect-export"
FORMAT_VERSION: Final[int] = 1
MANIFEST: Final[str] = "export.json"
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
    """Write ``export.json`` into ``folder`` (called on the temporary folder before it is renamed)."""
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    return path


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export folder; with ``verify`` every listed file must match its sha256."""
    root = Path(folder)
    path = root / MANIFEST
    if not root.is_dir():
        raise ExportError(f"no export folder at {root}; make one with `mtaffect export --out {root}`")
    if not path.is_file():
        raise ExportError(f"{root} is not an mtaffect export: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not an mtaffect export manifest (format {FORMAT!r} expected)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ExportError(f"{path}: export format {version} is newer than this mtaffect; upgrade mtaffect")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{path}: lists no files")
    for name, record in files.items():
        p = root / name
        if not p.is_file():
            raise ExportError(f"{p} is missing; the export is incomplete, export again")
        if verify and sha256_file(p) != record.get("sha256"):
            raise ExportError(
                f"{p} does not match the sha256 in {MANIFEST}; the file is damaged, export again"
            )
    return manifest
