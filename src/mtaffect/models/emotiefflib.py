"""A zero-training application model from EmotiEffLib's published multi-task ONNX networks.

``mtaffect predict --model emotiefflib:enet_b0_8_va_mtl`` (or ``Predictor(model="emotiefflib:...")``)
runs one of Savchenko's EmotiEffLib/HSEmotion models on the aligned faces and reads its outputs as
they are (the file is found as :mod:`mtaffect.features.emotiefflib` describes: a local ``.onnx``
path, ``$EMOTIEFFLIB_HOME``, or EmotiEffLib's own download cache ``~/.emotiefflib``):

- expression: the 8 AffectNet class scores (EmotiEffLib's alphabetical order) -> softmax -> the ABAW
  classes (:data:`~mtaffect.features.emotiefflib.AFFECTNET_TO_ABAW`: Contempt, which ABAW lacks, goes to
  Other; the 7-class models leave Other at 0);
- valence/arousal: the ``*_va_mtl`` models' two regression outputs, clipped to [-1, 1] (real VA,
  trained on AffectNet); models without them get the default model's expression-weighted VA priors;
- AUs: none of these networks predicts AUs, so, as in the embedded default model, ``P(AU) = sum_e P(e)
  P(AU | e)`` from the CK+ / s-Aff-Wild2 priors (:mod:`mtaffect.models.default`).

Faces reach the network as the pipeline's 112x112 five-point-aligned crops resized to its input
(224 for the EfficientNets), with its ImageNet normalisation; EmotiEffLib itself feeds detector box
crops, which frame the face a little more loosely.
"""

from __future__ import annotations

import numpy as np
import torch

from mtaffect.features.emotiefflib import (
    MODELS,
    default_logit_names,
    to_abaw_expression_probs,
)
from mtaffect.models.base import AffectOutputs
from mtaffect.models.default import DefaultAffectModel
from mtaffect.schema import VA_NAMES

PREFIX = "emotiefflib:"


class EmotiEffLibAffectModel(DefaultAffectModel):
    """:class:`~mtaffect.models.base.FaceAffectModel` over an EmotiEffLib ONNX network (module doc)."""

    def __init__(self, model: str = "enet_b0_8_va_mtl", path: str | None = None, **onnx_kwargs) -> None:
        super().__init__()
        model = model[len(PREFIX) :] if model.startswith(PREFIX) else model
        self.model_name = model
        self.backbone = f"{PREFIX}{model}"
        self.backbone_kwargs = dict(onnx_kwargs, **({"path": path} if path is not None else {}))
        stem = model.rsplit("/", 1)[-1].removesuffix(".onnx")
        self._info = MODELS.get(stem)
        self.name = f"emotiefflib:{stem} (+ AU priors)"

    def logit_names(self, n: int) -> tuple[str, ...]:
        """Names of the network's ``n`` outputs (the known model's layout, else EmotiEffLib's by count)."""
        names = self._info.logit_names if self._info is not None else default_logit_names(None, n)
        if len(names) != n:
            raise ValueError(f"{self.backbone}: {n} outputs where {len(names)} were expected ({names})")
        return names

    def predict(
        self, features: torch.Tensor, logits: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> AffectOutputs:
        """The network's scores (N, 10) (8 AffectNet classes, valence, arousal) -> probabilities."""
        if logits is None:
            raise ValueError(f"{self.backbone} gives no scores; is it an EmotiEffLib classifier?")
        names = self.logit_names(int(logits.shape[-1]))
        expr = to_abaw_expression_probs(logits.detach().float().cpu(), names).double().numpy()
        if all(n in names for n in VA_NAMES):
            cols = [names.index(n) for n in VA_NAMES]
            va = np.clip(logits.detach().float().cpu().numpy()[:, cols], -1.0, 1.0)
        else:
            va = expr @ self.va_means
        return AffectOutputs(
            va=np.asarray(va, np.float32),
            expr_probs=expr.astype(np.float32),
            au_probs=(expr @ self.p_au).astype(np.float32),
        )

    def card(self) -> dict:
        has_va = self._info is None or self._info.va
        return {
            "name": self.name,
            "backbone": self.backbone,
            "expression": "AffectNet's 8 classes (softmax) -> 8 ABAW classes; Contempt -> Other",
            "va": "the network's valence/arousal outputs" if has_va else "sum_e P(e) VA mean of e (priors)",
            "au": "sum_e P(e) P(AU|e) (CK+ FACS + s-Aff-Wild2 priors): the network has no AU output",
        }


__all__ = ["PREFIX", "EmotiEffLibAffectModel"]
