"""The PyTorch modules that become ONNX graphs: the face model (pixels -> probabilities) and MTCNN.

:class:`FaceGraph` wraps what prediction runs, in the same order and arithmetic: the backbone's
normalisation of uint8 pixels (``Backbone.preprocess``), the backbone, the model's heads and the
conversion to probabilities (softmax over expressions, sigmoid per AU, VA as is). The default model's
heads (fer logits -> ABAW probabilities by priors) are re-expressed as tensor ops in
:class:`DefaultHead`; trained recipes run their own ``forward``.

``torch.export`` unrolls ``nn.LSTM`` over time, which would fix the window length of temporal models;
:func:`export_friendly` swaps each LSTM for :class:`ExportLSTM`, an opaque custom op per layer that the
exporter writes as one ONNX ``LSTM`` node (:data:`CUSTOM_TRANSLATIONS`), so windows stay dynamic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from mtaffect.features.base import Backbone
from mtaffect.features.fer_minixception import FER_TO_EXPR
from mtaffect.models.default import OTHER_INDEX, DefaultAffectModel
from mtaffect.schema import NUM_EXPR

if TYPE_CHECKING:
    from onnxscript.onnx_types import INT64

#: Output names of the face graph, in order; the backbone arrays the heads read follow them.
PROB_OUTPUTS: tuple[str, str, str] = ("expr_probs", "au_probs", "va")


class DefaultHead(nn.Module):
    """The default model's heads as tensor ops: fer's 7 logits -> (expr_probs, au_probs, va).

    Same formulas as :meth:`mtaffect.models.default.DefaultAffectModel.predict` (which runs them in
    float64 numpy): softmax, the fer -> ABAW class map, the ``Other`` share for unsure faces, then the
    AU and VA priors mixed by the expression probabilities.
    """

    reads = ("logits",)
    to_abaw: Tensor  # buffers (registered in __init__)
    other: Tensor
    p_au: Tensor
    va_means: Tensor

    def __init__(self, model: DefaultAffectModel) -> None:
        super().__init__()
        to_abaw = np.zeros((len(FER_TO_EXPR), NUM_EXPR), np.float32)
        to_abaw[np.arange(len(FER_TO_EXPR)), list(FER_TO_EXPR)] = 1.0
        other = np.zeros(NUM_EXPR, np.float32)
        other[OTHER_INDEX] = 1.0
        self.tau = float(model.other_tau)
        self.register_buffer("to_abaw", torch.from_numpy(to_abaw))
        self.register_buffer("other", torch.from_numpy(other))
        self.register_buffer("p_au", torch.from_numpy(model.p_au.astype(np.float32)))
        self.register_buffer("va_means", torch.from_numpy(model.va_means.astype(np.float32)))

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = torch.softmax(logits, -1)
        expr = p @ self.to_abaw
        if self.tau > 0:
            w = ((self.tau - p.amax(-1, keepdim=True)) / self.tau).clamp(0.0, 1.0)
            expr = expr * (1.0 - w) + w * self.other
        return expr, expr @ self.p_au, expr @ self.va_means


class RecipeHead(nn.Module):
    """A trained recipe's forward turned into probabilities (as ``models.base.outputs_to_probs``)."""

    def __init__(self, model: nn.Module, reads: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.reads = tuple(reads)

    def forward(self, *arrays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(dict(zip(self.reads, arrays, strict=True)))
        return torch.softmax(out["expr"].float(), -1), torch.sigmoid(out["au"].float()), out["va"].float()


class FaceGraph(nn.Module):
    """uint8 faces (N, S, S, C) — or windows (N, T, S, S, C) for temporal heads — -> probabilities.

    The pixels are what prediction feeds the backbone: aligned 112x112 crops resized to S with
    ``features.decode.resize_array`` (greyscale backbones: C = 1). Outputs: ``expr_probs``,
    ``au_probs``, ``va`` and then the backbone arrays the heads read (``features`` always: trackers use
    it), with the same leading axes as the input.
    """

    mean: Tensor  # buffers (registered in __init__)
    std: Tensor

    def __init__(self, backbone: Backbone, head: nn.Module, reads: Sequence[str], temporal: bool) -> None:
        super().__init__()
        spec = backbone.spec
        self.backbone = backbone
        self.head = head
        self.temporal = temporal
        self.reads = tuple(reads)
        self.outputs = tuple(dict.fromkeys(("features", *self.reads)))
        self.size = int(spec.input_size)
        self.colour = spec.colour
        self.channels = 1 if spec.colour == "L" else 3
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = pixels.shape[:2] if self.temporal else pixels.shape[:1]
        x = pixels.reshape(-1, self.size, self.size, self.channels).permute(0, 3, 1, 2).float() / 255.0
        out = self.backbone((x - self.mean) / self.std, tokens="tokens" in self.outputs)
        arrays = {"features": out.features, "logits": out.logits, "tokens": out.tokens}
        got = {k: arrays[k].reshape(*lead, *arrays[k].shape[1:]) for k in self.outputs}
        expr, au, va = self.head(*(got[k] for k in self.reads))
        return (expr, au, va, *(got[k] for k in self.outputs))


def face_graph(model, backbone: Backbone) -> FaceGraph:
    """The face graph of a prediction model: the embedded default model or a trained checkpoint."""
    if isinstance(model, DefaultAffectModel):
        return FaceGraph(backbone, DefaultHead(model), DefaultHead.reads, temporal=False)
    reads = tuple(model.inputs)
    return FaceGraph(backbone, RecipeHead(model.model, reads), reads, temporal=bool(model.temporal))


# ---- LSTM as one ONNX node -----------------------------------------------------------------------------


def _torch_gates(w: Tensor) -> Tensor:
    """ONNX gate order (i, o, f, c) -> PyTorch's (i, f, g, o), along the first axis."""
    i, o, f, c = w.chunk(4, 0)
    return torch.cat([i, f, c, o])


def _onnx_gates(w: Tensor) -> Tensor:
    """PyTorch gate order (i, f, g, o) -> ONNX's (i, o, f, c), along the first axis."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, o, f, g])


@torch.library.custom_op("mtaffect::lstm_layer", mutates_args=())
def lstm_layer(x: Tensor, w: Tensor, r: Tensor, b: Tensor, hidden: int) -> Tensor:
    """One unidirectional, batch-first LSTM layer from zero state, weights in ONNX's layout:
    w (1, 4H, in), r (1, 4H, H), b (1, 8H) with gates (i, o, f, c). Returns (B, T, H)."""
    h0 = x.new_zeros(1, x.shape[0], hidden)
    params = [
        _torch_gates(w[0]),
        _torch_gates(r[0]),
        _torch_gates(b[0, : 4 * hidden]),
        _torch_gates(b[0, 4 * hidden :]),
    ]
    out, _, _ = torch._VF.lstm(x, (h0, h0), params, True, 1, 0.0, False, False, True)
    return out


@lstm_layer.register_fake
def _lstm_layer_shape(x: Tensor, w: Tensor, r: Tensor, b: Tensor, hidden: int) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], hidden)


def _lstm_layer_onnx(x, w, r, b, hidden: int):
    """ONNX translation: one LSTM node (onnxruntime wants time-major input, layout 0)."""
    from onnxscript import opset18 as op

    y, _, _ = op.LSTM(op.Transpose(x, perm=[1, 0, 2]), w, r, b, hidden_size=hidden)  # (T, 1, B, H)
    axes = cast("INT64", op.Constant(value_ints=[1]))  # value_ints: an INT64 tensor (typed as any tensor)
    return op.Transpose(op.Squeeze(y, axes), perm=[1, 0, 2])


#: Extra translations for ``torch.onnx.export(custom_translation_table=...)``.
CUSTOM_TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.mtaffect.lstm_layer.default: _lstm_layer_onnx,
}


class ExportLSTM(nn.Module):
    """Inference stand-in for a batch-first, unidirectional ``nn.LSTM``: the same outputs, exportable
    with a dynamic sequence length. Returns ``(output, None)`` (no final state)."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if not lstm.batch_first or lstm.bidirectional or not lstm.bias or lstm.proj_size:
            raise ValueError("only batch-first, unidirectional LSTMs with biases and no projection export")
        self.hidden, self.layers = lstm.hidden_size, lstm.num_layers
        for k in range(self.layers):
            p = {
                n: getattr(lstm, f"{n}_l{k}").detach()
                for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            }
            self.register_buffer(f"w{k}", _onnx_gates(p["weight_ih"])[None])
            self.register_buffer(f"r{k}", _onnx_gates(p["weight_hh"])[None])
            self.register_buffer(
                f"b{k}", torch.cat([_onnx_gates(p["bias_ih"]), _onnx_gates(p["bias_hh"])])[None]
            )

    def forward(self, x: Tensor, hx: None = None) -> tuple[Tensor, None]:
        for k in range(self.layers):
            x = lstm_layer(
                x, getattr(self, f"w{k}"), getattr(self, f"r{k}"), getattr(self, f"b{k}"), self.hidden
            )
        return x, None


@contextlib.contextmanager
def export_friendly(module: nn.Module) -> Iterator[nn.Module]:
    """Swap every ``nn.LSTM`` inside ``module`` for :class:`ExportLSTM` while exporting; restore after."""
    swapped = []
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LSTM):
                swapped.append((parent, name, child))
                setattr(parent, name, ExportLSTM(child).to(next(child.parameters()).device))
    try:
        yield module
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
