"""`--model emotiefflib:<name>`: a zero-training model over EmotiEffLib's *_va_mtl outputs (tiny graphs)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mtaffect.features.base import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mtaffect.features.emotiefflib import AFFECTNET_NAMES, AFFECTNET_TO_ABAW  # noqa: E402
from mtaffect.features.registry import create_backbone  # noqa: E402
from mtaffect.models.emotiefflib import EmotiEffLibAffectModel  # noqa: E402
from mtaffect.schema import EXPR_NAMES  # noqa: E402

SIZE = 224
VA = (0.3, -0.4)
#: Red levels of the uniform test images; image k must be classified as AffectNet class k.
LEVELS = np.array([20 + 30 * k for k in range(8)], np.float64)


def _red_x(level: float) -> float:
    """The normalised red channel the backbone computes for a uniform image of this red level."""
    return (level / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]


def _save_va_mtl(path) -> None:
    """(N,3,224,224) -> mean colour -> 10 scores: class j scores 50 (2 c_j x - c_j^2) with x the red
    channel, i.e. the class whose centre c_j is nearest to x wins; valence/arousal are constant."""
    c = np.array([_red_x(v) for v in LEVELS])
    w = np.zeros((10, 3), np.float32)
    b = np.zeros(10, np.float32)
    w[:8, 0] = 50 * 2 * c
    b[:8] = -50 * c * c
    b[8:] = VA
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "va_mtl",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture
def va_mtl(tmp_path):
    f = tmp_path / "enet_b0_8_va_mtl.onnx"  # the published name: its settings (224, ImageNet) apply
    _save_va_mtl(f)
    return f


def test_each_affectnet_class_maps_to_its_abaw_class_through_the_graph(va_mtl):
    model = EmotiEffLibAffectModel(f"emotiefflib:{va_mtl}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny graph's 3 features are not the published 1280
        bb = create_backbone(model.backbone, **model.backbone_kwargs)
    images = np.zeros((8, SIZE, SIZE, 3), np.uint8)
    images[..., 0] = LEVELS[:, None, None]
    images[..., 1:] = 128
    with torch.inference_mode():
        out = bb(bb.preprocess(images))
        res = model.predict(out.features, out.logits)
    assert out.logits.shape == (8, 10)
    np.testing.assert_array_equal(out.logits[:, :8].argmax(1).numpy(), np.arange(8))  # the graph works
    got = res.expr_probs.argmax(1)
    want = [AFFECTNET_TO_ABAW[k] for k in range(8)]
    assert got.tolist() == want
    # by name: Contempt becomes Other, the others keep their names
    names = [EXPR_NAMES[i] for i in got]
    assert names[AFFECTNET_NAMES.index("Contempt")] == "Other"
    for k, n in enumerate(AFFECTNET_NAMES):
        if n != "Contempt":
            assert names[k] == n
    np.testing.assert_allclose(res.expr_probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(res.va, np.tile(VA, (8, 1)), atol=1e-5)  # the network's own VA
    # AUs from the priors, mixed by the expression distribution
    np.testing.assert_allclose(res.au_probs, res.expr_probs.astype(np.float64) @ model.p_au, atol=1e-5)


def test_predict_with_an_emotiefflib_model_end_to_end(va_mtl, tmp_path):
    pytest.importorskip("skimage")
    from mtaffect.predict import demo_media
    from mtaffect.predict.pipeline import Predictor

    frame = next(demo_media.frames(1, faces=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = Predictor(model=f"emotiefflib:{va_mtl}")
    df = p.predict(frame)
    faces = df[df["success"] == 1]
    assert len(faces) == 1
    np.testing.assert_allclose(faces[["valence", "arousal"]].to_numpy()[0], VA, atol=1e-5)
    assert p.model.card()["va"].startswith("the network's")


def test_a_missing_model_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTIEFFLIB_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    from mtaffect.predict.pipeline import Predictor

    with pytest.raises(FileNotFoundError, match=r"enet_b0_8_va_mtl\.onnx not found"):
        Predictor(model="emotiefflib:enet_b0_8_va_mtl")
