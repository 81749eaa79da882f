"""Test helper: a random-init temporal checkpoint (recipe 3 with an LSTM) on the embedded backbone."""

from __future__ import annotations

from pathlib import Path


def lstm_checkpoint(path: Path, window: int, gain: float = 1.0) -> Path:
    """Saved as ``mtaffect train`` saves it; ``gain`` scales the weights so the outputs depend clearly
    on the window's context (a random LSTM barely uses it otherwise)."""
    import torch

    from mtaffect.features.registry import create_backbone
    from mtaffect.models.checkpoint import save_checkpoint
    from mtaffect.models.registry import create_model

    torch.manual_seed(0)
    spec = create_backbone("fer-minixception").spec
    model = create_model(
        "progressive", feature_dim=spec.feature_dim, num_logits=spec.num_logits, temporal="lstm", dim=16,
        task_dim=16,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(gain)
    backbone = {"name": spec.name, "spec": {"name": spec.name}, "fingerprint": spec.fingerprint()}
    return save_checkpoint(
        path, model.eval(), backbone=backbone, feature_dim=spec.feature_dim, num_logits=spec.num_logits,
        window=window,
    )  # fmt: skip
