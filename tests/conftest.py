"""Fixtures shared by several test modules (built once per session, only when a test asks for them)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Iterator[Path]:
    """A synthetic s-Aff-Wild2 set to train from images (4 videos x 24 frames, seed 1). Shared by the
    session, so read-only: a test that changes it works on a copy (checked when the session ends)."""
    from mtaffect.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("images") / "data"
    generate(root, SynthConfig(videos=4, frames=24, seed=1))
    before = _files(root)
    yield root
    assert _files(root) == before, f"a test changed the shared data set {root}"


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory) -> Path:
    """A tiny random-init transformers ViT saved as a local folder (loaded as ``hf:<folder>``)."""
    pytest.importorskip("transformers")
    from model_helpers import tiny_vit_folder

    return tiny_vit_folder(tmp_path_factory.mktemp("vit") / "vit")


@pytest.fixture(scope="session")
def away_video(tmp_path_factory) -> Path:
    """Two real-photo faces for 3.2 s; the first slides out of the picture and is fully gone ~1.2 s
    (longer than tracking by position), then returns: re-identification's case. Read-only."""
    pytest.importorskip("skimage")  # the public-domain face photos
    from mtaffect.predict import demo_media

    folder = tmp_path_factory.mktemp("away")
    return demo_media.make_demo_video(folder / "away.mp4", seconds=3.2, faces=2, away=(0.4, 2.6))


@pytest.fixture(scope="session")
def _away_torch_table(away_video):
    from mtaffect.predict.pipeline import Predictor

    return Predictor(detect_every=5).predict(away_video)


@pytest.fixture
def away_torch_table(_away_torch_table):
    """The torch engine's table of ``away_video`` (``Predictor(detect_every=5)``), predicted once per
    session; every test gets its own copy."""
    return _away_torch_table.copy()


@pytest.fixture(scope="session")
def default_export(tmp_path_factory) -> tuple[Path, dict]:
    """The embedded default model and MTCNN exported with --quantize (folder, manifest).

    Exported over an older export with ``overwrite=True``: the old content must be gone.
    """
    pytest.importorskip("onnxscript")
    from mtaffect.export.exporter import export_model

    out = tmp_path_factory.mktemp("export") / "default"
    out.mkdir()
    (out / "stale.onnx").write_text("from an older export")
    header = {"format": "mtaffect-export", "format_version": 1}  # an older export's manifest, by hand
    (out / "export.json").write_text(json.dumps(header))
    manifest = export_model("default", out, quantize=True, overwrite=True)
    return out, manifest
