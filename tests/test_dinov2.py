"""DINOv2 backbone on tiny random-init models (the hub weights are not available offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mtaffect.features.dinov2 import create_dinov2, published_config  # noqa: E402
from mtaffect.features.registry import create_backbone, list_backbones  # noqa: E402

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 518,  # as the published models: 37x37 position embeddings, interpolated
    "mlp_ratio": 2,
}


def _tiny_config():
    return transformers.Dinov2Config(**TINY)


def _images(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_registered_sizes():
    names = list_backbones()
    for size in ("small", "base", "large", "giant"):
        assert f"dinov2-{size}" in names
    giant = published_config("giant")
    assert (giant.hidden_size, giant.num_hidden_layers, giant.use_swiglu_ffn) == (1536, 40, True)


def test_238_input_gives_289_tokens_and_cls_mean_features():
    bb = create_backbone("dinov2-small", config=_tiny_config(), image_size=238)
    spec = bb.spec
    assert spec.input_size == 238 and spec.token_shape == (289, 32) and spec.feature_dim == 64
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert spec.colour == "RGB" and spec.config["weights"] == "random-init"
    x = bb.preprocess(_images(2, 238))
    with torch.no_grad():
        out = bb(x, tokens=True)
        hidden = bb.model(pixel_values=x).last_hidden_state
    assert out.tokens.shape == (2, 289, 32) and out.features.shape == (2, 64)
    torch.testing.assert_close(out.features[:, :32], hidden[:, 0])
    torch.testing.assert_close(out.features[:, 32:], hidden[:, 1:].mean(1))
    torch.testing.assert_close(out.tokens, hidden[:, 1:])
    assert bb(x).tokens is None


def test_random_init_is_seeded_and_fingerprinted():
    a = create_dinov2("small", config=TINY, image_size=224, seed=0)
    b = create_dinov2("small", config=TINY, image_size=224, seed=0)
    c = create_dinov2("small", config=TINY, image_size=224, seed=1)
    x = a.preprocess(_images(1, 224))
    with torch.no_grad():
        torch.testing.assert_close(a(x).features, b(x).features)
        assert not torch.allclose(a(x).features, c(x).features)
    assert a.spec.fingerprint() == b.spec.fingerprint() != c.spec.fingerprint()
    assert a.spec.token_shape == (256, 32)


def test_bad_image_size_and_conflicting_args():
    with pytest.raises(ValueError, match="multiple of the patch 14"):
        create_dinov2("small", config=TINY, image_size=230)
    with pytest.raises(ValueError, match="either weights"):
        create_dinov2("small", config=TINY, weights="facebook/dinov2-small")
    with pytest.raises(ValueError, match="unknown DINOv2 size"):
        create_dinov2("huge", config=TINY)


def test_local_folder_and_safetensors_file_load_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    reference = transformers.Dinov2Model(_tiny_config()).eval()
    folder = tmp_path / "dino"
    reference.save_pretrained(folder)

    bb = create_backbone("dinov2-small", weights=str(folder), image_size=238)
    x = bb.preprocess(_images(3, 238))
    with torch.no_grad():
        want = reference(pixel_values=x).last_hidden_state
        got = bb(x, tokens=True)
    torch.testing.assert_close(got.tokens, want[:, 1:])
    cfg = bb.spec.config
    assert cfg["weights"] == str(folder.resolve())
    assert len(cfg["config_sha256"]) == 64 and set(cfg["weights_sha256"]) == {"model.safetensors"}

    # The weights file alone (config.json beside it) gives the same features and the same hash.
    single = create_dinov2("small", weights=str(folder / "model.safetensors"), image_size=238)
    with torch.no_grad():
        torch.testing.assert_close(single(x).features, got.features)
    assert single.spec.config["weights_sha256"] == cfg["weights_sha256"]["model.safetensors"]

    # Retrained weights in the same folder: a different fingerprint, so a feature store never mixes them.
    torch.manual_seed(1)
    transformers.Dinov2Model(_tiny_config()).save_pretrained(folder)
    other = create_backbone("dinov2-small", weights=str(folder), image_size=238)
    assert other.spec.fingerprint() != bb.spec.fingerprint()


def test_half_precision_returns_float32_features():
    bb = create_dinov2("small", config=TINY, dtype="bfloat16")
    assert bb.spec.config["dtype"] == "bfloat16"
    out = bb(bb.preprocess(_images(2, 224)), tokens=True)
    assert out.features.dtype == torch.float32 and out.tokens.dtype == torch.float32


def test_missing_hub_weights_offline_say_how_to_get_them(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        create_backbone("dinov2-small")
    except OSError as e:
        assert "huggingface-cli download facebook/dinov2-small" in str(e)
        assert "local folder" in str(e)
    else:  # pragma: no cover - only where the real weights are in the hub cache
        pytest.skip("facebook/dinov2-small is in the local hub cache")


def test_not_a_dinov2_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="save_pretrained"):
        create_dinov2("small", weights=str(tmp_path / "empty"))
    bad = tmp_path / "w.bin"
    bad.write_bytes(b"\0")
    with pytest.raises(ValueError, match="safetensors"):
        create_dinov2("small", weights=str(bad))
