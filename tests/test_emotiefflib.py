"""EmotiEffLib ONNX backbone, on tiny graphs built here (the published files are not available offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mtaffect.features.emotiefflib import (  # noqa: E402
    AFFECTNET_NAMES,
    AFFECTNET_TO_ABAW,
    MODELS,
    create_emotiefflib,
    to_abaw_expression_probs,
)
from mtaffect.schema import EXPR_NAMES  # noqa: E402

SIZE, HIDDEN, OUT = 112, 16, 10


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(HIDDEN, 3)).astype(np.float32),
        "b1": rng.normal(size=HIDDEN).astype(np.float32),
        "w2": rng.normal(size=(OUT, HIDDEN)).astype(np.float32),
        "b2": rng.normal(size=OUT).astype(np.float32),
    }


def _save_graph(path, w, *, batch="N", two_outputs=False) -> None:
    """input (N,3,112,112) -> GlobalAveragePool -> Flatten -> Gemm(16) -> Relu -> Gemm(10)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["fc1"], transB=1),
        helper.make_node("Relu", ["fc1"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["scores"], transB=1),
    ]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, OUT])]
    if two_outputs:
        outputs.insert(0, helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [batch, HIDDEN]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        outputs,
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _by_hand(images: np.ndarray, w, mean, std) -> tuple[np.ndarray, np.ndarray]:
    x = (images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    gap = x.mean(axis=(1, 2))  # (N, 3), images are NHWC
    hidden = np.maximum(gap @ w["w1"].T + w["b1"], 0.0)
    return hidden, hidden @ w["w2"].T + w["b2"]


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture
def tiny(tmp_path):
    w = _weights()
    f = tmp_path / "tiny.onnx"
    _save_graph(f, w)
    return f, w


@pytest.mark.parametrize("n", [1, 5])
def test_path_load_features_are_the_hidden_activation(tiny, n):
    f, w = tiny
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    bb = create_emotiefflib(str(f), mean=mean, std=std)
    assert bb.spec.input_size == SIZE  # read from the graph input
    assert (bb.spec.feature_dim, bb.spec.num_logits) == (HIDDEN, OUT)
    imgs = _images(n)
    out = bb(bb.preprocess(imgs))
    hidden, scores = _by_hand(imgs, w, mean, std)
    assert out.features.shape == (n, HIDDEN) and out.logits.shape == (n, OUT)
    assert out.features.dtype == torch.float32
    np.testing.assert_allclose(out.features.numpy(), hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logits.numpy(), scores, rtol=1e-4, atol=1e-4)


def test_known_name_from_cache_uses_published_settings(tmp_path, monkeypatch):
    w = _weights(3)
    cache = tmp_path / "cache"
    cache.mkdir()
    _save_graph(cache / "mbf_va_mtl.onnx", w)
    monkeypatch.setenv("EMOTIEFFLIB_HOME", str(cache))
    from mtaffect.features.registry import create_backbone

    with pytest.warns(UserWarning, match="512"):  # published mbf has 512 features, ours 16
        bb = create_backbone("emotiefflib:mbf_va_mtl")
    spec = bb.spec
    assert spec.name == "emotiefflib:mbf_va_mtl"
    assert (spec.input_size, spec.mean, spec.std, spec.colour) == (112, (0.5,) * 3, (0.5,) * 3, "RGB")
    assert spec.logit_names == (*AFFECTNET_NAMES, "valence", "arousal")
    assert spec.token_shape is None
    imgs = _images(5, seed=2)
    out = bb(bb.preprocess(imgs))
    hidden, scores = _by_hand(imgs, w, (0.5,) * 3, (0.5,) * 3)  # mean = std = 0.5 actually applied
    np.testing.assert_allclose(out.features.numpy(), hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logits.numpy(), scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no tokens"):
        bb(bb.preprocess(imgs), tokens=True)

    # The same file given as a path is the same backbone: same fingerprint.
    with pytest.warns(UserWarning):
        again = create_emotiefflib(str(cache / "mbf_va_mtl.onnx"))
    assert again.spec.fingerprint() == spec.fingerprint()
    # Other weights under the same name are not.
    _save_graph(tmp_path / "mbf_va_mtl.onnx", _weights(4))
    with pytest.warns(UserWarning):
        other = create_emotiefflib("mbf_va_mtl", path=tmp_path)
    assert other.spec.fingerprint() != spec.fingerprint()


def test_missing_model_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTIEFFLIB_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as e:
        create_emotiefflib("enet_b0_8_va_mtl")
    msg = str(e.value)
    assert str(tmp_path) in msg and ".emotiefflib" in msg and "path=" in msg


def test_known_model_with_wrong_score_count_is_refused(tmp_path):
    _save_graph(tmp_path / "enet_b2_7.onnx", _weights())  # 10 scores, enet_b2_7 has 7
    with pytest.raises(ValueError, match="7"):
        create_emotiefflib("enet_b2_7", path=tmp_path, input_size=SIZE)


def test_unknown_model_requires_normalisation(tiny):
    with pytest.raises(ValueError, match="mean= and std="):
        create_emotiefflib(str(tiny[0]))


def test_two_output_model_and_fixed_batch_graph(tmp_path):
    w = _weights(5)
    f = tmp_path / "two.onnx"
    _save_graph(f, w, batch=1, two_outputs=True)  # exported with batch 1: run image by image
    bb = create_emotiefflib(str(f), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert bb.spec.config["feature_output"] == "hidden"
    assert bb.spec.config["logit_output"] == "scores"
    imgs = _images(3, seed=7)
    out = bb(bb.preprocess(imgs))
    hidden, scores = _by_hand(imgs, w, (0.5,) * 3, (0.5,) * 3)
    np.testing.assert_allclose(out.features.numpy(), hidden, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logits.numpy(), scores, rtol=1e-4, atol=1e-4)


def test_affectnet_order_and_abaw_mapping():
    assert AFFECTNET_NAMES == (
        "Anger",
        "Contempt",
        "Disgust",
        "Fear",
        "Happiness",
        "Neutral",
        "Sadness",
        "Surprise",
    )
    assert [EXPR_NAMES[i] for i in AFFECTNET_TO_ABAW] == [
        "Anger",
        "Other",
        "Disgust",
        "Fear",
        "Happiness",
        "Neutral",
        "Sadness",
        "Surprise",
    ]
    assert MODELS["enet_b2_7"].logit_names[:3] == ("Anger", "Disgust", "Fear")
    names = MODELS["enet_b0_8_va_mtl"].logit_names
    logits = torch.zeros(2, 10)
    logits[0, AFFECTNET_NAMES.index("Contempt")] = 10.0
    logits[1, AFFECTNET_NAMES.index("Happiness")] = 10.0
    logits[:, 8:] = 100.0  # valence/arousal never enter the softmax
    p = to_abaw_expression_probs(logits, names)
    assert p.shape == (2, 8)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    assert p[0].argmax() == EXPR_NAMES.index("Other") and p[0].max() > 0.99
    assert p[1].argmax() == EXPR_NAMES.index("Happiness")
    p7 = to_abaw_expression_probs(torch.zeros(1, 7), MODELS["enet_b2_7"].logit_names)
    assert p7[0, EXPR_NAMES.index("Other")] == 0.0
    torch.testing.assert_close(p7.sum(), torch.tensor(1.0))
