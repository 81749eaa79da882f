"""`mtaffect convert-weights`: a timm-layout ViT state dict (.pth) round-trips into a transformers ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from mtaffect.cli import app  # noqa: E402
from mtaffect.features.convert import ConversionError, timm_vit_to_transformers  # noqa: E402
from mtaffect.features.registry import create_backbone  # noqa: E402

WIDTH, DEPTH, PATCH, SIZE = 32, 2, 8, 32


def _timm_layout(model) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict for ``model``, written from timm's naming (by hand, here)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = "embeddings."
    out = {
        "cls_token": sd[emb + "cls_token"],
        "pos_embed": sd[emb + "position_embeddings"],
        "patch_embed.proj.weight": sd[emb + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd[emb + "patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
        "head.weight": torch.randn(7, WIDTH),  # a classifier: dropped
        "head.bias": torch.zeros(7),
        "decoder_embed.weight": torch.randn(16, WIDTH),  # MAE decoder: dropped
    }
    pairs = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(model.config.num_hidden_layers):
        blk = {k.split(f"layers.{i}.", 1)[1]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        for timm_name, ours in pairs.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{timm_name}.{kind}"] = blk[f"{ours}.{kind}"]
        for kind in ("weight", "bias"):  # timm fuses q, k, v into one projection
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([blk[f"attention.{n}_proj.{kind}"] for n in "qkv"])
    return out


def test_timm_vit_round_trips_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
    )
    ref = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    pth = tmp_path / "mae_face.pth"
    torch.save({"model": _timm_layout(ref), "epoch": 3}, pth)  # the usual training-script container

    out = tmp_path / "vit"
    r = CliRunner().invoke(
        app,
        [
            "convert-weights",
            str(pth),
            str(out),
            "--heads",
            "2",
            "--mean",
            "0.499,0.410,0.366",
            "--std",
            "0.297,0.270,0.265",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "dropped 3 tensors" in r.output and (out / "model.safetensors").is_file()
    again = CliRunner().invoke(app, ["convert-weights", str(pth), str(out), "--heads", "2"])
    assert again.exit_code == 2 and "--overwrite" in again.output

    bb = create_backbone(f"hf:{out}")  # loads offline, safetensors only
    assert bb.spec.input_size == SIZE and bb.spec.config["pooling"] == "mean"
    np.testing.assert_allclose(bb.spec.mean, (0.499, 0.410, 0.366))
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state[:, 1:]
        got = bb(x, tokens=True)
    torch.testing.assert_close(got.tokens, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.features, want.mean(1), atol=1e-5, rtol=1e-5)


def test_unknown_layouts_are_refused_with_a_reason():
    with pytest.raises(ConversionError, match="'pos_embed' is missing"):
        timm_vit_to_transformers(
            {"cls_token": torch.zeros(1, 1, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}
        )
    good = _timm_layout(
        transformers.ViTModel(
            transformers.ViTConfig(
                hidden_size=WIDTH,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=SIZE,
                patch_size=PATCH,
            ),
            add_pooling_layer=False,
        )
    )
    with pytest.raises(ConversionError, match="attention heads of width 32"):
        timm_vit_to_transformers(good)
    with pytest.raises(ConversionError, match="layer scale"):
        timm_vit_to_transformers({**good, "blocks.0.ls1.gamma": torch.ones(WIDTH)}, num_heads=2)
