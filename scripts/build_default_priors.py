"""Derive the embedded default model's priors (``src/mtaffect/models/default_priors.json``).

One-off, offline: ``python scripts/build_default_priors.py [--ckplus CSV] [--out JSON] [--overwrite]``.

Inputs (figures only; no images, no per-frame labels are embedded):

- CK+ FACS codes of the 327 emotion-labelled peak frames (Lucey et al. 2010) as distributed by the
  NetFACS R package (Apache-2.0), ``../shared/data/ckplus_facs_netfacs/ckplus_facs_emotion.csv``. We keep
  only the derived P(AU = 1 | emotion) for the 12 ABAW AUs and the 6 emotions that ABAW has (contempt has
  no ABAW class and is dropped), smoothed as (k + 1) / (n + 2) (the posterior mean under a uniform prior,
  so an AU never seen in 25 sequences is not claimed impossible).
- Aggregate s-Aff-Wild2 validation statistics already embedded in ``mtaffect/data/abaw_label_stats.json``:
  P(AU | expression) and the per-expression valence/arousal means.

Combination: for the 6 emotions both sources know, P(AU | e) = w * CK+ + (1 - w) * s-Aff-Wild2 with
w = 0.5 (CK+ is posed peak intensity from 118 subjects; s-Aff-Wild2 is in the wild but from only 50
videos, so neither is trusted alone); Neutral and Other come from s-Aff-Wild2 only (CK+ has no such label).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from mtaffect.io import atomic_open
from mtaffect.schema import AU_NAMES, EXPR_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPLUS = ROOT.parent / "shared" / "data" / "ckplus_facs_netfacs" / "ckplus_facs_emotion.csv"
ABAW_STATS = ROOT / "src" / "mtaffect" / "data" / "abaw_label_stats.json"
DEFAULT_OUT = ROOT / "src" / "mtaffect" / "models" / "default_priors.json"

#: CK+ emotion label -> schema expression name (contempt has no ABAW class).
CKPLUS_TO_EXPR = {
    "anger": "Anger",
    "disgust": "Disgust",
    "fear": "Fear",
    "happy": "Happiness",
    "sadness": "Sadness",
    "surprise": "Surprise",
}
CKPLUS_WEIGHT = 0.5
#: Confidence rule for Other (see mtaffect.models.default).
OTHER_TAU = 0.4


def ckplus_p_au(path: Path) -> tuple[dict[str, list[float]], dict[str, int]]:
    """P(AU | emotion) smoothed as (k+1)/(n+2), per schema expression name, official AU order; counts."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: empty file; expected the NetFACS CK+ table (see its README)")
    missing = [a for a in (*AU_NAMES, "emotion") if a not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected the NetFACS CK+ table")
    counts: dict[str, int] = {}
    positives: dict[str, list[int]] = {}
    for line, r in enumerate(rows, start=2):
        expr = CKPLUS_TO_EXPR.get(r["emotion"].strip())
        if expr is None:
            continue
        try:
            flags = [int(r[a]) for a in AU_NAMES]
        except ValueError as e:
            raise ValueError(f"{path}:{line}: AU columns must be 0/1 ({e})") from e
        counts[expr] = counts.get(expr, 0) + 1
        acc = positives.setdefault(expr, [0] * len(AU_NAMES))
        for i, f in enumerate(flags):
            acc[i] += f
    probs = {e: [round((k + 1) / (counts[e] + 2), 4) for k in positives[e]] for e in counts}
    return probs, counts


def build(ckplus: Path) -> dict:
    abaw = json.loads(ABAW_STATS.read_text(encoding="utf-8"))
    ck, ck_counts = ckplus_p_au(ckplus)
    combined = {}
    for e in EXPR_NAMES:
        a = abaw["p_au_given_expression"][e]
        if e in ck:
            combined[e] = [
                round(CKPLUS_WEIGHT * c + (1 - CKPLUS_WEIGHT) * x, 4) for c, x in zip(ck[e], a, strict=True)
            ]
        else:
            combined[e] = [round(x, 4) for x in a]
    return {
        "_about": (
            "Priors of mtaffect's embedded default model (mtaffect.models.default), written by "
            "scripts/build_default_priors.py. Only aggregate figures; see docs/model_card.md."
        ),
        "sources": {
            "ckplus": (
                "P(AU|emotion) derived from the CK+ FACS codes of 327 emotion-labelled peak frames "
                "(P. Lucey et al., 'The Extended Cohn-Kanade Dataset (CK+)', CVPR Workshops 2010), as "
                "distributed by the NetFACS R package 0.5.1 (data/emotions_set.RData, Apache-2.0). "
                "Smoothed as (k+1)/(n+2); contempt dropped. No images or per-sequence codes are included."
            ),
            "abaw": abaw["_source"],
        },
        "expr_names": list(EXPR_NAMES),
        "au_names": list(AU_NAMES),
        "ckplus_counts": ck_counts,
        "ckplus_p_au_given_expression": ck,
        "abaw_p_au_given_expression": {e: abaw["p_au_given_expression"][e] for e in EXPR_NAMES},
        "ckplus_weight": CKPLUS_WEIGHT,
        "p_au_given_expression": combined,
        "va_mean_by_expression": {e: abaw["va_mean_by_expression"][e] for e in EXPR_NAMES},
        "other_tau": OTHER_TAU,
        "au_thresholds": [0.5] * len(AU_NAMES),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckplus", type=Path, default=DEFAULT_CKPLUS, help="ckplus_facs_emotion.csv")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if not args.ckplus.is_file():
        print(
            f"error: {args.ckplus} not found; pass --ckplus PATH to ckplus_facs_emotion.csv", file=sys.stderr
        )
        return 2
    priors = build(args.ckplus)
    with atomic_open(args.out, "w", overwrite=args.overwrite, encoding="utf-8") as fh:
        json.dump(priors, fh, indent=1)
        fh.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
