"""Training augmentation on the device, in batches, with ``kornia.augmentation``: presets and overrides.

A config's ``augment:`` section names a preset and optionally changes, adds or removes single ops::

    augment:
      preset: liu2024                  # none | li2024 | liu2024
      ops:
        color_jitter: {brightness: 0.3}  # change parameters of a preset op
        rotation: false                  # remove an op
        hflip: {p: 0.0}

Presets (the published lists; probabilities as torchvision applied them):

- ``li2024`` (recipe 1, Li, Du, Yang): ``RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)``, then
  a horizontal flip (p 0.5).
- ``liu2024`` (recipe 3, Liu et al.): horizontal flip (p 0.5), RandomResizedCrop to the input size
  (scale 0.8-1.0, ratio 3/4-4/3), RandomRotation(10 degrees), ColorJitter(0.2, 0.2, 0.2, 0.1) and
  RandomAffine(10 degrees, translate 0.1, scale 0.9-1.1), each always applied.

Ops and their parameters (``p`` is the probability of applying the op to an image or window):

=============== =====================================================================================
``hflip``        ``p``
``color_jitter`` ``brightness``, ``contrast``, ``saturation``, ``hue``, ``p``
``resized_crop`` ``scale`` [lo, hi], ``ratio`` [lo, hi], ``p`` (output: the backbone's input size)
``rotation``     ``degrees``, ``p``
``affine``       ``degrees``, ``translate`` [x, y] (fractions), ``scale`` [lo, hi], ``p``
=============== =====================================================================================

Behaviour the training relies on:

- Pixels are [0, 1] floats before normalisation, so the backbone's mean/std apply afterwards, as
  in extraction. ``none`` (or every op removed) is the identity: training then sees exactly the
  pixels extraction gives the backbone.
- Every frame of a window gets the same random transform (kornia's ``VideoSequential`` with
  ``same_on_frame``); rows are windows of one frame. ``per_frame`` (``augment.per_frame``) draws each
  frame's transform on its own instead, as the recipe-3 peer's data loader transformed every image.
- Reproducible: each batch's parameters are drawn from a generator seeded by (seed, stage, epoch,
  rank, batch), never from the global random state, so reruns, worker counts and other consumers of
  randomness do not change them.
- Greyscale backbones: saturation and hue leave a grey image unchanged, so they are dropped for
  1-channel input (brightness and contrast still apply).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: Every op, its parameters' defaults (the op's neutral or torchvision-default values).
OPS: dict[str, dict[str, Any]] = {
    "hflip": {"p": 0.5},
    "color_jitter": {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "p": 1.0},
    "resized_crop": {"scale": [0.8, 1.0], "ratio": [0.75, 4 / 3], "p": 1.0},
    "rotation": {"degrees": 10.0, "p": 1.0},
    "affine": {"degrees": 0.0, "translate": [0.0, 0.0], "scale": [1.0, 1.0], "p": 1.0},
}
#: Named presets: ordered ops with their settings.
PRESETS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "none": [],
    "li2024": [
        ("color_jitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}),
        ("hflip", {"p": 0.5}),
    ],
    "liu2024": [
        ("hflip", {"p": 0.5}),
        ("resized_crop", {"scale": [0.8, 1.0]}),
        ("rotation", {"degrees": 10.0, "p": 1.0}),
        ("color_jitter", {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1, "p": 1.0}),
        ("affine", {"degrees": 10.0, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "p": 1.0}),
    ],
}


class AugmentError(ValueError):
    """An ``augment:`` setting is wrong; the message names the op/parameter and what is allowed."""


def _pair(value: Any, where: str) -> list[float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise AugmentError(f"{where} must be a pair [lo, hi], got {value!r}")
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise AugmentError(f"{where} must have lo <= hi, got {value!r}")
    return [lo, hi]


def _check_op(name: str, params: dict[str, Any]) -> None:
    where = f"augment.ops.{name}"
    if not 0.0 <= params["p"] <= 1.0:
        raise AugmentError(f"{where}.p must be in [0, 1], got {params['p']}")
    if name == "color_jitter":
        for k in ("brightness", "contrast", "saturation"):
            if params[k] < 0:
                raise AugmentError(f"{where}.{k} must be >= 0, got {params[k]}")
        if not 0 <= params["hue"] <= 0.5:
            raise AugmentError(f"{where}.hue must be in [0, 0.5], got {params['hue']}")
    if name in ("rotation", "affine") and params["degrees"] < 0:
        raise AugmentError(f"{where}.degrees must be >= 0, got {params['degrees']}")
    if name == "resized_crop":
        lo, hi = params["scale"]
        if not 0 < lo <= hi <= 1:
            raise AugmentError(f"{where}.scale must satisfy 0 < lo <= hi <= 1, got {params['scale']}")
    if name == "affine" and not all(0 <= t <= 1 for t in params["translate"]):
        raise AugmentError(f"{where}.translate must be two fractions in [0, 1], got {params['translate']}")


def resolve_ops(preset: str, overrides: Mapping[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The ordered ``(op, params)`` list of ``preset`` with ``overrides`` applied, validated.

    An override ``{op: {param: value}}`` changes a preset op (or adds the op, after the preset's, from
    its defaults); ``{op: false}`` (or null) removes it.
    """
    if preset not in PRESETS:
        raise AugmentError(f"augment.preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    ops: dict[str, dict[str, Any]] = {name: {**OPS[name], **params} for name, params in PRESETS[preset]}
    for name, change in (overrides or {}).items():
        if name not in OPS:
            raise AugmentError(f"augment.ops: unknown op {name!r}; ops: {sorted(OPS)}")
        if change is False or change is None:
            ops.pop(name, None)
            continue
        if change is True:
            change = {}
        if not isinstance(change, Mapping):
            raise AugmentError(f"augment.ops.{name} must be a mapping of parameters, or false to remove it")
        unknown = sorted(set(change) - set(OPS[name]))
        if unknown:
            raise AugmentError(
                f"augment.ops.{name}: unknown parameter(s) {unknown}; valid: {sorted(OPS[name])}"
            )
        ops[name] = {**copy.deepcopy(ops.get(name, OPS[name])), **change}
    out = []
    for name, params in ops.items():
        params = dict(params)
        for key, value in params.items():
            where = f"augment.ops.{name}.{key}"
            if isinstance(OPS[name][key], list):
                params[key] = _pair(value, where)
            else:
                try:
                    params[key] = float(value)
                except (TypeError, ValueError):
                    raise AugmentError(f"{where} must be a number, got {value!r}") from None
        _check_op(name, params)
        out.append((name, params))
    return out


def _kornia_op(name: str, params: dict[str, Any], size: int, channels: int) -> Any:
    import kornia.augmentation as K

    p = params["p"]
    if name == "hflip":
        return K.RandomHorizontalFlip(p=p)
    if name == "color_jitter":
        sat, hue = (params["saturation"], params["hue"]) if channels == 3 else (0.0, 0.0)  # grey: no-ops
        return K.ColorJitter(params["brightness"], params["contrast"], sat, hue, p=p)
    if name == "resized_crop":
        return K.RandomResizedCrop(
            (size, size), scale=tuple(params["scale"]), ratio=tuple(params["ratio"]), p=p
        )
    if name == "rotation":
        return K.RandomRotation(params["degrees"], p=p)
    if name == "affine":
        return K.RandomAffine(
            params["degrees"], translate=tuple(params["translate"]), scale=tuple(params["scale"]), p=p
        )
    raise AssertionError(name)  # resolve_ops validated the name


class Augmenter:
    """Batched, seeded, window-consistent augmentation of [0, 1] pixels (B, C, S, S) or (B, T, C, S, S)."""

    def __init__(
        self, ops: list[tuple[str, dict[str, Any]]], size: int, channels: int, per_frame: bool = False
    ) -> None:
        self.ops, self.per_frame = ops, bool(per_frame)
        self.size, self.channels = int(size), int(channels)
        self._pipeline = None
        if ops:
            import kornia.augmentation as K

            mods = [_kornia_op(n, p, self.size, self.channels) for n, p in ops]
            self._pipeline = K.VideoSequential(*mods, data_format="BTCHW", same_on_frame=True)

    @classmethod
    def from_config(
        cls,
        preset: str,
        overrides: Mapping[str, Any] | None,
        size: int,
        channels: int,
        per_frame: bool = False,
    ) -> Augmenter:
        return cls(resolve_ops(preset, overrides), size, channels, per_frame)

    @property
    def identity(self) -> bool:
        return self._pipeline is None

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self._pipeline is None:
            return x
        rows = x.ndim == 4
        shape = x.shape
        if self.per_frame and not rows:  # every frame a window of its own: its own transform
            x, rows = x.reshape(-1, *shape[-3:]), True
        v = x.unsqueeze(1) if rows else x
        self._pipeline.to(v.device)
        devices = [v.device] if v.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # parameters from this batch's seed only
            torch.manual_seed(seed)
            out = self._pipeline(v)
        return out.reshape(shape) if rows else out


def batch_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run seed and the batch's coordinates (stage, epoch, rank, batch)."""
    return int(
        np.random.SeedSequence([int(seed), *(int(p) for p in parts)]).generate_state(2, np.uint64)[0] >> 1
    )


__all__ = ["OPS", "PRESETS", "AugmentError", "Augmenter", "batch_seed", "resolve_ops"]
