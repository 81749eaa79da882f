"""``export_model``: a prediction model and MTCNN as ONNX graphs, checked against PyTorch on the spot.

The folder (see docs/formats.md, "Export folders") holds ``face_model.onnx`` (uint8 faces ->
probabilities and backbone outputs), for temporal models ``head.onnx`` (backbone outputs over a window
-> probabilities: the face graph's heads alone, for windows over face tracks), optionally
``face_model.int8.onnx`` (dynamic int8 quantisation), the three MTCNN nets and ``export.json``.

Each float graph is run by onnxruntime and compared with the PyTorch path that ``mtaffect predict``
runs (synthetic faces for the face model; random crops and a synthetic frame for MTCNN); beyond
``tolerance`` the export is refused and nothing is left behind. The folder is built beside its target
and renamed into place, and an existing folder is replaced only when asked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import inspect
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from mtaffect.data.synth_faces import FaceIdentity, render_face
from mtaffect.export.graphs import (
    CUSTOM_TRANSLATIONS,
    PROB_OUTPUTS,
    DefaultHead,
    FaceGraph,
    export_friendly,
    face_graph,
)
from mtaffect.faces.align import REFERENCE_5PT_112
from mtaffect.faces.cascade import ONET_SIZE, PIXEL_MEAN, PIXEL_SCALE, RNET_SIZE, normalise
from mtaffect.features.decode import RESAMPLE_NAME, resize_array
from mtaffect.models.base import AffectOutputs, FaceAffectModel
from mtaffect.models.loading import load_face_model
from mtaffect.persist import EXPORT, atomic_folder, header
from mtaffect.runtime.engine import make_session
from mtaffect.runtime.manifest import (
    FACE_MODEL,
    FACE_MODEL_INT8,
    HEAD,
    MTCNN_FILES,
    file_records,
    write_manifest,
)
from mtaffect.schema import AU_NAMES, EXPR_NAMES, VA_NAMES

#: Default ONNX opset: onnxruntime >= 1.14 runs it (torch's exporter writes nothing older).
DEFAULT_OPSET: Final[int] = 18
#: Opsets accepted by ``--opset`` (tested: 18 and 21; onnxruntime >= 1.20 runs 21).
OPSETS: Final[range] = range(18, 22)
#: Largest accepted |onnxruntime - torch| on probabilities and VA (and MTCNN outputs).
TOLERANCE: Final[float] = 1e-4
#: Window length of the synthetic windows checking a temporal export whose window is dynamic.
CHECK_WINDOW: Final[int] = 3
#: The export extra (pip install "mtaffect[export]"): torch's ONNX exporter writes with onnx and
#: onnxscript; onnxruntime runs the check.
EXPORT_EXTRA: Final[tuple[str, ...]] = ("onnx", "onnxscript", "onnxruntime")


class ExportCheckError(ValueError):
    """onnxruntime and PyTorch disagree beyond the tolerance: the export is refused."""


def _log_nothing(msg: str) -> None:
    pass


# ---- inputs --------------------------------------------------------------------------------------------


def synthetic_faces(n: int, size: int, colour: str, window: int | None = None, seed: int = 0) -> np.ndarray:
    """n procedurally rendered faces as prediction feeds them, (n, S, S, C) uint8; with a ``window`` T,
    n windows (n, T, S, S, C), each one identity whose AUs drift, like consecutive frames of one track.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ident = FaceIdentity.sample(rng, size=112)
        start, end = rng.uniform(0, 1, (2, len(AU_NAMES)))
        frames = [
            resize_array(render_face(start + (end - start) * t, ident, rng), size, colour)
            for t in np.linspace(0, 1, window or 1)
        ]
        out.append(np.stack([f if f.ndim == 3 else f[..., None] for f in frames]))
    faces = np.stack(out)
    return faces if window is not None else faces[:, 0]


# ---- torch reference -----------------------------------------------------------------------------------


@torch.inference_mode()
def torch_reference(
    graph: FaceGraph, model, pixels: np.ndarray
) -> tuple[AffectOutputs, dict[str, np.ndarray]]:
    """What ``mtaffect predict`` computes with PyTorch for these pixels: probabilities + backbone arrays.

    Temporal models get each (T, ...) window as one sequence, as a checkpoint's ``predict`` does.
    """
    backbone = graph.backbone
    lead = pixels.shape[:2] if graph.temporal else pixels.shape[:1]
    flat = pixels.reshape(-1, *pixels.shape[len(lead) :])
    faces = flat[..., 0] if flat.shape[-1] == 1 else flat
    out = backbone(backbone.preprocess(faces), tokens="tokens" in graph.outputs)
    arrays = {"features": out.features, "logits": out.logits, "tokens": out.tokens}
    got = {k: arrays[k].reshape(*lead, *arrays[k].shape[1:]) for k in graph.outputs}
    if graph.temporal:  # each window is one sequence (1, T, ...)
        parts = [model.predict(**{k: v[i : i + 1] for k, v in got.items()}) for i in range(lead[0])]
        probs = AffectOutputs(
            np.stack([p.va for p in parts]),
            np.stack([p.expr_probs for p in parts]),
            np.stack([p.au_probs for p in parts]),
        )
    else:
        probs = model.predict(**got)
    return probs, {k: v.float().numpy() for k, v in got.items()}


# ---- ONNX ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress and warns about things that do not concern our graphs."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", None)  # None: the root logger,
    loggers = [logging.getLogger(n) for n in names]  # where onnxruntime.quantization warns
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def onnx_export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """``torch.onnx.export`` (the torch.export-based exporter) with named dynamic axes, to ``path``."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes: tuple = tuple(
        {ax: dims.setdefault(name, Dim(name)) for ax, name in dynamic.get(n, {}).items()} for n in inputs
    )
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):  # forward(*arrays): one tuple argument
        shapes = (shapes,)
    with _quiet(), export_friendly(module):
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=shapes,
            opset_version=opset,
            optimize=True,
            verbose=False,
            custom_translation_table=CUSTOM_TRANSLATIONS,
        )
        assert program is not None  # dynamo=True always gives a program (None: the legacy exporter)
        program.save(str(path))
    _check_graph(path, inputs, dynamic, opset)


def _check_graph(path: Path, inputs: list[str], dynamic: dict[str, dict[int, str]], opset: int) -> None:
    """Refuse a graph of another opset than asked, or whose dynamic axis the exporter fixed (it may
    fall back to specialising a shape rather than fail)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got = {o.domain: o.version for o in model.opset_import}.get("", opset)
    if got != opset:
        raise ExportCheckError(f"{path.name}: the exporter wrote opset {got} where {opset} was asked")
    graph = model.graph
    for value in graph.input:
        if value.name not in inputs:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, name in dynamic.get(value.name, {}).items():
            if dims[axis].HasField("dim_value"):
                hint = " (try --window T)" if name == "window" else ""
                raise ExportCheckError(
                    f"{path.name}: the exporter fixed the {name} axis of {value.name} to "
                    f"{dims[axis].dim_value}; this model cannot be exported with a dynamic {name}{hint}"
                )


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportCheckError(f"onnxruntime returned shape {a.shape} where PyTorch returns {b.shape}")
    return float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0


def _prob_diffs(got: list[np.ndarray], want: AffectOutputs) -> dict[str, float]:
    ref = {"expr_probs": want.expr_probs, "au_probs": want.au_probs, "va": want.va}
    return {name: _max_diff(g, ref[name]) for name, g in zip(PROB_OUTPUTS, got, strict=True)}


def _refuse_if(diffs: dict[str, float], what: str, tolerance: float) -> None:
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        detail = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
        raise ExportCheckError(
            f"{what}: onnxruntime differs from PyTorch by more than {tolerance:g} ({detail}); "
            "nothing was written. Try another --opset, or report the model"
        )


# ---- the face model ------------------------------------------------------------------------------------


def _export_face(
    graph: FaceGraph, model, folder: Path, window: int | None, opset: int, tolerance: float, check_faces: int
) -> dict[str, Any]:
    """face_model.onnx and head.onnx, checked; returns their manifest entries and the check figures."""
    s = graph.size
    t_check = window or CHECK_WINDOW
    example = synthetic_faces(2, s, graph.colour, window=t_check if graph.temporal else None, seed=1)
    dynamic = {"pixels": {0: "batch", 1: "window"} if graph.temporal and window is None else {0: "batch"}}
    outputs = [*PROB_OUTPUTS, *graph.outputs]
    example_pixels = torch.from_numpy(example)
    onnx_export(graph, (example_pixels,), folder / FACE_MODEL, ["pixels"], outputs, dynamic, opset)
    face_sess, head_sess = make_session(folder / FACE_MODEL), None
    if graph.temporal:  # the heads alone, for windows over face tracks
        with torch.inference_mode():
            arrays = graph(example_pixels)[len(PROB_OUTPUTS) :]
        head_args = tuple(arrays[graph.outputs.index(k)].clone() for k in graph.reads)
        onnx_export(
            graph.head,
            head_args,
            folder / HEAD,
            list(graph.reads),
            list(PROB_OUTPUTS),
            {k: dynamic["pixels"] for k in graph.reads},
            opset,
        )
        head_sess = make_session(folder / HEAD)

    # The check: a batch size and window the example did not have, and a single face.
    checks: dict[str, Any] = {"faces": 0}
    worst: dict[str, float] = {}
    for n, t in (
        (check_faces, t_check + 2 if window is None else window),
        (1, 1 if window is None else window),
    ):
        pixels = synthetic_faces(n, s, graph.colour, window=t if graph.temporal else None, seed=n + 7)
        want, arrays = torch_reference(graph, model, pixels)
        got = face_sess.run(outputs, {"pixels": pixels})
        diffs = _prob_diffs(got[:3], want)
        if head_sess is not None:
            head_got = head_sess.run(list(PROB_OUTPUTS), {k: arrays[k] for k in graph.reads})
            diffs.update({f"head {k}": v for k, v in _prob_diffs(head_got, want).items()})
        rel = {}
        for name, g in zip(graph.outputs, got[3:], strict=True):
            scale = max(1.0, float(np.abs(arrays[name]).max()))
            rel[name] = _max_diff(g, arrays[name]) / scale  # backbone arrays: relative to their range
        diffs.update(rel)
        _refuse_if(diffs, FACE_MODEL, tolerance)
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in diffs.items()}
        checks["faces"] += int(np.prod(pixels.shape[: 2 if graph.temporal else 1]))
    checks["max_abs_diff"] = worst
    checks["tolerance"] = tolerance
    return checks


def _exact_nodes(path: Path) -> list[str]:
    """Nodes of the default model's prior mixing (probabilities times fixed tables, not learned
    layers), which int8 would only blur (probabilities summing to 1.004): they stay float."""
    import onnx

    keep_float = {f"{c.__module__}.{c.__qualname__}" for c in (DefaultHead,)}
    out = []
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if any(name in meta.get("pkg.torch.onnx.class_hierarchy", "") for name in keep_float):
            out.append(node.name)
    return out


def _quantize(folder: Path, graph: FaceGraph, model, window: int | None) -> dict[str, Any]:
    """face_model.int8.onnx (dynamic int8 weights) and how far it moves the outputs on synthetic faces
    (for temporal models windows of the export's length, or of ``CHECK_WINDOW`` when it is dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = folder / FACE_MODEL, folder / FACE_MODEL_INT8
    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=_exact_nodes(src))
    t = window or CHECK_WINDOW
    pixels = synthetic_faces(16, graph.size, graph.colour, window=t if graph.temporal else None, seed=99)
    names = list(PROB_OUTPUTS)
    ref = dict(zip(names, make_session(src).run(names, {"pixels": pixels}), strict=True))
    got = dict(zip(names, make_session(dst).run(names, {"pixels": pixels}), strict=True))
    thr = np.asarray(model.au_thresholds, np.float32)
    return {
        "faces": int(np.prod(pixels.shape[: 2 if graph.temporal else 1])),
        "max_abs_diff": {k: _max_diff(got[k], ref[k]) for k in names},
        "expression_agreement": float((got["expr_probs"].argmax(-1) == ref["expr_probs"].argmax(-1)).mean()),
        "au_decision_agreement": float(((got["au_probs"] >= thr) == (ref["au_probs"] >= thr)).mean()),
        "note": "int8 vs float32 graph on synthetic faces; accuracy on real faces: docs/benchmarks.md",
    }


# ---- MTCNN ---------------------------------------------------------------------------------------------


def _synthetic_frame(seed: int = 3) -> np.ndarray:
    """A 160x200 frame with one rendered face pasted on noise, for the P-Net check."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    frame[30:142, 50:162] = render_face(rng.uniform(0, 1, len(AU_NAMES)), FaceIdentity.sample(rng), rng)
    return frame


@torch.inference_mode()
def _export_mtcnn(folder: Path, opset: int, tolerance: float) -> dict[str, Any]:
    from mtaffect.faces.cascade import resize_bilinear
    from mtaffect.faces.mtcnn import load_mtcnn_nets

    pnet, rnet, onet = load_mtcnn_nets()
    rng = np.random.default_rng(5)
    crops = {
        n: rng.uniform(-1, 1, (k, 3, n, n)).astype(np.float32) for n, k in ((RNET_SIZE, 7), (ONET_SIZE, 5))
    }
    frame = _synthetic_frame()
    level = normalise(resize_bilinear(frame[None], (97, 121)))
    specs = [
        ("pnet", pnet, level, ["image"], ["prob", "offsets"], {0: "batch", 2: "height", 3: "width"}),
        ("rnet", rnet, crops[RNET_SIZE], ["crops"], ["prob", "offsets"], {0: "batch"}),
        ("onet", onet, crops[ONET_SIZE], ["crops"], ["prob", "offsets", "landmarks"], {0: "batch"}),
    ]
    worst = {}
    for name, net, x, inputs, outputs, dyn in specs:
        path = folder / MTCNN_FILES[name]
        example = torch.from_numpy(
            x[:2] if name != "pnet" else normalise(resize_bilinear(frame[None], (40, 52)))
        )
        onnx_export(net, (example,), path, inputs, outputs, {inputs[0]: dyn}, opset)
        got = make_session(path).run(outputs, {inputs[0]: x})
        want = [t.numpy() for t in net(torch.from_numpy(x))]
        diffs = {f"{name} {o}": _max_diff(g, w) for o, g, w in zip(outputs, got, want, strict=True)}
        _refuse_if(diffs, MTCNN_FILES[name], tolerance)
        worst.update(diffs)
    return {"max_abs_diff": worst, "tolerance": tolerance}


# ---- the folder ----------------------------------------------------------------------------------------


def _describe_source(model: FaceAffectModel, spec: str) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {"model": "default", "name": getattr(model, "name", type(model).__name__)}
    return {
        "model": spec,
        "recipe": config.get("recipe"),
        "temporal": bool(config.get("temporal")),
        "training_window": config.get("window"),
        "window_edge": config.get("window_edge", "pad"),  # how training cut a video's last window
        "metrics": config.get("metrics", {}),
        "backbone_fingerprint": config.get("backbone", {}).get("fingerprint"),
    }


def _io(graph: FaceGraph, window: int | None) -> dict[str, Any]:
    lead = ["batch", window or "window"] if graph.temporal else ["batch"]
    s, c = graph.size, graph.channels
    out = {
        "expr_probs": {"shape": [*lead, len(EXPR_NAMES)], "names": list(EXPR_NAMES)},
        "au_probs": {"shape": [*lead, len(AU_NAMES)], "names": list(AU_NAMES)},
        "va": {"shape": [*lead, 2], "names": list(VA_NAMES)},
    }
    spec = graph.backbone.spec
    dims = {
        "features": [spec.feature_dim],
        "logits": [spec.num_logits],
        "tokens": list(spec.token_shape or []),
    }
    backbone_out = {k: {"shape": [*lead, *dims[k]]} for k in graph.outputs}
    return {
        "inputs": {"pixels": {"dtype": "uint8", "shape": [*lead, s, s, c]}},
        "outputs": {**out, **backbone_out},
        "head_inputs": {k: backbone_out[k] for k in graph.reads},
    }


def export_model(
    model: FaceAffectModel | str | os.PathLike | None = "default",
    out: str | os.PathLike = "export",
    *,
    quantize: bool = False,
    opset: int = DEFAULT_OPSET,
    window: int | None = None,
    detector: bool = True,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
    check_faces: int = 8,
    log: Callable[[str], None] = _log_nothing,
) -> dict[str, Any]:
    """Export ``model`` ("default", a checkpoint folder or a loaded model) and MTCNN to the folder ``out``.

    ``window``: temporal models only; fixes the window length T of the face graph (default: dynamic).
    ``detector=False`` leaves MTCNN out (for faces that are already aligned). Returns the manifest.
    Raises :class:`ExportCheckError` (nothing written) when onnxruntime and PyTorch disagree.
    """
    if opset not in OPSETS:
        raise ValueError(f"opset must be between {OPSETS.start} and {OPSETS.stop - 1}, got {opset}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    require_export_extra()
    import onnxruntime

    with atomic_folder(out, EXPORT, overwrite) as tmp:  # what is in the way is refused before any work
        loaded, graph = _load(model, window)
        log(
            f"exporting the face model ({type(loaded).__name__}, backbone {loaded.backbone}) at opset {opset}"
        )
        checks: dict[str, Any] = {
            "face_model": _export_face(graph, loaded, tmp, window, opset, tolerance, check_faces)
        }
        d = checks["face_model"]["max_abs_diff"]
        log(
            f"  onnxruntime vs torch on {checks['face_model']['faces']} synthetic faces: max |diff| "
            f"{max(d[k] for k in PROB_OUTPUTS):.1e} (tolerance {tolerance:g})"
        )
        if quantize:
            checks["int8"] = _quantize(tmp, graph, loaded, window)
            q = checks["int8"]
            log(
                f"  int8: expression agreement {q['expression_agreement']:.3f}, max |diff| "
                f"{max(q['max_abs_diff'].values()):.3f} vs float32"
            )
        if detector:
            log("exporting MTCNN (P-, R-, O-Net)")
            checks["mtcnn"] = _export_mtcnn(tmp, opset, tolerance)
        manifest = _manifest(
            loaded, str(model), graph, window, opset, quantize, detector, checks, onnxruntime
        )
        manifest["files"] = file_records(tmp)
        write_manifest(tmp, manifest)
    log(f"wrote {out}")
    return manifest


def require_export_extra() -> None:
    """Refuse, before any work, to export without the export extra's packages (:data:`EXPORT_EXTRA`)."""
    missing = [m for m in EXPORT_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"exporting to ONNX needs {', '.join(missing)}, not installed here: "
            'pip install "mtaffect[export]"'
        )


def _load(
    model: FaceAffectModel | str | os.PathLike | None, window: int | None
) -> tuple[FaceAffectModel, FaceGraph]:
    """``model`` as ``mtaffect predict`` loads it and its face graph (with the model's own backbone,
    fine-tuned weights included), or an error saying why it cannot be exported (with ``window``)."""
    loaded = load_face_model(model)  # what `mtaffect predict` runs
    if str(loaded.backbone).startswith("emotiefflib:"):
        raise ValueError(
            f"{model}: its backbone {loaded.backbone} is an ONNX model run by onnxruntime inside torch, "
            "which torch's exporter cannot trace; exporting such models is not supported yet"
        )
    temporal = bool(getattr(loaded, "temporal", False))
    if window is not None and (not temporal or window < 1):
        raise ValueError(
            f"--window {window}: only temporal models (recipe with a temporal module) take a window >= 1"
            if temporal
            else f"--window is for temporal models; {model} predicts one frame at a time"
        )
    torch.manual_seed(0)
    graph = face_graph(loaded, loaded.create_backbone().eval()).eval()
    warm = synthetic_faces(1, graph.size, graph.colour, window=1 if graph.temporal else None, seed=2)
    with torch.inference_mode():  # settle lazy state (weight layouts) outside the traced call
        graph(torch.from_numpy(warm))
    return loaded, graph


def _manifest(model, spec: str, graph: FaceGraph, window, opset, quantize, detector, checks, ort) -> dict:
    bspec = graph.backbone.spec
    io_ = _io(graph, window)
    face = {
        "file": FACE_MODEL,
        "int8_file": FACE_MODEL_INT8 if quantize else None,
        "head_file": HEAD if graph.temporal else None,
        "temporal": graph.temporal,
        "window": window,
        "backbone": {
            "name": model.backbone,
            "kwargs": dict(model.backbone_kwargs),
            "fingerprint": bspec.fingerprint(),
        },
        **io_,
    }
    manifest: dict[str, Any] = {
        **header(EXPORT),
        "opset": opset,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "exported_with": {"torch": torch.__version__.split("+")[0], "onnxruntime": ort.__version__},
        "source": _describe_source(model, spec),
        "face_model": face,
        "preprocessing": {
            "align": {
                "size": 112,
                "template": REFERENCE_5PT_112.tolist(),
                "transform": "least-squares similarity (Umeyama) of the 5 MTCNN landmarks onto the template",
                "sampler": "mtaffect.faces.align.align_faces_fast (PIL reduce by the integer down-scale, "
                "then PIL bilinear affine)",
            },
            "resize": {
                "size": graph.size,
                "filter": RESAMPLE_NAME,
                "function": "mtaffect.features.decode.resize_array",
            },
            "colour": bspec.colour,
            "grey": "PIL convert('L'): ITU-R 601-2 luma" if bspec.colour == "L" else None,
            "normalise": {
                "divide": 255.0,
                "mean": list(bspec.mean),
                "std": list(bspec.std),
                "in_graph": True,
            },
        },
        "postprocessing": {
            "au_thresholds": [float(t) for t in np.asarray(model.au_thresholds, float)],
            "au_source": str(getattr(model, "au_source", "model")),
            "au_names": list(AU_NAMES),
            "expr_names": list(EXPR_NAMES),
        },
        "checks": checks,
    }
    if detector:
        manifest["detector"] = {
            "files": dict(MTCNN_FILES),
            "inputs": {
                "pnet": ["batch", 3, "height", "width"],
                "rnet": ["batch", 3, RNET_SIZE, RNET_SIZE],
                "onet": ["batch", 3, ONET_SIZE, ONET_SIZE],
            },
            "outputs": {
                "pnet": {"prob": ["batch", "h", "w"], "offsets": ["batch", 4, "h", "w"]},
                "rnet": {"prob": ["batch"], "offsets": ["batch", 4]},
                "onet": {"prob": ["batch"], "offsets": ["batch", 4], "landmarks": ["batch", 10]},
            },
            "normalise": {"mean": PIXEL_MEAN, "scale": PIXEL_SCALE, "layout": "NCHW float32 RGB"},
            "pyramid": "mtaffect.faces.cascade.resize_bilinear: torch's uint8 bilinear (half-pixel, int16 "
            "weights, horizontal pass rounded to uint8, then vertical), no antialiasing",
            "defaults": {"min_face_size": 20, "thresholds": [0.6, 0.7, 0.7], "factor": 0.709},
        }
    return manifest
