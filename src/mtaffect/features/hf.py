"""``hf:<hub-id-or-folder>``: any `transformers` vision backbone as a feature extractor.

``create_backbone("hf:google/vit-base-patch16-224")`` or ``create_backbone("hf:/models/my-vit")``
loads ``AutoModel`` (safetensors weights only) and reads ``preprocessor_config.json`` for the input
size and normalisation; without one, pass ``image_size=``, ``mean=`` and ``std=``.

Pooled features (``pooling="auto"``): the model's ``pooler_output`` when it has a pooler whose weights
were actually loaded (a ViT checkpoint saved without its pooler would otherwise give features from a
random layer); else the mean of the last hidden state over the patch tokens, leaving out the prefix
tokens (CLS, distillation, registers: whatever precedes the ``(S/patch)^2`` patch tokens); for
convolutional models (4-D hidden state) the mean over the spatial grid. ``tokens=True`` also returns
the patch tokens (N, T, C) (the spatial grid flattened for convolutional models). A different
``image_size`` than the model was trained at is passed on with ``interpolate_pos_encoding=True`` where
the model supports it. ViT-MAE checkpoints run with ``mask_ratio=0`` and unshuffled patches, so they see
the whole image and their tokens stay in raster order.

This module also holds the loading helpers shared with :mod:`mtaffect.features.dinov2`: lazy import of
transformers, offline-aware ``from_pretrained`` with errors that say what to do, and content
fingerprints of local weight folders.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtaffect.features.base import (
    Backbone,
    BackboneLayout,
    BackboneOutput,
    BackboneSpec,
    normalisation_override,
)
from mtaffect.features.registry import register_backbone

HUB_EXTRA_HINT = "install the hub extras: pip install 'mtaffect[hub]'"
#: ImageNet normalisation (on [0, 1] RGB pixels), shared by most hub backbones.
_POOLINGS = ("auto", "pooler", "mean", "cls")
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


# ---- shared helpers -----------------------------------------------------------------------------------
def import_transformers() -> Any:
    """Import transformers on first use, so ``import mtaffect`` stays light."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"this backbone needs the `transformers` package: {HUB_EXTRA_HINT}") from e
    return transformers


def hub_offline() -> bool:
    """True when the user asked for offline mode (read now, not at transformers' import time)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def resolve_offline(src: str, local_files_only: bool | None) -> bool:
    """Whether to stay off the network: as asked, else for local folders and in offline mode."""
    if local_files_only is not None:
        return bool(local_files_only)
    return Path(src).is_dir() or hub_offline()


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept ``torch.float16`` or ``"float16"``/``"fp16"``/``"bf16"``..."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a torch floating dtype (use float32, float16 or bfloat16)")
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised per (path, size, mtime) within the process.

    Content hashes, unlike sizes and mtimes, survive copies and stay different for retrained weights
    of the same size; reading a weights file once more costs about what loading it does.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def folder_fingerprint(folder: str | os.PathLike) -> dict[str, Any]:
    """What identifies a local weights folder's features: its config.json and its safetensors files."""
    folder = Path(folder)
    cfg = folder / "config.json"
    weights = sorted(folder.glob("*.safetensors"))
    return {
        "config_sha256": file_sha256(cfg) if cfg.is_file() else None,
        "weights_sha256": {w.name: file_sha256(w) for w in weights},
    }


def _load_error(src: str, local: bool, offline: bool, err: Exception) -> OSError:
    if local:
        return OSError(
            f"{src}: cannot load a transformers model from this folder ({err}). It must hold config.json "
            "and model.safetensors, as written by `model.save_pretrained(folder)`."
        )
    how = (
        f"download it while online with `huggingface-cli download {src}` (or `hf download {src}`), "
        "then run again (the hub cache is used offline), or pass a local folder written by "
        "`save_pretrained`"
    )
    mode = " in offline mode (HF_HUB_OFFLINE is set or local_files_only=True)" if offline else ""
    return OSError(f"cannot load {src!r} from the Hugging Face hub{mode}: {err}\nTo fix it, {how}.")


def load_pretrained(
    model_cls: Any,
    src: str,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """``model_cls.from_pretrained`` restricted to safetensors, offline-aware, with actionable errors.

    Returns the model and transformers' loading info (missing/unexpected keys).
    A local folder never touches the network; a hub id does only unless HF_HUB_OFFLINE is set.
    """
    local = Path(src).is_dir()
    offline = resolve_offline(src, local_files_only)
    config = kwargs.pop("config", None)
    if config is None:
        config = load_config(
            model_cls,
            src,
            revision=revision,
            local_files_only=offline,
            trust_remote_code=kwargs.get("trust_remote_code"),
        )
    try:
        model, info = model_cls.from_pretrained(
            src,
            config=config,
            revision=revision,
            local_files_only=offline,
            use_safetensors=True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise _load_error(src, local, offline, e) from e
    except _CONFIG_ERRORS as e:  # a config that passed the checks but does not build this model
        raise ValueError(f"{_config_name(src, local)}: {_one_line(e)}") from e
    except RuntimeError as e:  # only the weights-do-not-fit-the-config kind (never e.g. out of memory)
        if "mismatched_sizes" not in str(e):
            raise
        raise ValueError(
            f"{_config_name(src, local)} does not describe the weights beside it (their shapes differ from "
            "the ones it gives); use the config.json the weights were saved with"
        ) from e
    return model, info


#: What transformers (and huggingface_hub's strict config dataclasses) raise on an ill-typed or
#: inconsistent config, beside OSError/ValueError: a zero head count divides by zero, a string size
#: fails validation, an unknown activation is a KeyError.
_CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ArithmeticError,
    KeyError,
    IndexError,
    AttributeError,
)
try:  # huggingface_hub >= 1.0: configs are strict dataclasses validated field by field
    from huggingface_hub.errors import StrictDataclassError

    _CONFIG_ERRORS = (*_CONFIG_ERRORS, StrictDataclassError)
except ImportError:  # pragma: no cover - older huggingface_hub
    pass

#: Sizes a vision config must give as positive integers (when it has them).
_POSITIVE_INTS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "patch_size",
    "image_size",
    "num_channels",
    "embed_dim",
    "embedding_size",
)


def _config_name(src: str, local: bool) -> str:
    return str(Path(src) / "config.json") if local else f"{src} (config.json)"


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def check_config(config: Any, where: str) -> None:
    """Refuse sizes that would fail deep inside the model's constructor (a ZeroDivisionError, a tensor of
    negative size, weights silently reinitialised): each must be a positive integer, and the heads must
    divide the hidden size. The message names the key."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for key in _POSITIVE_INTS:
        v = values.get(key)
        if v is None:  # absent, or left for the model to derive
            continue
        items = v if isinstance(v, list | tuple) else [v]
        if not items or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in items):
            raise ValueError(f"{where}: {key} must be a positive integer (or a list of them), got {v!r}")
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    explicit = values.get("head_dim") or values.get("attention_head_size")  # heads need not divide then
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads and not explicit:
        raise ValueError(
            f"{where}: num_attention_heads ({heads}) must divide hidden_size ({hidden}): each head gets "
            "hidden_size / num_attention_heads channels"
        )
    act = values.get("hidden_act")
    if isinstance(act, str):
        from transformers.activations import ACT2FN

        if act not in ACT2FN:
            raise ValueError(f"{where}: hidden_act {act!r} is not an activation transformers knows")


def load_config(
    model_cls: Any, src: str, *, revision: str | None, local_files_only: bool, trust_remote_code: Any = None
) -> Any:
    """The model's config (``config.json``), read and checked before any weights: a bad value is a
    ValueError naming the file and the key, not a traceback from inside transformers."""
    transformers = import_transformers()
    local = Path(src).is_dir()
    where = _config_name(src, local)
    config_cls = getattr(model_cls, "config_class", None) or transformers.AutoConfig
    kw = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
    try:
        config = config_cls.from_pretrained(src, revision=revision, local_files_only=local_files_only, **kw)
    except (OSError, ValueError) as e:
        raise _load_error(src, local, local_files_only, e) from e
    except _CONFIG_ERRORS as e:
        raise ValueError(f"{where}: {_one_line(e)}") from e
    check_config(config, where)
    return config


def source_config(src: str, revision: str | None) -> dict[str, Any]:
    """The part of ``spec.config`` that names the weights: hub id + revision/commit, or folder + hashes."""
    p = Path(src)
    if p.is_dir():
        return {"weights": str(p.resolve()), **folder_fingerprint(p)}
    return {"weights": src, "revision": revision, "commit": hub_commit(src, revision)}


def hub_commit(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The commit of the hub cache snapshot a model was loaded from (a content address), if known."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cache = None if cache_dir is None else os.fspath(cache_dir)
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision)
    except Exception:  # an id the cache cannot parse, or an older huggingface_hub
        return None
    return Path(found).parent.name if isinstance(found, str) else None  # .../snapshots/<commit>/config.json


def read_processor_config(src: str, revision: str | None, local_files_only: bool) -> dict[str, Any] | None:
    """The model's ``preprocessor_config.json`` as a dict, or None when it has none.

    Read as JSON rather than through AutoImageProcessor, whose fast processors need torchvision.
    """
    p = Path(src)
    if p.is_dir():
        f = p / "preprocessor_config.json"
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(
                src,
                "preprocessor_config.json",
                revision=revision,
                local_files_only=local_files_only,
                _raise_exceptions_for_missing_entries=False,
            )
        except OSError:
            found = None
        if found is None:
            return None
        f = Path(found)
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from e


def size_from_processor(proc: dict[str, Any]) -> int | None:
    """The square side the processor feeds the model (its crop when it centre-crops)."""
    size: Any = proc.get("crop_size") if proc.get("do_center_crop") else None
    if size is None:
        size = proc.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                return None  # non-square: the caller must choose
            return int(size["height"])
        for key in ("shortest_edge", "longest_edge"):
            if key in size:
                return int(size[key])
    return None


def normalisation_from_processor(
    proc: dict[str, Any], channels: int = 3
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) on [0, 1] pixels, folding the processor's rescale factor into them.

    The processor computes ``(pixel * r - m) / s``; we compute ``(pixel / 255 - m') / s'``, so
    ``m' = m / (255 r)`` and ``s' = s / (255 r)``.
    """
    r = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
    mean: Any = 0.0  # scalars or per-channel lists, as the processor file has them
    std: Any = 1.0
    if proc.get("do_normalize", True):
        mean, std = proc.get("image_mean"), proc.get("image_std")
        if mean is None or std is None:
            return None
    k = 255.0 * r

    def per_channel(v: Any) -> tuple[float, ...]:  # a scalar applies to every channel
        return tuple(float(x) / k for x in (v if isinstance(v, list | tuple) else [v] * channels))

    return per_channel(mean), per_channel(std)


def _patch_size(config: Any) -> int | None:
    p = getattr(config, "patch_size", None)
    if isinstance(p, list | tuple):
        p = p[0] if len(set(p)) == 1 else None
    return int(p) if isinstance(p, int) else None


# ---- fine-tuning a transformers model -------------------------------------------------------------------
#: Factory options that only say where weights came from: dropped when a fine-tuned copy is saved.
_SOURCE_KWARGS = (
    "weights",
    "revision",
    "local_files_only",
    "trust_remote_code",
    "config",
    "random_init",
    "seed",
)
#: Where transformers vision models keep their blocks (ViT/ViT-MAE in transformers 5: ``layers``).
_BLOCK_LISTS = ("encoder.layer", "layers", "encoder.layers", "encoder.layer_list")


class TransformersBackbone(Backbone):
    """A backbone around a transformers model in ``self.model``: layout, checkpointing, saving."""

    model: Any

    def layout(self) -> BackboneLayout | None:
        """``embeddings`` as the stem and the model's list of transformer blocks, when it has them."""
        stem = ("model.embeddings",) if isinstance(getattr(self.model, "embeddings", None), nn.Module) else ()
        for path in _BLOCK_LISTS:
            try:
                blocks = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return BackboneLayout(
                    stem=stem, blocks=tuple(f"model.{path}.{i}" for i in range(len(blocks)))
                )
        return None

    def set_gradient_checkpointing(self, enabled: bool) -> bool:
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            return False
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        m = self.model
        if not enabled:
            (
                m.activation_checkpointing_disable
                if hasattr(m, "activation_checkpointing_enable")
                else m.gradient_checkpointing_disable
            )()
        elif hasattr(m, "activation_checkpointing_enable"):  # non-reentrant: frozen inputs, DDP
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True

    def save_weights(self, folder: str | os.PathLike, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``save_pretrained`` (config.json + model.safetensors): a folder ``weights=`` loads offline."""
        self.model.save_pretrained(str(folder), safe_serialization=True)
        return {k: v for k, v in kwargs.items() if k not in _SOURCE_KWARGS}


# ---- the hf: backbone --------------------------------------------------------------------------------
class HFBackbone(TransformersBackbone):
    """A transformers vision model reduced to ``BackboneOutput`` (see the module docstring for pooling)."""

    def __init__(self, model: Any, *, input_size: int, pooling: str, use_pooler_weights: bool) -> None:
        super().__init__()
        self.model = model.eval()
        self.input_size = input_size
        self._dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        base = getattr(model.config, "image_size", None)
        base = base[0] if isinstance(base, list | tuple) else base
        self._interpolate = "interpolate_pos_encoding" in params and base not in (None, input_size)
        self._mae = getattr(model.config, "model_type", "") == "vit_mae" and "noise" in params
        if self._mae:  # pre-training masks 75% of the patches at random; a feature extractor sees all
            model.config.mask_ratio = 0.0
        patch = _patch_size(model.config)
        self._num_patches = (input_size // patch) ** 2 if patch else None

        channels = int(getattr(model.config, "num_channels", 3))
        with torch.no_grad():
            out = self._run(torch.zeros(1, channels, input_size, input_size))
        hidden = out.last_hidden_state
        self._prefix = 0
        if hidden.ndim == 3 and self._num_patches is not None and hidden.shape[1] > self._num_patches:
            self._prefix = hidden.shape[1] - self._num_patches
        has_pooler = getattr(out, "pooler_output", None) is not None and use_pooler_weights
        if pooling == "auto":
            pooling = "pooler" if has_pooler else "mean"
        if pooling == "pooler" and not has_pooler:
            raise ValueError("pooling='pooler': this model has no (loaded) pooler; use pooling='mean'")
        if pooling == "cls" and self._prefix == 0:
            raise ValueError("pooling='cls': this model's hidden state has no CLS token; use pooling='mean'")
        self.pooling = pooling
        feats, toks = self._reduce(out)
        self._token_shape = (int(toks.shape[1]), int(toks.shape[2]))
        self._feature_dim = int(feats.shape[1])

    def _run(self, x: torch.Tensor) -> Any:
        kw: dict[str, Any] = {}
        if self._interpolate:
            kw["interpolate_pos_encoding"] = True
        if self._mae and self._num_patches is not None:
            # ViT-MAE shuffles patches by argsort(noise); increasing noise keeps them in place.
            kw["noise"] = torch.arange(self._num_patches, dtype=torch.float32, device=x.device).expand(
                x.shape[0], -1
            )
        return self.model(pixel_values=x.to(self._dtype), **kw)

    def _reduce(self, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = out.last_hidden_state
        if hidden.ndim == 4:  # (N, C, H, W) convolutional feature map
            toks = hidden.flatten(2).transpose(1, 2)
        elif hidden.ndim == 3:
            toks = hidden[:, self._prefix :]
        else:
            raise ValueError(f"unsupported last_hidden_state of shape {tuple(hidden.shape)}")
        if self.pooling == "pooler":
            feats = out.pooler_output.flatten(1)
        elif self.pooling == "cls":
            feats = hidden[:, 0]
        else:
            feats = toks.mean(1)
        return feats.float(), toks.float()

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:
        feats, toks = self._reduce(self._run(x))
        return BackboneOutput(features=feats, tokens=toks if tokens else None)

    def save_weights(self, folder: str | os.PathLike, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """As the base class, plus the resolved preprocessing and pooling (a saved pooler would
        otherwise switch ``pooling="auto"`` from mean to pooler)."""
        out = super().save_weights(folder, kwargs)
        s = self.spec
        return {
            **out,
            "pooling": self.pooling,
            "image_size": s.input_size,
            "mean": list(s.mean),
            "std": list(s.std),
        }


@register_backbone("hf", prefix=True)
def create_hf_backbone(
    model: str,
    *,
    weights: str | None = None,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    pooling: str = "auto",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
) -> HFBackbone:
    """``hf:<hub id or local folder>``: AutoModel + the model's preprocessing settings.

    ``image_size``/``mean``/``std`` override (or stand in for a missing) preprocessor_config.json;
    ``mean``/``std`` apply to [0, 1] pixels. ``pooling`` is auto|pooler|mean|cls (module docstring).
    ``trust_remote_code=True`` lets transformers import and run the Python code the repository or
    folder ships; without it such a model is refused. Only a person's flag may set it, never a file.

    ``weights`` (a hub id or local folder) loads other weights of the same model than ``model`` names,
    e.g. a fine-tuned copy saved in a checkpoint.
    """
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
    override = normalisation_override(mean, std)  # its length is checked once the channels are known
    transformers = import_transformers()
    model = weights or model
    src = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else model
    offline = resolve_offline(src, local_files_only)
    # Always explicit: left unset, transformers would prompt on a terminal for a repository with custom
    # code; running that code is only ever the caller's decision (CLI --trust-remote-code).
    net, info = load_pretrained(
        transformers.AutoModel,
        src,
        revision=revision,
        local_files_only=offline,
        trust_remote_code=trust_remote_code is True,
    )
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        net = net.to(torch_dtype)

    proc = read_processor_config(src, revision, offline) or {}
    size = image_size or size_from_processor(proc)
    if size is None:
        base = getattr(net.config, "image_size", None)
        size = base if isinstance(base, int) else None
    if size is None:
        raise ValueError(f"{src}: no size in preprocessor_config.json or config; pass image_size=")
    channels = int(getattr(net.config, "num_channels", 3))
    norm = normalisation_from_processor(proc, channels) if proc else None
    if override is not None:
        norm = override
    if norm is None:
        raise ValueError(
            f"{src}: has no preprocessor_config.json with image_mean/image_std; pass mean= and std= "
            "(e.g. ImageNet: mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
        )
    if len(norm[0]) != channels or len(norm[1]) != channels:
        raise ValueError(f"{src}: mean/std need {channels} values, got {len(norm[0])}/{len(norm[1])}")

    missing = info.get("missing_keys", []) if isinstance(info, dict) else []
    pooler_loaded = not any(k.startswith("pooler") or ".pooler." in k for k in missing)
    bb = HFBackbone(net, input_size=int(size), pooling=pooling, use_pooler_weights=pooler_loaded)
    bb.source = src
    bb.spec = BackboneSpec(
        name=f"hf:{src}",
        input_size=int(size),
        colour="L" if channels == 1 else "RGB",
        mean=norm[0],
        std=norm[1],
        feature_dim=bb._feature_dim,
        token_shape=bb._token_shape,
        config={
            **source_config(src, revision),
            "model_type": getattr(net.config, "model_type", None),
            "pooling": bb.pooling,
            "dtype": str(bb._dtype).removeprefix("torch."),
        },
    )
    return bb
