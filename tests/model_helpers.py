"""Test helpers: random-init checkpoints on the embedded backbone (recipe 3 with an LSTM for temporal
ones), saved as ``mtaffect train`` saves them."""

from __future__ import annotations

from pathlib import Path


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
        path, model.eval(), backbone=backbone, feature_dim=spec.feature_dim, num_logits=spec.num_logits,
        window=window,
    )  # fmt: skip


def lstm_checkpoint(path: Path, window: int, gain: float = 1.0) -> Path:
    """Recipe 3 with a small LSTM over ``window`` frames (see :func:`checkpoint`)."""
    return checkpoint(path, "progressive", window, gain, temporal="lstm", dim=16, task_dim=16)
