"""DINOv2 ViTs (``dinov2-small|base|large|giant``) through ``transformers.Dinov2Model``.

Weights (``weights=``), in order of what is tried:

- ``None``: the hub id ``facebook/dinov2-<size>`` (the hub cache works offline once downloaded);
- a hub id (any Dinov2 checkpoint) or a local folder written by ``save_pretrained`` (never touches the
  network), loaded with ``from_pretrained`` from safetensors only;
- a local ``.safetensors`` file of a Dinov2Model state dict (a ``config.json`` beside it is used,
  otherwise the published architecture of ``<size>``);
- ``random_init=True`` or ``config=`` (a ``Dinov2Config`` or dict): a seeded random-init model with
  no download at all, for tests and smoke runs.

Outputs: ``features`` = concat(CLS token, mean of the patch tokens) of the final layer-normed hidden
state, so ``feature_dim = 2 * hidden`` (768 for small, 1536 base, 2048 large, 3072 giant);
``forward(x, tokens=True)`` adds the patch tokens (N, (S/14)^2, hidden). Any ``image_size`` that is a
multiple of 14 works: the position embeddings (trained at 518 = 37x37 patches) are interpolated
bicubically by ``Dinov2Embeddings``; 238 gives the 17x17 = 289 tokens recipe 1 uses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mtaffect.features.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneOutput,
    BackboneSpec,
    normalisation_override,
)
from mtaffect.features.hf import (
    TransformersBackbone,
    file_sha256,
    import_transformers,
    load_pretrained,
    parse_dtype,
    source_config,
)
from mtaffect.features.registry import register_backbone

SIZES = ("small", "base", "large", "giant")
#: Architecture of the published checkpoints (their hub config.json), so random-init and bare
#: safetensors files need no download. All: patch 14, trained at 518 px, MLP ratio 4, layer scale 1.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "use_swiglu_ffn": True,
    },
}
_COMMON_ARCH = {"patch_size": 14, "image_size": 518, "mlp_ratio": 4, "layerscale_value": 1.0}
# Keys of a config dict that do not change the computation.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "architectures", "dtype")


def hub_id(size: str) -> str:
    return f"facebook/dinov2-{size}"


def published_config(size: str) -> Any:
    """The ``Dinov2Config`` of ``facebook/dinov2-<size>``, built locally."""
    if size not in ARCHITECTURES:
        raise ValueError(f"unknown DINOv2 size {size!r}; choose one of {SIZES}")
    return import_transformers().Dinov2Config(**_COMMON_ARCH, **ARCHITECTURES[size])


def _config_digest(config: Any) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


class DinoV2Backbone(TransformersBackbone):
    """A ``Dinov2Model`` giving concat(CLS, mean patch) features and, on request, the patch tokens."""

    def __init__(self, model: Any, spec: BackboneSpec) -> None:
        super().__init__()
        self.model = model.eval()
        self.spec = spec
        self._dtype = next(model.parameters()).dtype

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:
        hidden = self.model(pixel_values=x.to(self._dtype)).last_hidden_state  # (N, 1 + T, C), normed
        cls, patches = hidden[:, 0], hidden[:, 1:]
        feats = torch.cat([cls, patches.mean(1)], dim=1).float()
        return BackboneOutput(features=feats, tokens=patches.float() if tokens else None)


def _random_init(config: Any, seed: int) -> Any:
    transformers = import_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.Dinov2Model(config)


def _from_safetensors_file(path: Path, size: str) -> Any:
    """A bare Dinov2Model (or classification) state dict in one safetensors file.

    Loaded through ``from_pretrained`` on a temporary folder linking the file, so transformers' own key
    conversions apply (its module names differ between versions from those in the saved files).
    A ``config.json`` beside the file wins over the published architecture of ``size``.
    """
    transformers = import_transformers()
    beside = path.parent / "config.json"
    with tempfile.TemporaryDirectory(prefix="mtaffect-dinov2-") as tmp:
        try:
            os.symlink(path.resolve(), Path(tmp) / "model.safetensors")
        except OSError:  # no symlinks here (some Windows setups): copy instead
            shutil.copyfile(path, Path(tmp) / "model.safetensors")
        if beside.is_file():
            shutil.copyfile(beside, Path(tmp) / "config.json")
        else:
            published_config(size).to_json_file(str(Path(tmp) / "config.json"))
        try:
            model, info = load_pretrained(transformers.Dinov2Model, tmp, local_files_only=True)
        except (OSError, ValueError) as e:  # a bad config beside it: named by its real place, not tmp
            text = str(e.__cause__ or e).replace(str(Path(tmp) / "config.json"), str(beside))
            raise ValueError(f"{path}: not a loadable DINOv2 safetensors file ({text})") from e
    _check_complete(info, str(path), f"use the matching size (not {size!r}) or put its config.json beside it")
    return model


def _check_complete(info: dict[str, Any], src: str, hint: str) -> None:
    """Refuse checkpoints that leave weights random (the mask token is unused at inference)."""
    missing = sorted(k for k in info.get("missing_keys", []) if not k.endswith("mask_token"))
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        shown = missing[:5] or [m[0] if isinstance(m, tuple) else m for m in list(mismatched)[:5]]
        raise ValueError(
            f"{src}: does not hold these DINOv2 weights (they would stay random): {shown}...; {hint}"
        )


def create_dinov2(
    size: str,
    *,
    weights: str | None = None,
    image_size: int = 224,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    config: Any = None,
    random_init: bool = False,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> DinoV2Backbone:
    """Build ``dinov2-<size>``; see the module docstring for ``weights``/``config``/``random_init``.

    ``mean``/``std`` (on [0, 1] RGB pixels) replace the ImageNet normalisation the models were trained with.
    """
    norm = normalisation_override(mean, std, channels=3) or (IMAGENET_MEAN, IMAGENET_STD)
    if size not in SIZES:
        raise ValueError(f"unknown DINOv2 size {size!r}; choose one of {SIZES}")
    transformers = import_transformers()
    if config is not None or random_init:
        if weights is not None:
            raise ValueError("pass either weights= (pretrained) or config=/random_init=True (random init)")
        if config is None:
            config = published_config(size)
        elif isinstance(config, dict):
            config = transformers.Dinov2Config(**config)
        model = _random_init(config, seed)
        source: dict[str, Any] = {"weights": "random-init", "seed": seed}
        source["arch_sha256"] = _config_digest(config)
    else:
        src = weights or hub_id(size)
        path = Path(src).expanduser()
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(
                    f"{path}: only .safetensors weights are loaded (no pickles); convert it, or pass a "
                    "folder written by save_pretrained"
                )
            model = _from_safetensors_file(path, size)
            source = {"weights": str(path.resolve()), "weights_sha256": file_sha256(path)}
            beside = path.parent / "config.json"
            if beside.is_file():
                source["config_sha256"] = file_sha256(beside)
        else:
            src = str(path.resolve()) if path.is_dir() else src
            model, info = load_pretrained(
                transformers.Dinov2Model, src, revision=revision, local_files_only=local_files_only
            )
            _check_complete(info, src, f"is it a DINOv2 checkpoint? (other models: use 'hf:{src}')")
            source = source_config(src, revision)
    if getattr(model.config, "model_type", "dinov2") != "dinov2":
        kind = model.config.model_type
        raise ValueError(f"{weights}: model_type {kind!r} is not dinov2; use 'hf:{weights}'")
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        model = model.to(torch_dtype)

    patch, hidden = int(model.config.patch_size), int(model.config.hidden_size)
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch {patch}, got {image_size}")
    n_tokens = (image_size // patch) ** 2
    spec = BackboneSpec(
        name=f"dinov2-{size}",
        input_size=image_size,
        colour="RGB",
        mean=norm[0],
        std=norm[1],
        feature_dim=2 * hidden,
        token_shape=(n_tokens, hidden),
        config={
            **source,
            "hidden_size": hidden,
            "num_hidden_layers": int(model.config.num_hidden_layers),
            "patch_size": patch,
            "features": "concat(cls, mean(patch tokens))",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
    )
    backbone = DinoV2Backbone(model, spec)
    backbone.source = source["weights"]
    return backbone


for _size in SIZES:
    register_backbone(f"dinov2-{_size}")(functools.partial(create_dinov2, _size))
