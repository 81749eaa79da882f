"""AU probabilities and intensities from blendshape evidence combined with an expression model's AU priors.

The embedded default model derives its AUs from the expression alone (``P(AU) = sum_e P(e) P(AU | e)``,
see docs/model_card.md): it cannot tell a closed mouth from an open one on a neutral face (AU25), never
sees a dropped jaw (AU26) and never reaches AU15/AU23. MediaPipe's blendshapes (52 scores in [0, 1] from
:class:`~mtaffect.geometry.landmarker.FaceLandmarker`) measure those movements directly, but some of
them only weakly. This module combines the two per AU with a small, readable model:

    logit(p_k) = a_k * (logit(prior_k) - logit(t_k)) + w_k * (S_k - c_k) + logit(E_k)

- ``prior_k``: the expression model's AU probability, ``t_k`` its decision threshold (``prior_thresholds``);
  centring on ``logit(t_k)`` makes "the prior is exactly at its threshold" the neutral point;
- ``S_k``: the AU's *evidence score*, a signed sum of blendshapes (left/right pairs averaged), chosen by
  FACS meaning (:data:`AU_EVIDENCE`); ``c_k`` the score at which the evidence is neutral (it neither
  raises nor lowers the prior's odds); ``w_k`` the log-odds per unit of score; ``a_k`` how much of the
  prior's log-odds is kept (1: naive Bayes; below 1 where the prior is known to be a weak witness);
- ``E_k``: :data:`EVIDENCE_THRESHOLDS`, the decision threshold of the output (0.5 for every AU).

**How the numbers were set** (the ``basis`` of each row; no AU label of any test set was used):

- ``d'/sigma``: the slope of a binormal likelihood ratio, ``w = d' / sigma``, with ``d' = sqrt(2)
  Phi^-1(AUROC)`` from the AUROC that the blendshape reaches for its AU on posed faces (measured by the
  issue author on CK+-like data), times 0.64, the loss of separability measured in the wild (mouthSmile's
  d' for smiles falls from 2.90 at AUROC 0.98 on posed faces to 1.87 on SMILEsmileD's fit half), over
  ``sigma``, the score's standard deviation on SMILEsmileD's fit half (a total spread, larger than the
  within-class one, so the slope errs low);
- ``prevalence``: ``c`` is the score above which s-Aff-Wild2's AU base rate of faces lies (ABAW
  validation prevalence, ``mtaffect/data/abaw_label_stats.json``) on SMILEsmileD's fit half;
- ``SMILEsmileD fit``: logistic regression of the smile label on ``[logit prior, S]`` over the fit half
  (6,486 faces with a measured face; the half is fixed by ``sha256(path)[0] % 2 == 0``);
- ``mouth labels``: 192 random fit-half faces whose mouths were labelled by eye (closed / lips apart /
  jaw dropped; 31 unclear ones left out), blind to the blendshapes;
- ``FACS``: no measurement exists for the AU (AU15, AU23, AU24): the score follows FACS and a moderate
  slope (4, about AU7's) is used, so the AU fires only where prior and evidence agree.

Rows without evidence (no measured face: NaN blendshapes) keep the prior's *decisions* exactly: their
output is the monotone recalibration ``sigmoid(a_k (logit(prior_k) - logit(t_k)) + logit(E_k))``, clamped
so that ``out >= E_k`` exactly where ``prior >= t_k``. One threshold vector (:data:`EVIDENCE_THRESHOLDS`)
therefore serves every row of a table.

Intensities (:func:`combine`'s second output) are OpenFace-style ``AUxx_r`` on the 0-5 scale for the AUs
whose evidence is strong enough (:data:`mtaffect.schema.AU_INTENSITY_NAMES`), read from the evidence
score alone: ``5 * clip((S - rest) / (1 - rest), 0, 1)``, where ``rest`` is the score of a resting face
(SMILEsmileD fit-half median) and 1 is the blendshapes' full scale. NaN where there is no evidence.

numpy only: no torch, so it runs under every engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from mtaffect.schema import AU_INTENSITY_NAMES, AU_NAMES, BLENDSHAPE_NAMES, NUM_AUS

NUM_BLENDSHAPES: Final[int] = len(BLENDSHAPE_NAMES)
#: |logit| of the output is at most this: probabilities stay within [1e-6, 1 - 1e-6].
LOGIT_CAP: Final[float] = float(np.log(1e6))
#: Prior probabilities are clipped to [_EPS, 1 - _EPS] before the logit (decisions use the raw values).
_EPS: Final[float] = 1e-6


@dataclass(frozen=True)
class AUEvidence:
    """One AU's row of the evidence model (see the module doc for the formula)."""

    au: str
    #: blendshape feature -> weight in the score S; a name without Left/Right that the schema has only as a
    #: Left/Right pair means the pair's mean (``browDown`` = mean of browDownLeft and browDownRight).
    terms: tuple[tuple[str, float], ...]
    #: c: the score at which the evidence is neutral.
    crossover: float
    #: w: log-odds per unit of score (0: the AU comes from the prior alone).
    slope: float
    #: a: the share of the prior's log-odds kept.
    prior_weight: float
    #: where the numbers come from (see the module doc).
    basis: str
    #: one line: why these blendshapes.
    reason: str
    #: resting score (SMILEsmileD fit-half median) for the 0-5 intensity; None: no intensity output.
    rest: float | None = None


#: The evidence model, one row per AU in :data:`mtaffect.schema.AU_NAMES` order. Numbers measured with
#: mtaffect's FaceLandmarker on SMILEsmileD's fit half (``benchmarks/bench_fer_smile.py --derive``).
AU_EVIDENCE: Final[tuple[AUEvidence, ...]] = (
    AUEvidence(
        "AU1",
        (("browInnerUp", 1.0),),
        0.31,
        6.6,
        1.0,
        "d'/sigma (AUROC 0.94, sigma 0.21); prevalence 0.21",
        "inner brow raiser is browInnerUp by definition",
        rest=0.06,
    ),
    AUEvidence(
        "AU2",
        (("browOuterUp", 1.0),),
        0.49,
        8.3,
        1.0,
        "d'/sigma (AUROC 0.96, sigma 0.19); prevalence 0.095",
        "outer brow raiser is browOuterUp by definition",
        rest=0.13,
    ),
    AUEvidence(
        "AU4",
        (("browDown", 1.0),),
        0.11,
        6.0,
        1.0,
        "d'/sigma (AUROC 0.77, sigma 0.11); prevalence 0.20",
        "brow lowerer pulls the brows down and together: browDown",
        rest=0.02,
    ),
    AUEvidence(
        "AU6",
        (),
        0.0,
        0.0,
        1.0,
        "prior only",
        "cheekSquint, its FACS counterpart, is 0.000 on over 99% of real faces (SMILEsmileD) and weak on "
        "posed ones (AUROC 0.62)",
    ),
    AUEvidence(
        "AU7",
        (("eyeSquint", 1.0),),
        0.37,
        4.3,
        1.0,
        "d'/sigma (AUROC 0.81, sigma 0.18); prevalence 0.49",
        "lid tightener narrows the eye from the lids: eyeSquint",
        rest=0.36,
    ),
    AUEvidence(
        "AU10",
        (("mouthUpperUp", 1.0),),
        0.19,
        2.0,
        1.0,
        "d'/sigma (AUROC 0.61, sigma 0.13); c at the fit half's 90th percentile (the prevalence quantile, "
        "0.001, is the resting level)",
        "upper lip raiser is mouthUpperUp by definition; weak, so it only nudges the prior",
    ),
    AUEvidence(
        "AU12",
        (("mouthSmile", 1.0), ("mouthStretch", 0.5)),
        0.56,
        2.7,
        0.85,
        "SMILEsmileD fit (0.85, 2.71, c 0.559)",
        "lip corner puller pulls the corners up (mouthSmile) and back (mouthStretch, half: AU20 stretches "
        "too)",
        rest=0.01,
    ),
    AUEvidence(
        "AU15",
        (("mouthFrown", 1.0), ("mouthSmile", -1.0)),
        0.30,
        4.0,
        1.0,
        "FACS; prevalence 0.029",
        "lip corner depressor is mouthFrown; mouthSmile (its antagonist) counts against, because open "
        "laughing mouths also raise mouthFrown",
    ),
    AUEvidence(
        "AU23",
        (("mouthRollLower", 0.5), ("mouthRollUpper", 0.5)),
        0.41,
        4.0,
        1.0,
        "FACS; prevalence 0.028",
        "lip tightener narrows the red of the lips, which the roll blendshapes see (mouthPucker: AUROC "
        "0.53, unused)",
    ),
    AUEvidence(
        "AU24",
        (("mouthPress", 1.0), ("mouthSmile", -1.0)),
        0.21,
        4.0,
        1.0,
        "FACS; prevalence 0.03",
        "lip pressor is mouthPress; mouthSmile counts against, because closed-lip smiles press the lips too",
    ),
    AUEvidence(
        "AU25",
        (("mouthLowerDown", 1.0), ("jawOpen", 1.0), ("mouthUpperUp", 1.0)),
        0.12,
        15.0,
        0.2,
        "mouth labels: best TPR - FPR (0.85 - 0.08) on the labelled faces, on a plateau (a 0.1-0.3, w 12-20, "
        "c 0.12-0.15 within 0.02)",
        "lips part when the lower lip drops, the jaw opens or the upper lip rises",
        rest=0.10,
    ),
    AUEvidence(
        "AU26",
        (("jawOpen", 1.0), ("mouthLowerDown", 0.25)),
        0.25,
        19.0,
        0.5,
        "mouth labels: d'/sigma (AUROC 0.94 for dropped jaws, sigma 0.12); c by the labels (prevalence "
        "0.11 would give 0.26)",
        "jaw drop is jawOpen; a quarter of mouthLowerDown because wide openings are often split into it",
        rest=0.06,
    ),
)

#: Decision thresholds for :func:`combine`'s AU probabilities (AU_NAMES order): ``AUxx_c = p >= threshold``.
#: Values exactly representable in float32, so float32 outputs compare exactly.
EVIDENCE_THRESHOLDS: Final[np.ndarray] = np.full(NUM_AUS, 0.5)
EVIDENCE_THRESHOLDS.setflags(write=False)


def _feature_index(name: str) -> tuple[int, ...]:
    if name in BLENDSHAPE_NAMES:
        return (BLENDSHAPE_NAMES.index(name),)
    pair = (f"{name}Left", f"{name}Right")
    if all(p in BLENDSHAPE_NAMES for p in pair):
        return tuple(BLENDSHAPE_NAMES.index(p) for p in pair)
    raise ValueError(
        f"{name!r} is neither a blendshape nor a Left/Right pair of mtaffect.schema.BLENDSHAPE_NAMES"
    )


def _score_matrix() -> np.ndarray:
    """(52, 12): S = blendshapes @ M (pairs averaged)."""
    m = np.zeros((NUM_BLENDSHAPES, NUM_AUS))
    for k, row in enumerate(AU_EVIDENCE):
        for name, weight in row.terms:
            idx = _feature_index(name)
            for i in idx:
                m[i, k] += weight / len(idx)
    return m


def _check_table() -> None:
    if tuple(r.au for r in AU_EVIDENCE) != AU_NAMES:
        raise AssertionError("AU_EVIDENCE must list mtaffect.schema.AU_NAMES in order")
    with_intensity = tuple(f"AU{int(r.au[2:]):02d}" for r in AU_EVIDENCE if r.rest is not None)
    if with_intensity != AU_INTENSITY_NAMES:
        raise AssertionError("the rows with a resting level must be mtaffect.schema.AU_INTENSITY_NAMES")
    if not np.array_equal(EVIDENCE_THRESHOLDS.astype(np.float32).astype(np.float64), EVIDENCE_THRESHOLDS):
        raise AssertionError("EVIDENCE_THRESHOLDS must be exactly representable in float32")
    for r in AU_EVIDENCE:
        if r.slope < 0 or not 0 < r.prior_weight <= 1 or (r.slope > 0) != bool(r.terms):
            raise AssertionError(
                f"{r.au}: need slope >= 0, 0 < prior_weight <= 1, terms exactly when slope > 0"
            )


_check_table()
_SCORES: Final[np.ndarray] = _score_matrix()
_CROSSOVER: Final[np.ndarray] = np.array([r.crossover for r in AU_EVIDENCE])
_SLOPE: Final[np.ndarray] = np.array([r.slope for r in AU_EVIDENCE])
_PRIOR_WEIGHT: Final[np.ndarray] = np.array([r.prior_weight for r in AU_EVIDENCE])
_INTENSITY_ROWS: Final[tuple[int, ...]] = tuple(k for k, r in enumerate(AU_EVIDENCE) if r.rest is not None)
_REST: Final[np.ndarray] = np.array([AU_EVIDENCE[k].rest for k in _INTENSITY_ROWS], dtype=np.float64)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _float32_bounds(thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: the smallest float32 >= it (an "on" value) and the largest float32 < it ("off")."""
    t32 = thresholds.astype(np.float32)
    on = np.where(t32.astype(np.float64) >= thresholds, t32, np.nextafter(t32, np.float32(np.inf)))
    off = np.nextafter(on, np.float32(-np.inf))
    return on.astype(np.float32), off.astype(np.float32)


def evidence_scores(blendshapes: np.ndarray) -> np.ndarray:
    """(n, 52) blendshapes -> (n, 12) evidence scores S (AU_NAMES order; 0 for AUs without evidence, NaN
    where the row has no measurement)."""
    bs = np.asarray(blendshapes, dtype=np.float64)
    if bs.ndim != 2 or bs.shape[1] != NUM_BLENDSHAPES:
        raise ValueError(f"blendshapes must have shape (n, {NUM_BLENDSHAPES}), got {bs.shape}")
    return bs @ _SCORES


def combine(
    au_prior: np.ndarray, blendshapes: np.ndarray, prior_thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Combine expression-prior AU probabilities with blendshape evidence.

    ``au_prior`` (n, 12): AU probabilities in AU_NAMES order from a model whose AUs are expression priors;
    ``blendshapes`` (n, 52): :data:`mtaffect.schema.BLENDSHAPE_NAMES` order, in [0, 1], a NaN anywhere in a
    row = no measured face; ``prior_thresholds`` (12,): that model's AU decision thresholds.

    Returns ``(au_probs (n, 12) float32, au_intensity (n, 7) float32)``: probabilities to be decided with
    :data:`EVIDENCE_THRESHOLDS`, and 0-5 intensities for :data:`mtaffect.schema.AU_INTENSITY_NAMES` (NaN
    without evidence). A row without evidence keeps the prior's decisions exactly; a NaN prior stays NaN.
    """
    prior = np.asarray(au_prior, dtype=np.float64)
    if prior.ndim != 2 or prior.shape[1] != NUM_AUS:
        raise ValueError(f"au_prior must have shape (n, {NUM_AUS}), got {prior.shape}")
    bs = np.asarray(blendshapes, dtype=np.float64)
    if bs.shape != (len(prior), NUM_BLENDSHAPES):
        raise ValueError(f"blendshapes must have shape ({len(prior)}, {NUM_BLENDSHAPES}), got {bs.shape}")
    t = np.asarray(prior_thresholds, dtype=np.float64).reshape(-1)
    if t.shape != (NUM_AUS,) or not np.all((t > 0) & (t < 1)):
        raise ValueError(f"prior_thresholds must be {NUM_AUS} values in (0, 1), got {prior_thresholds!r}")

    evident = np.asarray(np.isfinite(bs).all(axis=1))
    scores = np.where(evident[:, None], np.nan_to_num(bs) @ _SCORES, 0.0)
    z = _PRIOR_WEIGHT * (_logit(prior) - _logit(t)) + _logit(EVIDENCE_THRESHOLDS)
    z = z + np.where(evident[:, None], _SLOPE * (scores - _CROSSOVER), 0.0)
    # never certain: steep slopes would round to exactly 0 or 1 in float32, which no threshold can undo
    z = np.clip(z, -LOGIT_CAP, LOGIT_CAP)
    with np.errstate(over="ignore"):
        probs = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    # rows without evidence: the prior's decisions, exactly (float rounding of logit/sigmoid cannot flip one)
    on_value, off_value = _float32_bounds(EVIDENCE_THRESHOLDS)
    keep = ~evident[:, None] & np.isfinite(prior)
    decided_on = prior >= t
    probs = np.where(keep & decided_on, np.maximum(probs, on_value), probs)
    probs = np.where(keep & ~decided_on, np.minimum(probs, off_value), probs)
    probs[~np.isfinite(prior)] = np.nan

    s = scores[:, _INTENSITY_ROWS]
    intensity = 5.0 * np.clip((s - _REST) / (1.0 - _REST), 0.0, 1.0)
    intensity[~evident] = np.nan
    return probs.astype(np.float32), intensity.astype(np.float32)


def source_table() -> str:
    """Where each AU comes from, as the Markdown table docs/model_card.md reproduces."""
    lines = [
        "| AU | evidence score S (blendshapes) | c | w | prior weight a | intensity | set from | why |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in AU_EVIDENCE:
        terms = " ".join(
            f"{'+' if w > 0 else '−'} {'' if abs(w) == 1 else f'{abs(w):g}·'}{n}" for n, w in r.terms
        ).lstrip("+ ")
        intensity = f"AU{int(r.au[2:]):02d}_r (rest {r.rest:g})" if r.rest is not None else "—"
        lines.append(
            f"| {r.au} | {terms or '— (prior only)'} | {r.crossover:g} | {r.slope:g} | {r.prior_weight:g} | "
            f"{intensity} | {r.basis} | {r.reason} |"
        )
    return "\n".join(lines)


__all__ = [
    "AU_EVIDENCE",
    "EVIDENCE_THRESHOLDS",
    "AUEvidence",
    "combine",
    "evidence_scores",
    "source_table",
]
