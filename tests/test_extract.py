"""Extraction into a feature store: crash-safe resume, failed images, sharding, overwrite protection."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mtaffect.features.base import Backbone, BackboneOutput, BackboneSpec
from mtaffect.features.decode import decode_image, resize_array
from mtaffect.features.extract import KILL_AFTER_ENV, collect_images, extract
from mtaffect.features.store import FeatureStore, StoreError, partial_path
from mtaffect.io import OutputExistsError
from mtaffect.schema import NUM_AUS, OFFICIAL_HEADER, TEST_LIST_NAMES, TRAIN_ANNOTATIONS, VAL_ANNOTATIONS

TESTS = Path(__file__).resolve().parent
ARRAYS = ("features.npy", "logits.npy", "valid.npy", "images.txt", "failed.csv")
#: Small chunks that batches do not divide (4 = 3 + 1): several chunks and ragged batches in 18 images.
RUN = {"chunk_size": 4, "batch_size": 3, "workers": 0, "progress": False, "threads": 1}


class TinyBackbone(Backbone):
    """Deterministic stand-in: a fixed random 3x3/2 conv, ReLU, mean pool; logits and 4x4 tokens."""

    def __init__(self, colour: str = "RGB", seed: int = 0, size: int = 16) -> None:
        super().__init__()
        cin = 3 if colour == "RGB" else 1
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(cin, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        tokens = (size // 4) ** 2
        self.spec = BackboneSpec(
            name=f"tiny-{colour}",
            input_size=size,
            colour=colour,
            mean=(0.5,) * cin,
            std=(0.25,) * cin,
            feature_dim=8,
            num_logits=3,
            logit_names=("a", "b", "c"),
            token_shape=(tokens, 8),
            config={"seed": seed},
        )
        self.eval()

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:
        fmap = torch.relu(self.conv(x))
        features = fmap.mean(dim=(2, 3))
        toks = nn.functional.avg_pool2d(fmap, 2).flatten(2).transpose(1, 2) if tokens else None
        return BackboneOutput(features=features, logits=self.head(features), tokens=toks)


def write_faces(root: Path, videos: int = 3, frames: int = 6, size: int = 40, seed: int = 0) -> list[str]:
    """Smooth random colour JPEGs in the official layout; returns their names (sorted)."""
    rng = np.random.default_rng(seed)
    names = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for v in range(videos):
        for f in range(1, frames + 1):
            a, b = rng.uniform(2, 8, 2)
            base = np.stack([np.sin(a * xx + c) * np.cos(b * yy - c) for c in (0.0, 1.0, 2.0)], -1)
            img = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            name = f"vid{v}/{f:05d}.jpg"
            (root / "cropped_aligned" / f"vid{v}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "cropped_aligned" / name, quality=90)
            names.append(name)
    return sorted(names)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("faces")
    return root, write_faces(root)


@pytest.fixture(scope="module")
def reference(faces, tmp_path_factory) -> Path:
    """An uninterrupted single-process run: what every other way of extracting must reproduce."""
    root, names = faces
    out = tmp_path_factory.mktemp("ref") / "store"
    extract(root, TinyBackbone(), out, images=names, **RUN)
    return out


def same_files(a: Path, b: Path, files=ARRAYS) -> None:
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_store_holds_the_backbone_outputs(faces, reference):
    root, names = faces
    store = FeatureStore.open(reference)
    assert list(store.images) == names and store.num_failed == 0
    assert store.meta["counts"] == {"images": len(names), "valid": len(names), "failed": 0}
    assert store.meta["preprocessing"]["size"] == 16 and store.meta["dtype"] == "float16"
    assert not partial_path(reference).exists()
    bb = TinyBackbone()
    pix = np.stack([decode_image(root / "cropped_aligned" / n, 16, "RGB") for n in names[:5]])
    with torch.inference_mode():
        ref = bb(bb.preprocess(pix))
    rows = store.rows(names[:5])
    np.testing.assert_allclose(store.features(rows), ref.features.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store.logits(rows), ref.logits.numpy(), rtol=2e-3, atol=2e-3)
    store.check_compatible(bb.spec.fingerprint())


def test_greyscale_backbone_decodes_luma(faces, tmp_path):
    """An "L" backbone gets the JPEG's luma plane; features match converting the decoded RGB to grey."""
    root, names = faces
    bb = TinyBackbone(colour="L")
    res = extract(root, bb, tmp_path / "grey", images=names[:6], batch_size=4, workers=0, progress=False)
    store = FeatureStore.open(res.store)
    rgb = np.stack([decode_image(root / "cropped_aligned" / n, 16, "RGB") for n in names[:6]])
    with torch.inference_mode():
        ref = bb(bb.preprocess(rgb)).features.numpy()
    np.testing.assert_allclose(store.features(np.arange(6)), ref, atol=0.05)


def test_in_memory_faces_are_resized_like_files(faces):
    """Prediction resizes in-memory crops with resize_array: the same pixels extraction decodes."""
    root, names = faces
    path = root / "cropped_aligned" / names[0]
    full = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(resize_array(full, 32, "RGB"), decode_image(path, 32, "RGB"))
    assert resize_array(full, 32, "L").shape == (32, 32)


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(faces, reference, tmp_path):
    root, names = faces
    out = tmp_path / "store"
    (tmp_path / "names.json").write_text(json.dumps(names))
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_extract import TinyBackbone; from mtaffect.features.extract import extract;"
        "names = json.load(open(sys.argv[4]));"
        "from test_extract import RUN; extract(sys.argv[2], TinyBackbone(), sys.argv[3], images=names, **RUN)"
    )
    env = {**os.environ, KILL_AFTER_ENV: "2"}
    cmd = [sys.executable, "-c", script, str(TESTS), str(root), str(out), str(tmp_path / "names.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and partial_path(out).is_dir()
    with pytest.raises(StoreError, match="rerun the same extract command"):
        FeatureStore.open(out)
    # Resumed with a decoding worker this time: the chunking, not the decoding setup, fixes the bytes.
    res = extract(root, TinyBackbone(), out, images=names, **{**RUN, "workers": 1})
    assert res.resumed_from == 8 and res.extracted == len(names) - 8 and res.images == len(names)
    same_files(reference, out)
    assert not partial_path(out).exists()


class FailingBackbone(TinyBackbone):
    """Raises on its third batch, like a run stopped by an error: the finished chunks must stay usable."""

    calls = 0

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("out of memory (simulated)")
        return super().forward(x, tokens)


def test_a_failed_run_resumes_and_refuses_another_backbone(faces, tmp_path):
    root, names = faces
    run = {**RUN, "chunk_size": 2, "batch_size": 2}
    for out in (tmp_path / "a", tmp_path / "b"):
        with pytest.raises(RuntimeError, match="simulated"):
            extract(root, FailingBackbone(seed=0), out, images=names[:6], **run)
        assert (
            len(json.loads((partial_path(out) / "progress" / "rank-00000.json").read_text())["chunks"]) == 2
        )
    res = extract(root, TinyBackbone(seed=0), tmp_path / "a", images=names[:6], **run)
    assert res.resumed_from == 4 and res.extracted == 2
    other = TinyBackbone(seed=1)
    with pytest.raises(StoreError, match=r"tiny-RGB.*fingerprint.*overwrite"):
        extract(root, other, tmp_path / "b", images=names[:6], **run)
    res = extract(root, other, tmp_path / "b", images=names[:6], **run, overwrite=True)
    assert res.resumed_from == 0 and FeatureStore.open(res.store).fingerprint == other.spec.fingerprint()


def test_failed_images_are_zero_invalid_and_reported(faces, tmp_path):
    root, names = faces
    data = tmp_path / "data"
    (data / "cropped_aligned" / "bad").mkdir(parents=True)
    for n in names[:4]:
        (data / "cropped_aligned" / n).parent.mkdir(parents=True, exist_ok=True)
        (data / "cropped_aligned" / n).write_bytes((root / "cropped_aligned" / n).read_bytes())
    blob = (root / "cropped_aligned" / names[0]).read_bytes()
    (data / "cropped_aligned" / "bad" / "00001.jpg").write_bytes(blob[: len(blob) // 2])  # truncated
    (data / "cropped_aligned" / "bad" / "00002.jpg").write_bytes(b"")  # empty
    wanted = [*names[:4], "bad/00001.jpg", "bad/00002.jpg", "bad/00003.jpg"]  # 00003: missing
    res = extract(data, TinyBackbone(), tmp_path / "s", images=wanted, **{**RUN, "workers": 1})
    assert res.failed == 3 and res.images == 7 and res.extracted == 7
    store = FeatureStore.open(res.store)
    assert store.valid(np.arange(7)).tolist() == [True] * 4 + [False] * 3
    bad = store.rows(wanted[4:])
    assert not store.features(bad).any() and not store.logits(bad).any()
    assert store.features(store.rows(wanted[:4])).any(axis=1).all()
    failures = dict(store.failures())
    assert set(failures) == set(wanted[4:])
    assert failures["bad/00003.jpg"] == "missing file"
    assert "truncated" in failures["bad/00001.jpg"] and failures["bad/00002.jpg"] == "not a readable image"
    assert (res.failed_report.read_text().splitlines()[0]) == "image,reason"


def test_overwrite_protection(faces, tmp_path):
    root, names = faces
    out = tmp_path / "store"
    kw = {"images": names[:4], "workers": 0, "progress": False}
    first = extract(root, TinyBackbone(), out, **kw)
    with pytest.raises(OutputExistsError, match="overwrite"):
        extract(root, TinyBackbone(), out, **kw)
    res = extract(root, TinyBackbone(seed=3), out, overwrite=True, **kw)
    assert res.store == first.store and FeatureStore.open(out).meta["spec"]["config"] == {"seed": 3}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a feature store"):
        extract(root, TinyBackbone(), tmp_path / "notes", overwrite=True, **kw)
    assert (tmp_path / "notes" / "mine.txt").exists()


def test_trust_remote_code_builds_a_named_backbone_and_is_never_recorded(faces, tmp_path):
    from mtaffect.features.registry import register_backbone

    calls = []

    @register_backbone("test-extract-trusting")
    def make(seed: int = 0, trust_remote_code: bool = False) -> Backbone:
        calls.append({"seed": seed, "trust_remote_code": trust_remote_code})
        return TinyBackbone(seed=seed)

    root, names = faces
    res = extract(
        root,
        "test-extract-trusting",
        tmp_path / "s",
        images=names[:4],
        workers=0,
        progress=False,
        backbone_kwargs={"seed": 2},
        trust_remote_code=True,
    )
    assert calls == [{"seed": 2, "trust_remote_code": True}]
    assert FeatureStore.open(res.store).meta["backbone_kwargs"] == {"seed": 2}
    with pytest.raises(ValueError, match="applies to hub backbones"):  # a flag that means nothing here
        extract(root, "fer-minixception", tmp_path / "t", images=names[:4], workers=0, trust_remote_code=True)


def test_cli_backbone_options_with_trust_remote_code_are_one_error_line(tmp_path):
    """--backbone-arg with --trust-remote-code: an option the backbone does not take is an error line
    (it was a TypeError traceback: the CLI built the backbone outside extract's check)."""
    from typer.testing import CliRunner

    from mtaffect.cli import app
    from mtaffect.data.synth import SynthConfig, generate

    generate(tmp_path / "data", SynthConfig(videos=3, frames=4, seed=1))
    result = CliRunner().invoke(
        app,
        [
            "extract",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "st"),
            "--workers",
            "0",
            "--backbone",
            f"hf:{tmp_path / 'vit'}",
            "--trust-remote-code",
            "--backbone-arg",
            "bogus=1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "error: backbone 'hf:" in result.output and "does not take the option bogus" in result.output
    assert not (tmp_path / "st").exists()


def test_tokens_option(faces, tmp_path):
    root, names = faces
    res = extract(
        root, TinyBackbone(), tmp_path / "t", images=names[:5], tokens=True, workers=0, progress=False
    )
    store = FeatureStore.open(res.store)
    assert store.has_tokens and store.token_shape == (16, 8)
    toks = store.tokens([0, 4])
    assert toks.shape == (2, 16, 8) and toks.dtype == np.float32
    # The pooled features are the mean of the (2x2-pooled) token map.
    np.testing.assert_allclose(toks.mean(axis=1), store.features([0, 4]), atol=5e-3)
    plain = FeatureStore.open(
        extract(root, TinyBackbone(), tmp_path / "p", images=names[:2], workers=0, progress=False).store
    )
    with pytest.raises(StoreError, match="--tokens"):
        plain.tokens([0])


def _rank_main(rank: int, world: int, port: int, root: str, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    res = extract(root, TinyBackbone(), out, images=names, **RUN)
    assert res.images == len(names) and res.extracted == len(names)


@pytest.mark.slow
def test_two_ranks_equal_one(faces, reference, tmp_path):
    """torchrun-style sharding (RANK/WORLD_SIZE/MASTER_ADDR, gloo): the merged store equals one process."""
    root, names = faces
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "store"
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(root), str(out), names), nprocs=2, join=True)
    same_files(reference, out)
    assert FeatureStore.open(out).meta["world_size"] == 2


def test_collect_images_from_official_layout(tmp_path):
    aus = ",".join(["0"] * NUM_AUS)
    (tmp_path / TRAIN_ANNOTATIONS).write_text(
        f"{OFFICIAL_HEADER}\nb/00002.jpg,0.1,0.2,3,{aus}\na/00001.jpg,-5,-5,-1,{aus}\n"
    )
    (tmp_path / VAL_ANNOTATIONS).write_text(f"{OFFICIAL_HEADER}\nc/00001.jpg,0.3,0.1,1,{aus}\n")
    (tmp_path / TEST_LIST_NAMES[0]).write_text("image\nd/00007.jpg\na/00001.jpg\n")
    assert collect_images(tmp_path) == ["a/00001.jpg", "b/00002.jpg", "c/00001.jpg", "d/00007.jpg"]
    assert collect_images(tmp_path, ["val"]) == ["c/00001.jpg"]
    with pytest.raises(ValueError, match="unknown split"):
        collect_images(tmp_path, ["dev"])
    (tmp_path / TEST_LIST_NAMES[0]).unlink()
    with pytest.raises(FileNotFoundError, match="--split train,val"):
        collect_images(tmp_path)


def test_bad_arguments(faces, tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    root, names = faces
    with pytest.raises(ValueError, match="has no tokens"):
        bb = TinyBackbone()
        bb.spec = dataclasses.replace(bb.spec, token_shape=None)
        extract(root, bb, tmp_path / "x", images=names[:2], tokens=True, workers=0, progress=False)
    with pytest.raises(StoreError, match="line breaks"):
        extract(root, TinyBackbone(), tmp_path / "x", images=["a\nb.jpg"], workers=0, progress=False)
    with pytest.raises(ValueError, match="torchrun"):
        extract(root, TinyBackbone(), tmp_path / "x", images=names[:2], rank=0, world_size=2, progress=False)


def test_registry_backbone_on_a_synthetic_set(tmp_path):
    """What `mtaffect extract` does: the default backbone by name over every split of a dataset root."""
    from mtaffect.data.synth import SynthConfig, generate

    root = generate(tmp_path / "data", SynthConfig(videos=4, frames=8, seed=1)).root
    res = extract(root, "fer-minixception", tmp_path / "fer", workers=0, progress=False, threads=1)
    store = FeatureStore.open(res.store)
    assert list(store.images) == collect_images(root) and res.failed == 0 and res.extracted == len(store)
    assert store.backbone == "fer-minixception" and store.feature_dim == 128 and store.num_logits == 7
    assert store.meta["preprocessing"]["decode"] == "JPEG luma plane"
    assert np.isfinite(store.features(np.arange(len(store)))).all() and store.valid(slice(None)).all()
    assert "0 failed" in res.summary()


def test_hub_backbones_extract_into_a_store(faces, tmp_path):
    """The two hub families go through the same extraction path: a random-init DINOv2 with tokens,
    and an EmotiEffLib-style ONNX model (a tiny graph built here) by path."""
    pytest.importorskip("transformers")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from mtaffect.features.registry import create_backbone

    root, names = faces
    dino = create_backbone(
        "dinov2-small",
        image_size=28,
        config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "patch_size": 14,
            "image_size": 28,
        },
    )
    res = extract(root, dino, tmp_path / "dino", images=names, tokens=True, **RUN)
    store = FeatureStore.open(res.store)
    assert store.has_tokens and store.tokens([0]).shape == (1, 4, 16)  # 28 px / 14 = 2x2 patches
    pix = np.stack([decode_image(root / "cropped_aligned" / n, 28, "RGB") for n in names[:3]])
    with torch.inference_mode():
        direct = dino(dino.preprocess(pix)).features.numpy()
    np.testing.assert_allclose(store.features(np.arange(3)), direct, rtol=2e-3, atol=2e-3)  # float16

    rng = np.random.default_rng(0)
    init = {
        "w1": rng.normal(size=(6, 3)),
        "b1": rng.normal(size=6),
        "w2": rng.normal(size=(10, 6)),
        "b2": rng.normal(size=10),
    }
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["f"]),
            helper.make_node("Gemm", ["f", "w1", "b1"], ["h0"], transB=1),
            helper.make_node("Relu", ["h0"], ["h"]),
            helper.make_node("Gemm", ["h", "w2", "b2"], ["scores"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "tiny.onnx"))
    ort = create_backbone(f"emotiefflib:{tmp_path / 'tiny.onnx'}", mean=(0.5,) * 3, std=(0.5,) * 3)
    res = extract(root, ort, tmp_path / "onnx", images=names, **RUN)
    store = FeatureStore.open(res.store)
    assert (store.feature_dim, store.num_logits) == (6, 10) and store.valid(np.arange(len(names))).all()
    pix = np.stack([decode_image(root / "cropped_aligned" / n, 32, "RGB") for n in names[:3]])
    x = (pix / 255.0 - 0.5) / 0.5
    hidden = np.maximum(x.mean(axis=(1, 2)) @ init["w1"].T + init["b1"], 0.0)
    np.testing.assert_allclose(store.features(np.arange(3)), hidden, rtol=2e-3, atol=2e-3)
    logits = hidden @ init["w2"].T + init["b2"]
    np.testing.assert_allclose(store.logits(np.arange(3)), logits, rtol=2e-3, atol=5e-3)


# ---- nothing deleted that extraction did not create; names stay inside the root (issue 12) -----------------
def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "mine.txt").write_text("keep me")
    return path


def test_folders_it_did_not_create_are_left_alone(faces, tmp_path):
    from mtaffect.features.extract import OWNER_MARKER

    root, names = faces
    out = tmp_path / "store"
    kw = {"images": names[:4], "workers": 0, "progress": False}
    kept = [_user_folder(tmp_path / f"store{s}") for s in (".replaced", ".partial.tmp")]
    odd = _user_folder(tmp_path / ".store.partial.abc.tmp")  # our naming pattern, but no marker
    ours = tmp_path / ".store.partial.dead.tmp"  # a preparation folder of a run that died
    ours.mkdir()
    (ours / OWNER_MARKER).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=r"\.store\.partial\.abc\.tmp .*no .mtaffect-extract marker"):
        extract(root, TinyBackbone(), out, **kw)
    with pytest.warns(UserWarning, match="left alone"):  # swaps the old store out and deletes it
        extract(root, TinyBackbone(seed=2), out, overwrite=True, **kw)
    for folder in (*kept, odd):
        assert (folder / "mine.txt").read_text() == "keep me"
    assert not ours.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["store", "store.replaced", "store.partial.tmp", ".store.partial.abc.tmp"]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([*ARRAYS, "meta.json"])  # no marker left
    users = _user_folder(partial_path(tmp_path / "other"))
    with pytest.raises(StoreError, match=r"other.partial exists but was not created by mtaffect extract"):
        extract(root, TinyBackbone(), tmp_path / "other", overwrite=True, **kw)
    assert (users / "mine.txt").read_text() == "keep me"


def test_overwrite_never_discards_a_running_extraction(faces, tmp_path):
    """--overwrite discards an unfinished extraction of another job, but not one a live process writes."""
    from mtaffect.features.extract import OWNER_MARKER

    root, names = faces
    out = tmp_path / "store"
    run = {**RUN, "chunk_size": 2, "batch_size": 2}
    with pytest.raises(RuntimeError, match="simulated"):
        extract(root, FailingBackbone(seed=0), out, images=names[:6], **run)
    partial = partial_path(out)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        marker = json.loads((partial / OWNER_MARKER).read_text())
        (partial / OWNER_MARKER).write_text(json.dumps({**marker, "pid": live.pid}))
        before = sorted(p.name for p in partial.rglob("*"))
        with pytest.raises(StoreError, match=rf"belongs to a running extraction \(pid {live.pid}"):
            extract(root, TinyBackbone(seed=1), out, images=names[:6], overwrite=True, **run)
        assert sorted(p.name for p in partial.rglob("*")) == before
    finally:
        live.kill()
        live.wait()
    res = extract(root, TinyBackbone(seed=1), out, images=names[:6], overwrite=True, **run)  # owner gone
    assert res.resumed_from == 0 and not partial.exists()


_HOLD_LOCK = """
import os, sys, time
from pathlib import Path
from mtaffect.features.extract import _shard_lock
partial = Path(sys.argv[1])
with _shard_lock(partial, 0):
    child = os.fork()  # like a DataLoader worker: inherits the open lock file
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_the_shard_lock_names_its_holder_and_dies_with_it(tmp_path):
    from mtaffect.features.extract import _shard_lock

    partial = tmp_path / "store.partial"
    (partial / "progress").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(partial)], stdout=subprocess.PIPE, text=True
    )
    worker = int(holder.stdout.readline())
    try:
        with (
            pytest.raises(StoreError, match=rf"another extraction \(pid {holder.pid}\) .* wait for it"),
            _shard_lock(partial, 0),
        ):
            pass
        holder.kill()  # SIGKILL: the forked worker lives on with the inherited descriptor
        holder.wait()
        os.kill(worker, 0)  # still alive
        with _shard_lock(partial, 0):  # yet the lock went with its process
            pass
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_names_outside_the_dataset_are_refused(faces, tmp_path):
    root, names = faces
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(secret / "00001.jpg")
    for bad in ("../../secret/00001.jpg", str(secret / "00001.jpg")):
        with pytest.raises(ValueError, match="may not leave it"):
            extract(root, TinyBackbone(), tmp_path / "s", images=[names[0], bad], **RUN)
    data = tmp_path / "data"
    (data / "cropped_aligned").mkdir(parents=True)
    aus = ",".join(["0"] * NUM_AUS)
    (data / TRAIN_ANNOTATIONS).write_text(f"{OFFICIAL_HEADER}\n../../secret/00001.jpg,0.1,0.2,3,{aus}\n")
    with pytest.raises(ValueError, match=rf"{TRAIN_ANNOTATIONS}:2: image name has a '..' part"):
        extract(data, TinyBackbone(), tmp_path / "s", splits=("train",), **RUN)
    assert not (tmp_path / "s").exists() and not partial_path(tmp_path / "s").exists()


# ---- high bit depth (issue 12) -----------------------------------------------------------------------------
def test_16_bit_greyscale_is_scaled_not_clipped(faces, tmp_path):
    from mtaffect.features.decode import ImageDepthError
    from mtaffect.predict.sources import InputError, read_image

    root, names = faces
    grey8 = np.asarray(Image.open(root / "cropped_aligned" / names[0]).convert("L"))
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # same image, 16 bits
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    for mode in ("L", "RGB"):
        a = decode_image(tmp_path / "g8.png", 24, mode).astype(int)
        b = decode_image(tmp_path / "g16.png", 24, mode).astype(int)
        assert np.abs(a - b).max() <= 1
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png"), read_image(tmp_path / "g8.png"))
    Image.fromarray(grey8.astype(np.float32) / 255).save(tmp_path / "float.tif")  # a 32-bit float image
    with pytest.raises(ImageDepthError, match="32-bit float image"):
        decode_image(tmp_path / "float.tif", 24, "RGB")
    with pytest.raises(InputError, match=r"float.tif: not a readable image .*32-bit float"):
        read_image(tmp_path / "float.tif")


# ---- issue 20: 8-bit values in a 32-bit container; special files where an image is expected --------------
def test_mode_i_image_of_8_bit_values_is_not_scaled_as_16_bit(faces, tmp_path):
    """A PIL mode "I" image (e.g. an integer TIFF) holding 0..255 is that 8-bit image, not a black one."""
    from mtaffect.predict.sources import read_image

    root, names = faces
    grey8 = np.asarray(Image.open(root / "cropped_aligned" / names[0]).convert("L"))
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.int32)).save(tmp_path / "i8.tif")
    Image.fromarray(grey8.astype(np.int32) * 257).save(tmp_path / "i16.tif")  # 16-bit values in "I"
    assert Image.open(tmp_path / "i8.tif").mode == "I" and Image.open(tmp_path / "i16.tif").mode == "I"
    for mode in ("L", "RGB"):
        a = decode_image(tmp_path / "g8.png", 24, mode).astype(int)
        for other in ("i8.tif", "i16.tif"):
            assert np.abs(decode_image(tmp_path / other, 24, mode).astype(int) - a).max() <= 1, other
    np.testing.assert_array_equal(read_image(tmp_path / "i8.tif"), read_image(tmp_path / "g8.png"))
    np.testing.assert_array_equal(read_image(tmp_path / "i16.tif"), read_image(tmp_path / "g8.png"))


@contextlib.contextmanager
def _fails_instead_of_hanging(seconds: int = 60):
    """Turn a hang (a blocked open of a FIFO) into a test failure after ``seconds``."""

    def hung(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def _with_a_fifo(faces, data: Path, n: int, fifo: str) -> list[str]:
    """A dataset root ``data`` holding the first ``n`` face crops of ``faces`` and a named pipe at image
    name ``fifo``: the image names to extract, the pipe last."""
    root, names = faces
    for name in [*names[:n], fifo]:
        (data / "cropped_aligned" / name).parent.mkdir(parents=True, exist_ok=True)
    for name in names[:n]:
        (data / "cropped_aligned" / name).write_bytes((root / "cropped_aligned" / name).read_bytes())
    os.mkfifo(data / "cropped_aligned" / fifo)
    return [*names[:n], fifo]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_fifo_or_socket_named_like_an_image_is_a_failed_row_not_a_hang(faces, tmp_path):
    data = tmp_path / "data"
    wanted = [*_with_a_fifo(faces, data, 3, "odd/00001.jpg"), "odd/00002.jpg"]
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(data / "cropped_aligned" / "odd" / "00002.jpg"))
        with _fails_instead_of_hanging():
            res = extract(data, TinyBackbone(), tmp_path / "s", images=wanted, **RUN)
    finally:
        sock.close()
    assert res.failed == 2 and res.extracted == 5
    failures = dict(FeatureStore.open(res.store).failures())
    assert failures == {
        "odd/00001.jpg": "not a regular file: a FIFO (named pipe)",
        "odd/00002.jpg": "not a regular file: a socket",
    }
    assert "odd/00001.jpg,not a regular file: a FIFO (named pipe)" in res.failed_report.read_text()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_infer_from_images_counts_a_fifo_as_unreadable(faces, tmp_path):
    """`infer --data`: a FIFO in the list is an unreadable image (an error naming it, or valid = 0)."""
    from cli_helpers import invoke
    from model_helpers import checkpoint

    data = tmp_path / "data"
    wanted = _with_a_fifo(faces, data, 4, "vid9/00001.jpg")
    (tmp_path / "list.txt").write_text("\n".join(wanted) + "\n")
    model = checkpoint(tmp_path / "ckpt", "emotinet")
    base = ("infer", "--model", model, "--data", data, "--images", tmp_path / "list.txt", "--workers", 0)
    with _fails_instead_of_hanging():  # decoded in this process: a blocked open is interrupted
        result = invoke(*base, "--out", tmp_path / "a.parquet")
    output = result.output
    assert result.exit_code == 2, output
    assert "1 of 5 images could not be read" in " ".join(output.split())
    assert "vid9/00001.jpg" in output and not (tmp_path / "a.parquet").exists()
    with _fails_instead_of_hanging():
        result = invoke(*base, "--out", tmp_path / "b.parquet", "--allow-missing")
    assert result.exit_code == 0, result.output
    from mtaffect.data.predictions import PredictionTable

    assert PredictionTable.read(tmp_path / "b.parquet").frame["valid"].tolist() == [1, 1, 1, 1, 0]


# ---- one ownership rule (issue 20, cases 1, 4 and 16) ------------------------------------------------------
def test_overwrite_never_deletes_a_users_folder_that_holds_a_meta_json(faces, tmp_path):
    """`extract --out u --overwrite` deleted u/thesis.tex because u held a text file named meta.json."""
    root, names = faces
    users = tmp_path / "u"
    users.mkdir()
    (users / "meta.json").write_text("notes\n")
    (users / "thesis.tex").write_text("thesis")
    kw = {**RUN, "images": names[:4]}
    with pytest.raises(
        OutputExistsError,
        match=r"u is not a feature store written by mtaffect \(it holds "
        r"meta.json, thesis.tex\); .* even with --overwrite",
    ):
        extract(root, TinyBackbone(), users, overwrite=True, **kw)
    store = tmp_path / "store"
    extract(root, TinyBackbone(), store, **kw)
    (store / "notes.txt").write_text("a user's note inside a store")
    with pytest.raises(OutputExistsError, match=r"also holds notes.txt, which mtaffect did not write"):
        extract(root, TinyBackbone(seed=1), store, overwrite=True, **kw)
    assert (users / "thesis.tex").read_text() == "thesis" and (store / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "u"]


def test_a_link_to_a_store_is_extracted_through_and_stays_a_link(faces, tmp_path):
    """`extract --out LINK --overwrite` failed half-way ("Cannot call rmtree on a symbolic link")."""
    root, names = faces
    kw = {**RUN, "images": names[:4]}
    real, link = tmp_path / "real", tmp_path / "link"
    extract(root, TinyBackbone(), real, **kw)
    link.symlink_to(real)
    for seed in (3, 4):  # every later overwrite works too
        res = extract(root, TinyBackbone(seed=seed), link, overwrite=True, **kw)
        assert res.store == link and link.is_symlink() and link.resolve() == real.resolve()
        assert FeatureStore.open(link).meta["spec"]["config"] == {"seed": seed}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing hidden left
        assert sorted(p.name for p in real.iterdir()) == sorted([*ARRAYS, "meta.json"])  # no marker


def test_a_dataset_without_its_face_crops_is_an_error_not_a_store_of_failures(faces, tmp_path):
    names = faces[1]
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(FileNotFoundError, match=r"cropped_aligned: no such folder"):
        extract(data, TinyBackbone(), tmp_path / "s", images=names[:4], **RUN)
    (data / "cropped_aligned").write_text("a file, not a folder")
    with pytest.raises(FileNotFoundError, match=r"cropped_aligned: not a folder"):
        extract(data, TinyBackbone(), tmp_path / "s", images=names[:4], **RUN)
    (data / "cropped_aligned").unlink()
    (data / "cropped_aligned").mkdir()  # the folder, but none of the images
    with pytest.raises(StoreError, match=rf"every one of the 4 images failed \(e.g. {names[0]}: missing"):
        extract(data, TinyBackbone(), tmp_path / "s", images=names[:4], **RUN)
    assert not (tmp_path / "s").exists()
