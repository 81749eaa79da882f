"""``hf:`` backbones on tiny random-init models saved to tmp folders, loaded offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import TINY_VIT, save_hf_folder

transformers = pytest.importorskip("transformers")

from mtaffect.features.hf import hub_commit, normalisation_from_processor, size_from_processor  # noqa: E402
from mtaffect.features.registry import create_backbone  # noqa: E402

PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.25, 0.3],
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _images(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_vit_folder_with_processor(tmp_path):
    torch.manual_seed(0)
    ref = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT)).eval()
    folder = save_hf_folder(ref, tmp_path / "vit", PROCESSOR)
    bb = create_backbone(f"hf:{folder}")
    spec = bb.spec
    assert spec.name == f"hf:{folder.resolve()}"
    assert spec.input_size == 32 and spec.colour == "RGB"
    np.testing.assert_allclose(spec.mean, PROCESSOR["image_mean"])
    np.testing.assert_allclose(spec.std, PROCESSOR["image_std"])
    assert spec.feature_dim == 32 and spec.token_shape == (16, 32)
    assert spec.config["pooling"] == "pooler" and spec.config["model_type"] == "vit"
    assert set(spec.config["weights_sha256"]) == {"model.safetensors"}

    imgs = _images(3, 32)
    x = bb.preprocess(imgs)
    mean, std = (torch.tensor(PROCESSOR[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
    want_x = (torch.from_numpy(imgs).permute(0, 3, 1, 2) / 255 - mean) / std
    torch.testing.assert_close(x, want_x)
    with torch.no_grad():
        got = bb(x, tokens=True)
        want = ref(pixel_values=x)
    torch.testing.assert_close(got.features, want.pooler_output)
    torch.testing.assert_close(got.tokens, want.last_hidden_state[:, 1:])  # CLS left out
    assert bb(x).tokens is None
    assert create_backbone(f"hf:{folder}").spec.fingerprint() == spec.fingerprint()


def test_checkpoint_without_pooler_is_mean_pooled(tmp_path):
    torch.manual_seed(0)
    ref = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT), add_pooling_layer=False).eval()
    folder = save_hf_folder(ref, tmp_path / "vit-nopool", PROCESSOR)
    bb = create_backbone(f"hf:{folder}")  # AutoModel adds a pooler, but its weights would be random
    assert bb.spec.config["pooling"] == "mean"
    x = bb.preprocess(_images(2, 32))
    with torch.no_grad():
        hidden = ref(pixel_values=x).last_hidden_state
        torch.testing.assert_close(bb(x).features, hidden[:, 1:].mean(1))
    with pytest.raises(ValueError, match="no \\(loaded\\) pooler"):
        create_backbone(f"hf:{folder}", pooling="pooler")


def test_no_processor_needs_explicit_normalisation_and_other_sizes_interpolate(tmp_path):
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT))
    folder = save_hf_folder(vit, tmp_path / "bare", processor=None)
    with pytest.raises(ValueError, match="mean= and std="):
        create_backbone(f"hf:{folder}")
    bb = create_backbone(f"hf:{folder}", image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3, pooling="cls")
    assert bb.spec.input_size == 48 and bb.spec.token_shape == (36, 32)  # 6x6 patches of 8
    out = bb(bb.preprocess(_images(2, 48)), tokens=True)
    assert out.features.shape == (2, 32) and out.tokens.shape == (2, 36, 32)


def test_convolutional_model_tokens_are_the_flattened_grid(tmp_path):
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3)
    torch.manual_seed(0)
    folder = save_hf_folder(transformers.ResNetModel(cfg), tmp_path / "resnet", PROCESSOR)
    bb = create_backbone(f"hf:{folder}")
    x = bb.preprocess(_images(2, 32))
    out = bb(x, tokens=True)
    assert out.features.shape == (2, 16)
    n, t, c = out.tokens.shape
    assert (n, c) == (2, 16) and bb.spec.token_shape == (t, 16)
    torch.testing.assert_close(out.features, out.tokens.mean(1), rtol=1e-5, atol=1e-5)  # avg-pool pooler


def test_vit_mae_sees_every_patch_in_order(tmp_path):
    cfg = transformers.ViTMAEConfig(**TINY_VIT)  # mask_ratio 0.75 as in pre-training
    torch.manual_seed(0)
    folder = save_hf_folder(transformers.ViTMAEModel(cfg), tmp_path / "mae", PROCESSOR)
    bb = create_backbone(f"hf:{folder}")
    assert bb.spec.token_shape == (16, 32) and bb.spec.config["pooling"] == "mean"
    x = bb.preprocess(_images(2, 32))
    a, b = bb(x, tokens=True), bb(x, tokens=True)
    torch.testing.assert_close(a.tokens, b.tokens)  # no random shuffling or masking


def test_processor_settings_are_converted():
    mean, std = normalisation_from_processor(
        {"rescale_factor": 1 / 127.5, "image_mean": 1.0, "image_std": 1.0}
    )
    np.testing.assert_allclose(mean, (0.5,) * 3)  # x/127.5 - 1 == (x/255 - 0.5) / 0.5
    np.testing.assert_allclose(std, (0.5,) * 3)
    assert normalisation_from_processor({"do_normalize": False}) == ((0.0,) * 3, (1.0,) * 3)
    assert (
        size_from_processor({"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": 224}) == 224
    )
    assert size_from_processor({"size": {"height": 224, "width": 224}}) == 224
    assert size_from_processor({"size": {"height": 224, "width": 160}}) is None


def test_missing_hub_model_offline_says_what_to_do():
    with pytest.raises(OSError, match="huggingface-cli download nobody/no-such-vit"):
        create_backbone("hf:nobody/no-such-vit")


def test_hub_models_are_fingerprinted_by_their_cached_commit(tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert hub_commit("org/tiny", None, cache_dir=tmp_path) == "abc123"
    assert hub_commit("org/absent", None, cache_dir=tmp_path) is None


def test_mean_std_overrides_are_checked_in_one_place_before_loading():
    from mtaffect.features.base import normalisation_override

    assert normalisation_override(None, None) is None
    assert normalisation_override([0.5], (0.25,)) == ((0.5,), (0.25,))
    with pytest.raises(ValueError, match="need 3 values each"):
        normalisation_override([0.5] * 2, [0.5] * 2, channels=3)
    with pytest.raises(ValueError, match="lists of numbers"):
        normalisation_override(0.5, 0.5)
    for name in ("dinov2-small", "hf:/no/such/model"):  # refused before any weights are looked for
        with pytest.raises(ValueError, match="pass both mean= and std="):
            create_backbone(name, mean=(0.5,) * 3)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"num_attention_heads": 3}, "num_attention_heads (3) must divide hidden_size (32)"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
        ({"hidden_size": "abc"}, "field 'hidden_size'"),
        ({"hidden_act": "nosuch"}, "hidden_act 'nosuch'"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_file_and_key(tmp_path, change, says):
    """A weights folder whose config.json cannot build the model: one line naming the file and the key
    (before: ZeroDivisionError / StrictDataclassFieldValidationError / KeyError tracebacks, or weights
    silently left out)."""
    import json

    from model_helpers import tiny_vit_folder

    folder = tiny_vit_folder(tmp_path / "vit")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError) as info:
        create_backbone(f"hf:{folder}")
    msg = str(info.value)
    assert says in msg and str(folder.resolve() / "config.json") in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"config\.json"):  # the same through weights= (a fine-tuned copy)
        create_backbone("hf:some/hub-id", weights=str(folder))
