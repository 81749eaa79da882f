"""What every backbone declares and returns, so extraction and training treat them alike."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

#: ImageNet normalisation (pixels in [0, 1]), shared by most hub backbones.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalisation_override(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """A caller's ``mean=``/``std=`` (for pixels scaled to [0, 1]) as float tuples, None when neither is
    given. Both or neither; ``channels`` values each when the channel count is known here."""
    if (mean is None) != (std is None):
        raise ValueError("pass both mean= and std= (per channel, for pixels scaled to [0, 1])")
    if mean is None or std is None:
        return None
    try:
        m, s = tuple(float(x) for x in mean), tuple(float(x) for x in std)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"mean= and std= must be lists of numbers, got {mean!r} and {std!r}") from exc
    if channels is not None and (len(m) != channels or len(s) != channels):
        raise ValueError(f"mean and std need {channels} values each, got {list(m)} and {list(s)}")
    return m, s


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


def pixels_to_unit(pixels: torch.Tensor, colour: str = "RGB") -> torch.Tensor:
    """uint8 pixels, (..., S, S, 3) for "RGB" or (..., S, S) for "L" -> float (..., C, S, S) in [0, 1].

    Runs wherever the tensor is (image training converts on the GPU, after a uint8 host-to-device copy).
    """
    x = pixels.movedim(-1, -3) if colour == "RGB" else pixels.unsqueeze(-3)
    return x.float().div_(255.0)


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of (..., C, S, S) [0, 1] pixels: the one normalisation of every
    path (extraction, image training, prediction), so they feed a backbone identical numbers."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class BackboneLayout:
    """Submodule names (relative to the backbone) in depth order, for fine-tuning.

    ``stem`` runs before the first block (patch/position embeddings, first convs); ``blocks`` are the
    repeated blocks (transformer layers, residual blocks). Every other parameter (final norm, pooler,
    classifier) sits after the last block. Freezing the first N blocks and layer-wise lr decay use it.
    """

    stem: tuple[str, ...]
    blocks: tuple[str, ...]


class Backbone(nn.Module):
    """Base class: subclasses set ``spec`` and implement :meth:`forward` on preprocessed tensors.

    Fine-tuning (image training with ``backbone.mode: finetune``) uses four more methods with safe
    defaults: :meth:`prepare_finetune`, :meth:`layout`, :meth:`set_gradient_checkpointing` and
    :meth:`save_weights`.
    """

    spec: BackboneSpec
    #: Where the weights came from (a file, folder or hub id), as loaded; "" when built in.
    source: str = ""

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, 3) RGB, already ``input_size`` square -> normalised (N, C, S, S) float.

        Resizing is done by the caller while decoding (in worker processes), so this stays cheap.
        """
        x = torch.from_numpy(np.ascontiguousarray(images))
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {tuple(x.shape)}")
        x = pixels_to_unit(x, "RGB")
        if self.spec.colour == "L":  # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        return normalise(x, self.spec.mean, self.spec.std)

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError

    # ---- fine-tuning -------------------------------------------------------------------------------
    def prepare_finetune(self) -> None:
        """Make every weight trainable; raises for backbones without torch weights (ONNX)."""
        if not any(True for _ in self.parameters()):
            raise ValueError(
                f"backbone {self.spec.name!r} has no trainable (PyTorch) weights, e.g. an ONNX model: "
                "use it frozen (backbone.mode: frozen)"
            )
        self.requires_grad_(True)

    def layout(self) -> BackboneLayout | None:
        """Stem and blocks for partial freezing and layer-wise lr decay; None: not known (one group)."""
        return None

    def set_gradient_checkpointing(self, enabled: bool) -> bool:
        """Recompute activations in backward to save memory; returns False when the model cannot."""
        return False

    def save_weights(self, folder: str | os.PathLike, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Write the (fine-tuned) weights into ``folder`` as safetensors, loadable by this backbone's
        factory with ``weights=folder``; returns the factory kwargs to pass with it (``kwargs`` are the
        ones this backbone was built with; options that only said where weights came from are dropped).
        """
        raise ValueError(f"backbone {self.spec.name!r} cannot save fine-tuned weights")
