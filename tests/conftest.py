"""Fixtures shared by several test modules (built once per session, only when a test asks for them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network: a hub id that is not cached fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def torch_one_thread():
    """Single-threaded torch: deterministic, and immune to OpenMP spin-waits on a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_export(tmp_path_factory) -> tuple[Path, dict]:
    """The embedded default model and MTCNN exported with --quantize (folder, manifest).

    Exported over an existing folder with ``overwrite=True``: the old content must be gone.
    """
    pytest.importorskip("onnxscript")
    from mtaffect.export.exporter import export_model

    out = tmp_path_factory.mktemp("export") / "default"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    manifest = export_model("default", out, quantize=True, overwrite=True)
    return out, manifest
