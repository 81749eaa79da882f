"""Test helpers: random-init checkpoints on the embedded backbone (recipe 3 with an LSTM for temporal
ones), saved as ``mtaffect train`` saves them, the PyTorch reference for an application model, and tiny
transformers models saved as ``hf:`` folders."""

from __future__ import annotations

import json
from pathlib import Path

#: A tiny ViT's transformers config: 2 blocks of width 32, 32 px images in 8 px patches.
TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
#: Its image processor: resized to 32 px, scaled to [-1, 1].
TINY_VIT_PROCESSOR = {
    "do_resize": True,
    "size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def checkpoint(path: Path, recipe: str, window: int = 1, gain: float = 1.0, **hparams) -> Path:
    """A random-init (seed 0) ``recipe`` checkpoint on fer-minixception; ``gain`` scales the weights so
    that the outputs depend clearly on the input (a random LSTM barely uses its window's context
    otherwise)."""
    import torch

    from mtaffect.features.registry import create_backbone
    from mtaffect.models.checkpoint import save_checkpoint
    from mtaffect.models.registry import create_model

    torch.manual_seed(0)
    spec = create_backbone("fer-minixception").spec
    model = create_model(recipe, feature_dim=spec.feature_dim, num_logits=spec.num_logits, **hparams)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(gain)
    backbone = {"name": spec.name, "spec": {"name": spec.name}, "fingerprint": spec.fingerprint()}
    return save_checkpoint(
        path,
        model.eval(),
        backbone=backbone,
        feature_dim=spec.feature_dim,
        num_logits=spec.num_logits,
        window=window,
    )


def torch_path(model, faces, backbone=None):
    """What ``mtaffect predict`` computes with PyTorch for prepared faces (N, S, S[, C]) uint8: the
    model's outputs and the backbone's (through ``backbone``, by default the model's own)."""
    import torch

    backbone = (model.create_backbone() if backbone is None else backbone).eval()
    x = faces[..., 0] if faces.shape[-1] == 1 else faces
    with torch.inference_mode():
        out = backbone(backbone.preprocess(x), tokens="tokens" in tuple(getattr(model, "inputs", ())))
    return model.predict(out.features, out.logits, out.tokens), out


def lstm_checkpoint(path: Path, window: int, gain: float = 1.0) -> Path:
    """Recipe 3 with a small LSTM over ``window`` frames (see :func:`checkpoint`)."""
    return checkpoint(path, "progressive", window, gain, temporal="lstm", dim=16, task_dim=16)


def save_hf_folder(model, folder: Path, processor: dict | None) -> Path:
    """A transformers ``model`` saved as a local folder (loaded as ``hf:<folder>``), with ``processor`` as
    its ``preprocessor_config.json`` unless None."""
    model.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def tiny_vit_folder(folder: Path) -> Path:
    """A random-init (seed 0) :data:`TINY_VIT` with :data:`TINY_VIT_PROCESSOR`, saved to ``folder``."""
    import torch
    import transformers

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT))
    return save_hf_folder(vit, folder, TINY_VIT_PROCESSOR)
