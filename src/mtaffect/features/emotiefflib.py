"""``emotiefflib:<model>``: EmotiEffLib / HSEmotion ONNX face models run with onnxruntime.

``create_backbone("emotiefflib:enet_b0_8_va_mtl")`` looks for ``enet_b0_8_va_mtl.onnx`` in, in order:
``path=`` (a folder, or the file itself), ``$EMOTIEFFLIB_HOME``, ``~/.emotiefflib`` (where EmotiEffLib
caches its downloads) and ``~/.hsemotion`` (hsemotion-onnx's cache); each folder also through an
``onnx/`` subfolder, as in a clone of the EmotiEffLib repository. ``<model>`` may also be a path to
any ``.onnx`` file; its settings come from :data:`MODELS` when its stem is a known name, else the input
size is read from the graph and ``mean=``/``std=`` must be given.

Features: the published files output only the classifier scores. At load, the graph is edited in
memory (with the ``onnx`` package) to also output the input of its final classifier node (a Gemm, or
MatMul + Add, possibly followed by Reshape/Flatten/Identity): the penultimate features EmotiEffLib's
own ``extract_features`` returns. A model that already outputs features and scores (two outputs, one
feeding the classifier of the other) is used as is; otherwise name the tensors with
``feature_output=``/``logit_output=``.

Scores: ``logits`` are the raw classifier outputs; for the 8-class models they are the AffectNet
classes in EmotiEffLib's (alphabetical) order, and the ``*_va_mtl`` models append valence and arousal
(regressed, not logits). :func:`to_abaw_expression_probs` turns the expression part into the 8 ABAW
classes (Contempt, which ABAW lacks, goes to Other).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtaffect.features.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneOutput,
    BackboneSpec,
    normalisation_override,
)
from mtaffect.features.hf import HUB_EXTRA_HINT, file_sha256
from mtaffect.features.registry import register_backbone
from mtaffect.schema import EXPR_NAMES, VA_NAMES

#: AffectNet's 8 classes in the order of EmotiEffLib's 8-class models: alphabetical, i.e. Anger,
#: Contempt, Disgust, Fear, Happiness, Neutral, Sadness, Surprise (the ABAW names minus Other, plus
#: Contempt).
AFFECTNET_NAMES: tuple[str, ...] = tuple(sorted([*(n for n in EXPR_NAMES if n != "Other"), "Contempt"]))
#: The 7-class models (``enet_b2_7``) drop Contempt and keep the order.
AFFECTNET7_NAMES: tuple[str, ...] = tuple(n for n in AFFECTNET_NAMES if n != "Contempt")
_OTHER = EXPR_NAMES.index("Other")
#: ABAW expression index of each AffectNet class (in :data:`AFFECTNET_NAMES` order); Contempt -> Other.
AFFECTNET_TO_ABAW: tuple[int, ...] = tuple(
    EXPR_NAMES.index(n) if n in EXPR_NAMES else _OTHER for n in AFFECTNET_NAMES
)

HALF_NORM = (0.5, 0.5, 0.5)
ENV_HOME = "EMOTIEFFLIB_HOME"
DOWNLOAD_HINT = "https://github.com/sb-ai-lab/EmotiEffLib/tree/main/models/affectnet_emotions/onnx"
# Nodes between the classifier and the graph output that do not change the values.
_PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Cast")


@dataclass(frozen=True)
class EmotiEffModel:
    """What the published file expects and returns (EmotiEffLib's preprocessing, its model list)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int  # 8 AffectNet classes, or 7 without Contempt
    va: bool  # valence and arousal appended to the scores (the *_mtl models)
    feature_dim: int  # penultimate size of the published file (a mismatch only warns)

    @property
    def logit_names(self) -> tuple[str, ...]:
        names = AFFECTNET_NAMES if self.num_classes == 8 else AFFECTNET7_NAMES
        return names + (VA_NAMES if self.va else ())


MODELS: dict[str, EmotiEffModel] = {
    "enet_b0_8_best_afew": EmotiEffModel(224, IMAGENET_MEAN, IMAGENET_STD, 8, False, 1280),
    "enet_b0_8_best_vgaf": EmotiEffModel(224, IMAGENET_MEAN, IMAGENET_STD, 8, False, 1280),
    "enet_b0_8_va_mtl": EmotiEffModel(224, IMAGENET_MEAN, IMAGENET_STD, 8, True, 1280),
    "enet_b2_7": EmotiEffModel(260, IMAGENET_MEAN, IMAGENET_STD, 7, False, 1408),
    "enet_b2_8": EmotiEffModel(260, IMAGENET_MEAN, IMAGENET_STD, 8, False, 1408),
    "mbf_va_mtl": EmotiEffModel(112, HALF_NORM, HALF_NORM, 8, True, 512),
    "mobilevit_va_mtl": EmotiEffModel(224, IMAGENET_MEAN, IMAGENET_STD, 8, True, 768),
}


def to_abaw_expression_probs(logits: torch.Tensor, logit_names: tuple[str, ...]) -> torch.Tensor:
    """(N, len(logit_names)) scores -> (N, 8) ABAW expression probabilities.

    Softmax over the AffectNet class scores only (valence/arousal are left out), then each class's
    probability goes to its ABAW class: Contempt to Other; Other stays 0 for 7-class models.
    """
    cols = [i for i, n in enumerate(logit_names) if n in AFFECTNET_NAMES]
    if not cols:
        raise ValueError(f"no AffectNet class among the logit names {logit_names}")
    probs = torch.softmax(logits[:, cols].float(), dim=1)
    target = torch.tensor([AFFECTNET_TO_ABAW[AFFECTNET_NAMES.index(logit_names[i])] for i in cols])
    out = torch.zeros(logits.shape[0], len(EXPR_NAMES), dtype=probs.dtype, device=probs.device)
    return out.index_add_(1, target.to(probs.device), probs)


# ---- locating and editing the ONNX file ----------------------------------------------------------------
def search_dirs(path: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for ``<name>.onnx``, in order (see the module docstring)."""
    roots = [Path(path).expanduser()] if path is not None else []
    if os.environ.get(ENV_HOME):
        roots.append(Path(os.environ[ENV_HOME]).expanduser())
    roots += [Path.home() / ".emotiefflib", Path.home() / ".hsemotion"]
    return [d for r in roots for d in (r, r / "onnx")]


def resolve_model_file(model: str, path: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """(onnx file, known model name or None) for ``emotiefflib:<model>``."""
    if path is not None and Path(path).expanduser().is_file():
        f = Path(path).expanduser()
        return f, model if model in MODELS else (f.stem if f.stem in MODELS else None)
    as_path = Path(model).expanduser()
    if model.endswith(".onnx") or os.sep in model or as_path.is_file():
        if not as_path.is_file():
            raise FileNotFoundError(f"{as_path}: no such ONNX file")
        return as_path, as_path.stem if as_path.stem in MODELS else None
    dirs = search_dirs(path)
    for d in dirs:
        if (d / f"{model}.onnx").is_file():
            return d / f"{model}.onnx", model if model in MODELS else None
    known = "" if model in MODELS else f" ({model!r} is not a known model: {', '.join(MODELS)})"
    raise FileNotFoundError(
        f"EmotiEffLib model {model}.onnx not found{known}; looked in: {', '.join(map(str, dirs))}.\n"
        f"Download {model}.onnx from {DOWNLOAD_HINT} into ~/.emotiefflib/ (EmotiEffLib fills that cache "
        f"when run once), set ${ENV_HOME} to its folder, or pass path= (a folder or the .onnx file)."
    )


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"EmotiEffLib backbones need `onnx` and `onnxruntime`: {HUB_EXTRA_HINT}") from e
    return onnx, onnxruntime


def _classifier_input(graph: Any, output: str) -> str | None:
    """Name of the tensor that enters the final classifier producing ``output``, or None."""
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    node = producers.get(output)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "Add":  # MatMul + bias
        mm = [producers.get(i) for i in node.input if i not in inits]
        node = mm[0] if len(mm) == 1 and mm[0] is not None and mm[0].op_type == "MatMul" else None
    if node is None:
        return None
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return node.input[0] if not trans_a else None
    if node.op_type == "MatMul":
        data = [i for i in node.input if i not in inits]
        return data[0] if len(data) == 1 else None
    return None


def expose_features(
    model: Any, source: Path, feature_output: str | None = None, logit_output: str | None = None
) -> tuple[str, str]:
    """Make the graph output its penultimate features; returns (feature name, logit name)."""
    from onnx import helper

    graph = model.graph
    outputs = [o.name for o in graph.output]
    if logit_output is not None and logit_output not in outputs:
        raise ValueError(f"{source}: logit_output {logit_output!r} is not a graph output ({outputs})")
    if logit_output is None:
        if feature_output is not None and len(outputs) == 2 and feature_output in outputs:
            logit_output = next(o for o in outputs if o != feature_output)
        elif len(outputs) == 1:
            logit_output = outputs[0]
        elif len(outputs) == 2 and feature_output is None:
            for logits, other in (outputs, outputs[::-1]):
                if _classifier_input(graph, logits) == other:
                    return other, logits
        if logit_output is None:
            raise ValueError(
                f"{source}: has outputs {outputs}; say which are which with feature_output= and logit_output="
            )
    if feature_output is None:
        feature_output = _classifier_input(graph, logit_output)
        if feature_output is None:
            raise ValueError(
                f"{source}: found no final Gemm/MatMul classifier before output {logit_output!r}; pass "
                "feature_output=<tensor name> (see Netron) or export a model with a features output"
            )
    known = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    if feature_output not in known:
        raise ValueError(f"{source}: the graph has no tensor named {feature_output!r}")
    if feature_output not in outputs:
        elem = next(o.type.tensor_type.elem_type for o in graph.output if o.name == logit_output)
        graph.output.append(helper.make_tensor_value_info(feature_output, elem, None))
    return feature_output, logit_output


def default_providers(ort: Any) -> list[str]:
    """CUDA when this onnxruntime build has it, always with the CPU fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


# ---- the backbone -------------------------------------------------------------------------------------
class EmotiEffLibBackbone(Backbone):
    """An onnxruntime session returning (penultimate features, scores) as torch tensors."""

    def __init__(self, session: Any, feature_output: str, logit_output: str, fixed_batch: bool) -> None:
        super().__init__()
        self.session = session
        inp = session.get_inputs()[0]
        self._input = inp.name
        self._np_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self._outputs = [feature_output, logit_output]
        self._fixed_batch = fixed_batch  # graph exported with batch 1: run one image at a time

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=self._np_dtype)
        if self._fixed_batch:
            parts = [self.session.run(self._outputs, {self._input: x[i : i + 1]}) for i in range(len(x))]
            feats, logits = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
        else:
            feats, logits = self.session.run(self._outputs, {self._input: x})
        return feats.reshape(len(x), -1), logits.reshape(len(x), -1)

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:
        if tokens:
            raise ValueError(f"{self.spec.name} has no tokens (spec.token_shape is None)")
        feats, logits = self.run(x.detach().cpu().numpy())
        feats_t, logits_t = (torch.from_numpy(a).float().to(x.device) for a in (feats, logits))
        return BackboneOutput(features=feats_t, logits=logits_t)


def _input_dims(model: Any, source: Path) -> list[int | str]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"{source}: expected one image input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    out = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    if len(out) != 4:
        raise ValueError(f"{source}: expected an (N, C, H, W) input, got dims {out}")
    return out


@register_backbone("emotiefflib", prefix=True)
def create_emotiefflib(
    model: str,
    *,
    path: str | os.PathLike | None = None,
    providers: list[str] | None = None,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    logit_names: tuple[str, ...] | None = None,
    feature_output: str | None = None,
    logit_output: str | None = None,
    num_threads: int | None = None,
) -> EmotiEffLibBackbone:
    """``emotiefflib:<known name or .onnx path>``; keyword overrides apply to unknown files mostly."""
    onnx, ort = _import_onnx()
    file, known = resolve_model_file(model, path)
    info = MODELS.get(known) if known else None
    try:
        proto = onnx.load(str(file))
    except Exception as e:
        raise ValueError(f"{file}: not a readable ONNX model ({e})") from e
    dims = _input_dims(proto, file)
    feat_name, logit_name = expose_features(proto, file, feature_output, logit_output)

    graph_size = dims[2] if isinstance(dims[2], int) and dims[2] > 0 and dims[2] == dims[3] else None
    size = input_size or (info.input_size if info else None) or graph_size
    if size is None:
        raise ValueError(f"{file}: the graph input has no fixed square size ({dims}); pass input_size=")
    if graph_size is not None and size != graph_size:
        raise ValueError(f"{file}: the graph takes {graph_size}x{graph_size} images, not {size}x{size}")
    norm = normalisation_override(mean, std)
    if norm is None:
        if info is None:
            raise ValueError(
                f"{file}: unknown model, so its normalisation is unknown: pass mean= and std= "
                f"(EmotiEffNets use ImageNet's {IMAGENET_MEAN}/{IMAGENET_STD}; MobileFaceNets 0.5/0.5)"
            )
        norm = info.mean, info.std

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=providers or default_providers(ort)
    )
    fixed_batch = isinstance(dims[0], int) and dims[0] == 1
    bb = EmotiEffLibBackbone(session, feat_name, logit_name, fixed_batch)
    channels = dims[1] if isinstance(dims[1], int) and dims[1] > 0 else 3
    probe_f, probe_l = bb.run(np.zeros((1, channels, size, size), dtype=np.float32))
    feature_dim, num_logits = probe_f.shape[1], probe_l.shape[1]

    if info is not None:
        if num_logits != len(info.logit_names):
            raise ValueError(
                f"{file}: outputs {num_logits} scores but {known} has {len(info.logit_names)} "
                f"({', '.join(info.logit_names)}); is it the right file?"
            )
        if feature_dim != info.feature_dim:
            warnings.warn(
                f"{file}: {feature_dim} features where the published {known} has {info.feature_dim}",
                stacklevel=2,
            )
    names = tuple(logit_names) if logit_names is not None else default_logit_names(info, num_logits)
    if len(names) != num_logits:
        raise ValueError(f"{file}: {len(names)} logit_names for {num_logits} scores")

    bb.source = str(file.resolve())
    bb.spec = BackboneSpec(
        name=f"emotiefflib:{known or file.resolve()}",
        input_size=int(size),
        colour="L" if channels == 1 else "RGB",
        mean=tuple(float(m) for m in norm[0]),
        std=tuple(float(s) for s in norm[1]),
        feature_dim=int(feature_dim),
        num_logits=int(num_logits),
        logit_names=names,
        token_shape=None,
        config={
            "onnx_sha256": file_sha256(file),
            "feature_output": feat_name,
            "logit_output": logit_name,
        },
    )
    return bb


def default_logit_names(info: EmotiEffModel | None, n: int) -> tuple[str, ...]:
    """The known model's names; for unknown files the EmotiEffLib layouts by count, else generic."""
    if info is not None:
        return info.logit_names
    by_count = {
        10: AFFECTNET_NAMES + VA_NAMES,
        9: AFFECTNET7_NAMES + VA_NAMES,
        8: AFFECTNET_NAMES,
        7: AFFECTNET7_NAMES,
    }
    return by_count.get(n, tuple(f"logit{i}" for i in range(n)))
