"""The PyTorch engine of the prediction pipeline: MTCNN, the backbone and the model's heads in torch.

What an engine is, and the other one (onnxruntime), in :mod:`mtaffect.predict.engines`. This module is
the only part of the pipeline that imports torch; ``--engine onnxruntime`` never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager

import numpy as np
import torch

from mtaffect.faces.cascade import Cascade
from mtaffect.faces.mtcnn import TorchNets
from mtaffect.models.base import FaceAffectModel
from mtaffect.models.loading import load_face_model
from mtaffect.models.outputs import AffectOutputs
from mtaffect.predict.threads import resolve_threads, torch_threads

#: The face model of a name or object (:func:`mtaffect.models.loading.load_face_model`), under the name
#: :mod:`mtaffect.predict` exports.
load_affect_model = load_face_model


def torch_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device that exists here; a clear ValueError (not a traceback later) when
    it does not parse, or names CUDA/MPS on a machine without them."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: Apple MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: only cpu, cuda and mps are supported")
    return dev


class TorchEngine:
    """A ``FaceAffectModel`` (the embedded default, a checkpoint, ``emotiefflib:``) and its backbone in
    torch, MTCNN with the embedded weights. See :class:`mtaffect.predict.engines.Engine`.

    ``num_threads``: torch threads while the pipeline's code runs ("auto": every core but one; None:
    torch's setting as is), the caller's setting put back in between (:mod:`mtaffect.predict.threads`).
    """

    name = "torch"

    def __init__(
        self,
        model: FaceAffectModel | str | os.PathLike | None = None,
        device: str = "cpu",
        num_threads: int | str | None = "auto",
        batch_size: int = 64,
    ) -> None:
        self.num_threads = resolve_threads(num_threads)
        self._nets: TorchNets | None = None  # MTCNN's nets, loaded on the first detection
        self.device = torch_device(device)
        self.model = load_affect_model(model, self.device)
        # a trained checkpoint builds its own backbone (with its fine-tuned weights, when it has them)
        self.backbone = self.model.create_backbone().to(self.device).eval()
        spec = self.backbone.spec
        self.input_size, self.colour = spec.input_size, spec.colour
        self.batch_size = int(batch_size)
        self.temporal = bool(getattr(self.model, "temporal", False))
        self.window = int(getattr(self.model, "window", 1) or 1) if self.temporal else 1
        self.window_edge = str(getattr(self.model, "window_edge", "pad"))  # a track's last window
        self.inputs = tuple(getattr(self.model, "inputs", ()) or ())
        self._tokens = "tokens" in self.inputs

    @property
    def au_thresholds(self) -> np.ndarray:
        return np.asarray(self.model.au_thresholds, np.float64)

    @property
    def au_source(self) -> str:
        return str(getattr(self.model, "au_source", "model"))

    def running(self) -> AbstractContextManager:
        return torch_threads(self.num_threads)

    def detector(self, min_face_size: float, batch_size: int) -> Cascade:
        """MTCNN at this face size over the engine's one set of nets (weights read once, however many
        face sizes an input's frame sizes call for), as the onnxruntime engine does."""
        if self._nets is None:
            self._nets = TorchNets(self.device)
        return Cascade(self._nets, min_face_size, batch_size=batch_size)

    def _backbone_batches(self, faces: np.ndarray) -> Iterator:
        """Backbone outputs for backbone-ready faces (n, S, S[, 3]), ``batch_size`` at a time."""
        for s in range(0, len(faces), self.batch_size):
            x = self.backbone.preprocess(faces[s : s + self.batch_size]).to(self.device)
            yield self.backbone(x, tokens=self._tokens)

    @torch.inference_mode()
    def heads(self, faces: np.ndarray) -> AffectOutputs:
        va, expr, au = [], [], []
        for out in self._backbone_batches(faces):
            res = self.model.predict(out.features, out.logits, out.tokens)
            va.append(np.asarray(res.va))
            expr.append(np.asarray(res.expr_probs))
            au.append(np.asarray(res.au_probs))
        cat = np.concatenate
        return AffectOutputs(cat(va), cat(expr), cat(au))

    @torch.inference_mode()
    def embed(self, faces: np.ndarray) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {"features": [], "logits": [], "tokens": []}
        for out in self._backbone_batches(faces):
            for name in parts:
                a = getattr(out, name, None)
                if a is not None:
                    parts[name].append(a.float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in parts.items() if v}

    @torch.inference_mode()
    def predict(self, features, logits=None, tokens=None) -> AffectOutputs:
        return self.model.predict(features, logits, tokens)

    def describe(self) -> dict:
        m = self.model
        cfg = getattr(m, "config", None)
        return {
            "model": type(m).__name__,
            "model_config": cfg if isinstance(cfg, dict) else None,
            "backbone": m.backbone,
            "backbone_kwargs": dict(m.backbone_kwargs),
        }

    def card(self) -> dict[str, str]:
        m = self.model
        card = {str(k): str(v) for k, v in (m.card() if hasattr(m, "card") else {}).items()}
        card.setdefault("name", str(getattr(m, "name", type(m).__name__)))
        card.setdefault("backbone", str(m.backbone))
        return card


__all__ = ["TorchEngine", "load_affect_model", "torch_device"]
