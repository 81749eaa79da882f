"""Users' own ViT weights: timm / MAE ``.pth`` state dicts -> a transformers ViT folder (safetensors).

MAE and face-pretrained ViTs are usually shared as PyTorch ``.pth`` files with timm's key names
(``blocks.3.attn.qkv.weight``...). :func:`convert_timm_vit` maps the encoder onto transformers'
``ViTModel`` (its hub layout: ``encoder.layer.3.attention.attention.query.weight``...) and writes
``model.safetensors`` + ``config.json`` + ``preprocessor_config.json``, a folder that
``create_backbone("hf:<folder>")`` (and ``backbone: {name: hf:<folder>}`` in a training config) loads.

Reading a ``.pth`` is the one place a pickle-based file is opened, and only with
``torch.load(weights_only=True)`` (tensors and plain containers; no code runs), as an explicit user
command (``mtaffect convert-weights``). Everything else keeps loading safetensors only.

Mapped: patch embedding, CLS token, position embeddings (with a CLS slot), every block's norms,
fused qkv (split into query/key/value; BEiT-style ``q_bias``/``v_bias`` too), attention output, MLP,
and the final ``norm``. Dropped and reported: MAE's decoder and mask token, classifier heads. A
fine-tuned MAE's ``fc_norm`` (LayerNorm after global pooling) has no place in ``ViTModel``; it is used
as the final token norm when there is no ``norm`` and the report says so (mean pooling then averages
normalised tokens instead of normalising the average). Layer scale (``ls1``/``ls2``) and
position embeddings without a CLS slot are not representable and raise an error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtaffect.features.base import IMAGENET_MEAN, IMAGENET_STD, normalisation_override
from mtaffect.persist import CONVERTED, atomic_folder, check_replaceable, header, write_json

#: Heads of the published ViT sizes, by width (Ti, S, B, L, H): timm files do not record it.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
#: Key prefixes that are not part of the encoder (MAE decoder, classifiers).
_DROP = ("decoder", "mask_token", "head.", "head_dist.", "pre_logits.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}


class ConversionError(ValueError):
    """The file is not a timm-style ViT state dict this converter can map; the message says why."""


@dataclass
class ConversionReport:
    """What a conversion did: the architecture found, what was dropped, caveats."""

    config: dict[str, Any]
    mapped: int
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.config
        lines = [
            f"ViT: {c['num_hidden_layers']} blocks, width {c['hidden_size']}, "
            f"{c['num_attention_heads']} heads, "
            f"patch {c['patch_size']}, {c['image_size']} px; {self.mapped} tensors mapped"
        ]
        if self.dropped:
            groups = sorted({k.split(".")[0] for k in self.dropped})
            lines.append(f"dropped {len(self.dropped)} tensors not in the encoder: {', '.join(groups)}")
        lines.extend(self.notes)
        return "\n".join(lines)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.pt`` state dict via ``torch.load(weights_only=True)`` (never a plain unpickle).

    Unwraps the usual containers (``{"model": ...}``, ``{"state_dict": ...}``) and DDP's ``module.``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: weights file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refuses anything but tensors and containers
        raise ConversionError(
            f"{p}: cannot be read as plain tensors with torch.load(weights_only=True) ({exc}); "
            "only state dicts of tensors are converted"
        ) from exc
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{p}: holds no state dict (a mapping of parameter names to tensors)")
    state = {str(k).removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    if not state:
        raise ConversionError(f"{p}: the mapping holds no tensors")
    return state


def timm_vit_to_transformers(
    state: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """timm ViT / MAE encoder keys -> transformers ``ViTModel`` keys (hub layout) and its config."""
    for need in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if need not in state:
            raise ConversionError(
                f"not a timm ViT state dict: {need!r} is missing (found e.g. {sorted(state)[:5]})"
            )
    if any(k.startswith("blocks.") and (".ls1." in k or ".ls2." in k) for k in state):
        raise ConversionError("layer scale (ls1/ls2) is not representable in transformers' ViTModel")
    patch_w = state["patch_embed.proj.weight"]
    hidden, channels, patch = int(patch_w.shape[0]), int(patch_w.shape[1]), int(patch_w.shape[2])
    n_pos = int(state["pos_embed"].shape[1])
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ConversionError(
            f"pos_embed has {n_pos} positions: expected a CLS slot plus a square grid of patches"
        )
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ConversionError(f"blocks.<i> keys are missing or not numbered 0..n-1 (found {blocks[:5]}...)")
    heads = num_heads or HEADS_BY_WIDTH.get(hidden)
    if heads is None or hidden % heads:
        raise ConversionError(
            f"cannot tell the number of attention heads of width {hidden} (a timm file does not record it): "
            "pass it (CLI: --heads N)"
        )
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": patch_w,
    }
    if "patch_embed.proj.bias" in state:
        out["embeddings.patch_embeddings.projection.bias"] = state["patch_embed.proj.bias"]
    used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    qkv_bias = False
    for i in blocks:
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for s_name, d_name in _BLOCK_MAP.items():
            if src + s_name not in state:
                raise ConversionError(f"{src + s_name} is missing: not a standard timm ViT block")
            out[dst + d_name] = state[src + s_name]
            used.add(src + s_name)
        qkv = state.get(src + "attn.qkv.weight")
        if qkv is None or qkv.shape[0] != 3 * hidden:
            raise ConversionError(f"{src}attn.qkv.weight is missing or not (3*{hidden}, {hidden})")
        used.add(src + "attn.qkv.weight")
        att = dst + "attention.attention."
        for j, name in enumerate(("query", "key", "value")):
            out[f"{att}{name}.weight"] = qkv[j * hidden : (j + 1) * hidden]
        bias = state.get(src + "attn.qkv.bias")
        if bias is None and src + "attn.q_bias" in state:  # BEiT-style: q and v biases, no k bias
            q_b, v_b = state[src + "attn.q_bias"], state[src + "attn.v_bias"]
            bias = torch.cat([q_b, torch.zeros_like(q_b), v_b])
            used.update({src + "attn.q_bias", src + "attn.v_bias"})
        if bias is not None:
            qkv_bias = True
            used.add(src + "attn.qkv.bias")
            for j, name in enumerate(("query", "key", "value")):
                out[f"{att}{name}.bias"] = bias[j * hidden : (j + 1) * hidden]
    notes: list[str] = []
    if "norm.weight" in state:
        norm = "norm"
    elif "fc_norm.weight" in state:
        norm = "fc_norm"
        notes.append(
            "note: no final `norm` but a global-pool `fc_norm`: used as the final token LayerNorm, so "
            "mean pooling normalises each token before averaging (not the average itself)"
        )
    else:
        raise ConversionError("neither a final `norm` nor an `fc_norm` LayerNorm was found")
    out["layernorm.weight"], out["layernorm.bias"] = state[f"{norm}.weight"], state[f"{norm}.bias"]
    used.update({f"{norm}.weight", f"{norm}.bias"})
    dropped = sorted(k for k in state if k not in used)
    unknown = [k for k in dropped if not k.startswith(_DROP) and not k.startswith(("norm.", "fc_norm."))]
    if unknown:
        raise ConversionError(
            f"unexpected tensors for a timm ViT: {unknown[:5]}; refusing a partial conversion"
        )
    if not qkv_bias:
        notes.append("note: the attention has no qkv bias (qkv_bias=False)")
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(heads),
        "intermediate_size": int(state["blocks.0.mlp.fc1.weight"].shape[0]),
        "image_size": grid * patch,
        "patch_size": patch,
        "num_channels": channels,
        "qkv_bias": qkv_bias,
        "layer_norm_eps": 1e-6,  # timm's ViT and MAE (transformers' default is 1e-12)
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    out = {k: v.detach().float().contiguous() for k, v in out.items()}
    return out, ConversionReport(config=config, mapped=len(out), dropped=dropped, notes=notes)


def convert_timm_vit(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_heads: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert ``src`` (.pth) into the transformers ViT folder ``out_dir`` (written atomically).

    ``mean``/``std`` (on [0, 1] pixels) go into preprocessor_config.json: the normalisation the
    weights were trained with (ImageNet by default; a face-pretrained MAE may use face statistics).
    """
    from safetensors.torch import save_file

    from mtaffect.features.hf import import_transformers

    target = check_replaceable(out_dir, CONVERTED, overwrite)  # before the work
    norm = normalisation_override(mean, std, channels=3)
    assert norm is not None  # both are given
    state, report = timm_vit_to_transformers(read_state_dict(src), num_heads)
    config = import_transformers().ViTConfig(**report.config)
    config.architectures = ["ViTModel"]
    size = report.config["image_size"]
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(norm[0]),
        "image_std": list(norm[1]),
    }
    with atomic_folder(target, CONVERTED, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "converted_from": "timm"})
        config.to_json_file(str(tmp / "config.json"))
        text = json.dumps(processor, indent=1) + "\n"
        (tmp / "preprocessor_config.json").write_text(text, encoding="utf-8")
        record = header(CONVERTED, converted_from=str(src), report=asdict(report))
        write_json(tmp / str(CONVERTED.marker), record)
    return report


__all__ = [
    "ConversionError",
    "ConversionReport",
    "convert_timm_vit",
    "read_state_dict",
    "timm_vit_to_transformers",
]
