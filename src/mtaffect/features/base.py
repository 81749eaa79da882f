"""What every backbone declares and returns, so extraction and training treat them alike."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

#: ImageNet normalisation (pixels in [0, 1]), shared by most hub backbones.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Self-description of a backbone: its input and its outputs.

    ``mean``/``std`` apply to pixels scaled to [0, 1] (per channel; one value for greyscale).
    """

    name: str
    input_size: int  # square side in pixels
    colour: str  # "RGB" or "L" (greyscale)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_dim: int  # size of the pooled vector
    num_logits: int = 0  # 0 when the backbone has no classifier
    logit_names: tuple[str, ...] = ()
    token_shape: tuple[int, int] | None = None  # (tokens, channels) when tokens are available
    config: dict = field(default_factory=dict)  # everything else that changes the features (weights id...)

    def fingerprint(self) -> str:
        """Hash of everything that changes the features: a store never mixes two backbones."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class BackboneOutput:
    features: torch.Tensor  # (N, feature_dim)
    logits: torch.Tensor | None = None  # (N, num_logits)
    tokens: torch.Tensor | None = None  # (N, T, C)


class Backbone(nn.Module):
    """Base class: subclasses set ``spec`` and implement :meth:`forward` on preprocessed tensors."""

    spec: BackboneSpec

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, 3) RGB, already ``input_size`` square -> normalised (N, C, S, S) float.

        Resizing is done by the caller while decoding (in worker processes), so this stays cheap.
        """
        x = torch.from_numpy(np.ascontiguousarray(images))
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if self.spec.colour == "L":  # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        mean = torch.tensor(self.spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError
