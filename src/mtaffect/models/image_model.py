"""A backbone in the loop: an :class:`MTLModel` that reads face images and feeds any recipe's heads.

:class:`ImageMTLModel` puts a registered :class:`~mtaffect.features.base.Backbone` in front of a recipe
(the *head*). ``forward`` takes normalised pixels, runs the backbone and hands the head exactly what a
feature store would (``features`` (B, D), ``logits`` (B, K), ``tokens`` (B, N, C), with a time axis for
windows), so the recipe never knows which path fed it. Units, losses, metric and checkpoints are the
store path's.

Modes:

- ``frozen``: the backbone never trains (no gradient, eval mode: BatchNorm statistics and dropout
  fixed); it runs on the fly, which is how recipe 1 was published (with augmentation every epoch).
- ``finetune``: the backbone trains with the head, except its stem and first ``frozen_blocks``
  blocks (:meth:`~mtaffect.features.base.Backbone.layout`), in every stage of the recipe or only
  those named in ``train_stages``. Its parameters get their own AdamW groups: lr and weight decay
  (default: the optimiser's) with layer-wise decay ``lr * layer_decay ** (L + 1 - layer)`` (stem 0,
  blocks 1..L, the rest L + 1) and no weight decay on biases, norms and embedding tokens (the usual
  ViT fine-tuning practice). ``grad_checkpointing`` recomputes the blocks' activations in backward
  where the model supports it (transformers ViTs).

ONNX backbones have no trainable weights: frozen only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtaffect.features.base import Backbone
from mtaffect.models.base import MTLModel, Stage

MODES = ("frozen", "finetune")
#: Parameter names that hold embedding tokens: no weight decay, as in ViT/MAE fine-tuning.
_NO_DECAY_SUFFIXES = ("cls_token", "position_embeddings", "mask_token", "register_tokens", "pos_embed")


def _cover(module: nn.Module, prefix: str, exclude: set[str]) -> list[str]:
    """Fewest submodule names (with ``prefix``) holding every parameter outside the ``exclude`` subtrees."""
    names: list[str] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if full in exclude:
            continue
        if any(e.startswith(full + ".") for e in exclude):
            if any(True for _ in child.parameters(recurse=False)):
                raise ValueError(f"cannot freeze part of {full!r}: it holds parameters of its own")
            names.extend(_cover(child, full + ".", exclude))
        elif any(True for _ in child.parameters()):
            names.append(full)
    return names


class ImageMTLModel(MTLModel):
    """``backbone`` -> ``head`` (any recipe), trained from images; see the module docstring."""

    inputs: tuple[str, ...] = ("pixels",)

    def __init__(
        self,
        backbone: Backbone,
        head: MTLModel,
        *,
        mode: str = "frozen",
        frozen_blocks: int = 0,
        lr: float | None = None,
        weight_decay: float | None = None,
        layer_decay: float = 1.0,
        train_stages: Sequence[str] | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"backbone mode must be one of {MODES}, got {mode!r}")
        if frozen_blocks < 0 or not 0 < layer_decay <= 1:
            raise ValueError(
                f"need frozen_blocks >= 0 and 0 < layer_decay <= 1; got {frozen_blocks}, {layer_decay}"
            )
        self.backbone, self.head = backbone, head
        # pixels, plus what the head reads from named stores (features@au ...) beside the images
        self.inputs = ("pixels", *(i for i in head.inputs if "@" in i))
        self.recipe = head.recipe  # the head's identity is the model's
        self.temporal = head.temporal
        self.mode, self.frozen_blocks = mode, int(frozen_blocks)
        self.lr, self.weight_decay, self.layer_decay = lr, weight_decay, float(layer_decay)
        self.train_stages = None if train_stages is None else tuple(train_stages)
        self._layout = backbone.layout()
        stage_names = [s.name for s in head.stages()]
        if self.train_stages is not None and (bad := sorted(set(self.train_stages) - set(stage_names))):
            raise ValueError(
                f"backbone.train_stages names {bad}, not stages of recipe {head.recipe!r} ({stage_names})"
            )
        if mode == "frozen":
            if frozen_blocks or grad_checkpointing or layer_decay != 1.0:
                raise ValueError(
                    "frozen_blocks, layer_decay and grad_checkpointing apply to backbone.mode: finetune"
                )
            backbone.requires_grad_(False).eval()
            return
        backbone.prepare_finetune()
        n_blocks = len(self._layout.blocks) if self._layout is not None else 0
        if self._layout is None and (frozen_blocks or layer_decay != 1.0):
            raise ValueError(
                f"backbone {backbone.spec.name!r} does not describe its blocks: frozen_blocks and "
                "layer_decay "
                "are not available for it (fine-tune it whole)"
            )
        if frozen_blocks > n_blocks:
            raise ValueError(
                f"frozen_blocks={frozen_blocks} but backbone {backbone.spec.name!r} has {n_blocks} blocks"
            )
        if self._layout is not None and frozen_blocks:  # as every stage will (apply_stage)
            for name in (*self._layout.stem, *self._layout.blocks[:frozen_blocks]):
                backbone.get_submodule(name).requires_grad_(False)
        if grad_checkpointing and not backbone.set_gradient_checkpointing(True):
            warnings.warn(
                f"backbone {backbone.spec.name!r} does not support gradient checkpointing; "
                "training without it",
                stacklevel=2,
            )

    # ---- the MTLModel contract --------------------------------------------------------------------
    @property
    def active_tasks(self) -> tuple[str, ...] | None:
        return self.head.active_tasks

    @active_tasks.setter
    def active_tasks(self, tasks: tuple[str, ...] | None) -> None:
        self.head.active_tasks = tasks

    def config(self) -> dict:
        return self.head.config()

    def backbone_trains_in(self, stage: str) -> bool:
        return self.mode == "finetune" and (self.train_stages is None or stage in self.train_stages)

    def backbone_modules(self) -> tuple[str, ...]:
        """Trainable backbone submodules (dotted, from this model) in ``finetune`` mode."""
        if self.frozen_blocks == 0 or self._layout is None:
            return ("backbone",)
        frozen = set(self._layout.stem) | set(self._layout.blocks[: self.frozen_blocks])
        return tuple(f"backbone.{n}" for n in _cover(self.backbone, "", frozen))

    def stages(self) -> list[Stage]:
        """The head's stages, named from here; a fine-tuned backbone trains in each (or those listed)."""
        out = []
        for s in self.head.stages():
            modules = ("head",) if "*" in s.train_modules else tuple(f"head.{m}" for m in s.train_modules)
            if self.backbone_trains_in(s.name):
                modules += self.backbone_modules()
            out.append(Stage(s.name, s.tasks, modules, s.epochs))
        return out

    def backbone_outputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised pixels (..., C, S, S) -> the arrays a feature store would hold, same leading axes."""
        lead = pixels.shape[:-3]
        flat = pixels.reshape(-1, *pixels.shape[-3:])
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self.backbone(flat, tokens="tokens" in self.head.inputs)
        # sizes spelled out: a batch whose every image failed to decode has 0 rows, and -1 cannot be
        # inferred from 0 elements
        arrays = {"features": out.features.reshape(*lead, out.features.shape[-1])}
        if out.logits is not None:
            arrays["logits"] = out.logits.reshape(*lead, out.logits.shape[-1])
        if out.tokens is not None:
            arrays["tokens"] = out.tokens.reshape(*lead, *out.tokens.shape[1:])
        return arrays

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "pixels" not in batch:
            raise ValueError("an image model reads 'pixels' (normalised images) from the batch")
        return self.head({**batch, **self.backbone_outputs(batch["pixels"])})

    # ---- optimiser groups --------------------------------------------------------------------------
    def _layer_id(self, name: str) -> int:
        if self._layout is None:
            return 1
        if any(name.startswith(s + ".") for s in self._layout.stem):
            return 0
        for i, block in enumerate(self._layout.blocks):
            if name.startswith(block + "."):
                return i + 1
        return len(self._layout.blocks) + 1

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The head's groups, then the backbone's trainable parameters by layer (see the module docstring)."""
        groups = [{**g, "name": f"head/{g['name']}"} for g in self.head.param_groups(lr, weight_decay)]
        b_lr = lr if self.lr is None else float(self.lr)
        b_wd = weight_decay if self.weight_decay is None else float(self.weight_decay)
        top = len(self._layout.blocks) + 1 if self._layout is not None else 1
        buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                decay = p.ndim > 1 and not name.endswith(_NO_DECAY_SUFFIXES)
                buckets.setdefault((self._layer_id(name), decay), []).append(p)
        for (layer, decay), params in sorted(buckets.items()):
            groups.append(
                {
                    "name": f"backbone/layer{layer}" + ("" if decay else "/no_decay"),
                    "params": params,
                    "lr": b_lr * self.layer_decay ** (top - layer),
                    "weight_decay": b_wd if decay or self.decay_all else 0.0,
                }
            )
        return groups


__all__ = ["MODES", "ImageMTLModel"]
