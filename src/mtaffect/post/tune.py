"""``mtaffect tune``: search blend weights, kernels per task, AU thresholds and an expression bias.

Order of the search (the order :meth:`PostConfig.apply` runs them): blend weights per task ->
a kernel per task (kinds x widths) -> per-AU thresholds -> per-class expression bias. Every
objective is a term of the official metric; since P is a sum of per-task terms and each step only
touches its task, the per-task searches are independent.

Nested by default: the validation videos are split in two (source videos kept whole: a
``_left``/``_right`` pair never straddles the halves); the search sees only the tuning half and the
report scores each step on the other half too. Scores on the tuning half are optimistic (the search
picked what happened to fit those rows best); the held-out column is the honest estimate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mtaffect.data.annotations import LabelTable
from mtaffect.data.predictions import PredictionTable
from mtaffect.metrics import MetricResult, official_metric, require_scored
from mtaffect.post.blend import align_tables, task_objective, tune_blend_weights
from mtaffect.post.config import PostConfig
from mtaffect.post.smoothing import (
    TASK_COLUMNS,
    Kernel,
    finish_task,
    make_plan,
    smooth_values,
    split_image_names,
)
from mtaffect.post.thresholds import DEFAULT_BIAS_GRID, THRESHOLD_METHODS, tune_au_thresholds, tune_expr_bias
from mtaffect.schema import DEFAULT_AU_THRESHOLD, NUM_AUS

#: Kernel widths tried by default (frames: gaussian sigma, box half-width); with ``max_span`` they cover
#: centred windows of 3 to ~400 frames, the published choices (about 50-400 frames) included.
DEFAULT_WIDTHS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 200)
#: Widest window tried by default: ``2 reach + 1`` frames (gaussian reach 3 sigma, box the half-width).
DEFAULT_MAX_SPAN: float = 401.0


@dataclass(frozen=True)
class SearchSpace:
    """What ``tune`` searches: kernel kinds, widths and units, threshold method, bias, blend grid.

    Kernels whose window (``2 reach + 1``) exceeds ``max_span`` are skipped: with the default
    widths, gaussian sigmas up to 64 and box half-widths up to 200. ``units`` adds row-unit kernels
    (the published rule: +-reach annotated rows) beside the frame-unit ones.
    """

    kinds: tuple[str, ...] = ("gaussian", "box")
    widths: tuple[float, ...] = DEFAULT_WIDTHS
    causal: bool = False
    units: tuple[str, ...] = ("frames",)
    max_span: float = DEFAULT_MAX_SPAN
    threshold_method: str = "exact"
    expr_bias: bool = False  # opt-in: with few videos it overfits (see docs/postprocessing.md)
    bias_grid: tuple[float, ...] = tuple(DEFAULT_BIAS_GRID.tolist())
    blend_step: float = 0.1
    #: Resamples of whole videos whose averaged AU F1 curves pick the thresholds (0: plain search).
    bootstrap: int = 50

    def __post_init__(self) -> None:
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"threshold method must be one of {list(THRESHOLD_METHODS)}")
        for kind in self.kinds:
            Kernel(kind, 1.0)  # validates the kind
        for unit in self.units:
            Kernel("box", 1.0, unit=unit)  # validates the unit
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0 resamples, got {self.bootstrap}")
        if any(w <= 0 for w in self.widths):
            raise ValueError(f"kernel widths must be > 0 frames, got {list(self.widths)}")

    def kernels(self) -> list[Kernel]:
        """Candidates, identity first (kept when nothing beats it)."""
        out = [Kernel()]
        for unit in self.units:
            for kind in self.kinds:
                if kind == "none":
                    continue
                for w in self.widths:
                    kernel = Kernel(kind, float(w), self.causal, unit)
                    if kernel.span <= self.max_span:
                        out.append(kernel)
        return out


@dataclass
class Step:
    """One stage of the pipeline scored on some rows: the metric before and after it."""

    name: str
    detail: str
    before: MetricResult
    after: MetricResult

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "detail": self.detail,
            "before": _terms(self.before),
            "after": _terms(self.after),
        }


@dataclass
class TuneReport:
    """The saved config and each step's gain on the tuning rows and (nested) on held-out videos."""

    config: PostConfig
    inputs: list[str]
    nested: bool
    tune_videos: list[str]
    report_videos: list[str]
    tune_steps: list[Step]
    report_steps: list[Step] | None
    inputs_tune: list[MetricResult] = field(default_factory=list)
    inputs_report: list[MetricResult] = field(default_factory=list)
    refit: bool = False

    @property
    def gain(self) -> float:
        """Honest P gain: on held-out videos when nested, else on the tuning rows."""
        steps = self.report_steps if self.report_steps else self.tune_steps
        return steps[-1].after.P - steps[0].before.P

    def summary(self) -> dict:
        """Plain numbers for YAML/JSON: how it was tuned and what it gained."""
        out: dict = {
            "nested": self.nested,
            "inputs": list(self.inputs),
            "tune_videos": len(self.tune_videos),
            "report_videos": len(self.report_videos),
            "refit_on_all_videos": self.refit,
            "tune_rows": {
                "before": _terms(self.tune_steps[0].before),
                "after": _terms(self.tune_steps[-1].after),
            },
        }
        if self.report_steps:
            out["held_out_rows"] = {
                "before": _terms(self.report_steps[0].before),
                "after": _terms(self.report_steps[-1].after),
            }
        return out

    def to_dict(self) -> dict:
        return {
            **self.summary(),
            "videos": {"tune": list(self.tune_videos), "report": list(self.report_videos)},
            "steps_tune": [s.to_dict() for s in self.tune_steps],
            "steps_held_out": [s.to_dict() for s in self.report_steps or []],
            "config": self.config.to_dict(),
        }

    def tables(self) -> list:
        """rich Tables: each step's P before/after and its three terms, on tuning and held-out videos."""
        from rich import box
        from rich.table import Table

        out = []
        blocks = [
            (
                "tuning videos" if self.nested else "all videos",
                self.tune_steps,
                self.inputs_tune,
                len(self.tune_videos),
            )
        ]
        if self.report_steps:
            blocks.append(("held-out videos", self.report_steps, self.inputs_report, len(self.report_videos)))
        for label, steps, inputs, n_videos in blocks:
            note = (
                " (not seen by the search)" if label == "held-out videos" else " (optimistic: tuned on them)"
            )
            table = Table(
                title=f"P on {n_videos} {label}{note}",
                title_justify="left",
                box=box.SIMPLE_HEAD,
                pad_edge=False,
            )
            for col in ("step", "before", "after", "gain", "VA", "EXPR", "AU"):
                table.add_column(col, justify="left" if col == "step" else "right", no_wrap=col == "step")
            for name, res in zip(self.inputs, inputs, strict=False):
                table.add_row(
                    f"[dim]{_short(name)}[/dim]",
                    "",
                    f"{res.P:.4f}",
                    "",
                    f"{res.va_mean:.4f}",
                    f"{res.expr_f1:.4f}",
                    f"{res.au_f1:.4f}",
                )
            table.add_section()
            for s in steps:
                a, b = s.after, s.before
                table.add_row(
                    _STEP_LABELS.get(s.name, s.name),
                    f"{b.P:.4f}",
                    f"{a.P:.4f}",
                    f"{a.P - b.P:+.4f}",
                    _delta(b.va_mean, a.va_mean),
                    _delta(b.expr_f1, a.expr_f1),
                    _delta(b.au_f1, a.au_f1),
                )
            table.add_section()
            first, last = steps[0].before, steps[-1].after
            table.add_row(
                "[bold]total[/bold]",
                f"{first.P:.4f}",
                f"{last.P:.4f}",
                f"[bold]{last.P - first.P:+.4f}[/bold]",
                _delta(first.va_mean, last.va_mean),
                _delta(first.expr_f1, last.expr_f1),
                _delta(first.au_f1, last.au_f1),
            )
            out.append(table)
        return out

    def lines(self) -> list[str]:
        """The chosen settings, then how the numbers were obtained."""
        lines = [f"{s.name}: {s.detail}" for s in self.tune_steps if s.detail]
        if self.nested:
            lines += [
                f"nested: tuned on {len(self.tune_videos)} videos, reported on "
                f"{len(self.report_videos)} other videos; held-out gain {self.gain:+.4f} P"
            ]
            lines.append(
                "saved config: refitted on all videos (the held-out gain estimates it)"
                if self.refit
                else "saved config: the one tuned on the tuning videos (the held-out gain measures it)"
            )
        else:
            lines += [
                f"NOT nested: tuned and scored on the same {len(self.tune_videos)} videos; the gain "
                f"{self.gain:+.4f} P overstates what unseen videos will get"
            ]
        return lines


_STEP_LABELS = {"AU thresholds": "thresholds", "expression bias": "expr bias"}


def _short(name: str, width: int = 14) -> str:
    """An input's name for the table: the file name, shortened from the left."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _delta(before: float, after: float) -> str:
    return f"{after:.4f} {after - before:+.3f}"


def _terms(r: MetricResult) -> dict:
    return {
        "P": float(r.P),
        "va": float(r.va_mean),
        "ccc_v": float(r.ccc_v),
        "ccc_a": float(r.ccc_a),
        "expr": float(r.expr_f1),
        "au": float(r.au_f1),
    }


# ---------------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------------
def _videos_of(table: PredictionTable) -> np.ndarray:
    if "video" in table.frame.columns:
        return table.frame["video"].astype(str).to_numpy(dtype=object)
    return split_image_names(table.frame["image"])[0]


def _restrict(table: PredictionTable, videos: np.ndarray, keep: set[str]) -> PredictionTable:
    mask = np.fromiter((v in keep for v in videos), dtype=bool, count=len(videos))
    return table.take(np.flatnonzero(mask))


def _positions(table: PredictionTable, images: np.ndarray) -> np.ndarray:
    """Row of ``table`` holding each label image (the table's images are unique)."""
    pos = pd.Index(table.frame["image"].to_numpy(dtype=object)).get_indexer(pd.Index(images))
    if (pos < 0).any():
        table.align_to(images)  # raises the standard error naming the missing images
    return pos


def _truth(gt: LabelTable) -> dict[str, np.ndarray]:
    return {
        "valence": gt.valence.astype(np.float64),
        "arousal": gt.arousal.astype(np.float64),
        "expression": gt.expression,
        "aus": gt.aus,
    }


def _score(gt: LabelTable, table: PredictionTable, pos: np.ndarray, thr: np.ndarray | None) -> MetricResult:
    f = table.frame
    return official_metric(
        valence_true=gt.valence,
        arousal_true=gt.arousal,
        expr_true=gt.expression,
        au_true=gt.aus,
        valence_pred=f["valence"].to_numpy()[pos],
        arousal_pred=f["arousal"].to_numpy()[pos],
        expr_pred=table.expr_probs[pos],
        au_pred=table.au_probs[pos],
        au_thresholds=thr,
    )


def _require_scored(gt: LabelTable, what: str, half: str | None = None) -> None:
    """Raise unless ``gt`` holds a scored label (a valence, arousal, expression or AU that is not missing).

    Rows whose every label is missing score nothing: a search on them "finds" the defaults and would
    save them as a result, so zero scored rows is an error, on all videos or on either nested half.
    """
    if half is None:
        require_scored(gt, what)
        return
    if len(gt) and gt.any_label_mask.any():
        return
    where = gt.source or "the annotations"
    raise ValueError(
        f"{where}: nothing to {what}: {half} hold no label (zero scored rows); the labels are in too few "
        "videos for a nested split: try another --split-seed, or --no-nested"
    )


def source_group(video: str) -> str:
    """Videos filmed together (``X_left`` / ``X_right``) share a group, so a split never separates them."""
    return re.sub(r"_(left|right)$", "", video)


def split_videos(videos: Sequence[str], fraction: float = 0.5, seed: int = 0) -> tuple[list[str], list[str]]:
    """Tuning and held-out videos (whole source groups), about ``fraction`` of the videos for tuning."""
    if not 0 < fraction < 1:
        raise ValueError(f"the tuning fraction must be in (0, 1), got {fraction}")
    groups: dict[str, list[str]] = {}
    for v in sorted(set(videos)):
        groups.setdefault(source_group(v), []).append(v)
    if len(groups) < 2:
        raise ValueError(
            f"nested tuning needs at least 2 (source) videos, found {len(groups)}; use --no-nested to "
            "tune and score on the same rows (optimistic)"
        )
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    target = fraction * len(set(videos))
    tune: list[str] = []
    for i in order[:-1]:  # the last group in the shuffled order is always held out
        group = groups[keys[i]]
        if not tune or abs(len(tune) + len(group) - target) < abs(len(tune) - target):
            tune += group
    tune_set = set(tune)
    report = [v for k in keys for v in groups[k] if v not in tune_set]
    return sorted(tune), sorted(report)


# ---------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------
def search(
    gt: LabelTable, tables: Sequence[PredictionTable], space: SearchSpace | None = None
) -> tuple[PostConfig, dict[str, str]]:
    """Tune a PostConfig on the rows of ``gt`` (predictions restricted to its videos beforehand).

    Returns the config and a short text per step describing what was chosen.
    """
    space = space or SearchSpace()
    aligned = align_tables(tables)
    first = aligned[0]
    pos = _positions(first, gt.images)
    truth = _truth(gt)
    details: dict[str, str] = {}

    # 1. blend weights per task (several models)
    weights = None
    if len(aligned) > 1:
        stacks = {
            task: np.stack([t.frame[list(cols)].to_numpy(dtype=np.float64)[pos] for t in aligned])
            for task, cols in TASK_COLUMNS.items()
        }
        found = tune_blend_weights(stacks, truth, step=space.blend_step, au_thresholds="tuned")
        weights = {t: [round(float(x), 6) for x in w] for t, (w, _) in found.items()}
        details["blend"] = "; ".join(f"{t} [{', '.join(f'{x:.2f}' for x in w)}]" for t, w in weights.items())
    blended = PostConfig(blend_weights=weights).apply(aligned)

    # 2. a kernel per task
    plan = make_plan(blended)
    kernels: dict[str, Kernel] = {}
    for task, cols in TASK_COLUMNS.items():
        raw = blended.frame[list(cols)].to_numpy(dtype=np.float64)
        objective = task_objective(task, truth, "tuned")
        best, best_score = Kernel(), -np.inf
        for kernel in space.kernels():
            values = finish_task(task, smooth_values(plan, raw, kernel))
            score = objective(values[pos])
            if score > best_score + 1e-12:
                best, best_score = kernel, score
        kernels[task] = best
    details["smoothing"] = "; ".join(f"{t} {k}" for t, k in kernels.items())
    smoothed = PostConfig(kernels=kernels).apply(blended)

    # 3. per-AU thresholds
    videos = gt.frame["video"].to_numpy(dtype=object)
    thr = tune_au_thresholds(
        truth["aus"],
        smoothed.au_probs[pos],
        method=space.threshold_method,
        groups=videos,
        bootstrap=space.bootstrap,
    ).thresholds
    how = space.threshold_method
    if space.bootstrap and how == "exact":
        how += f", F1 averaged over {space.bootstrap} video resamples"
    details["AU thresholds"] = f"{how}: {np.round(thr, 2).tolist()}"

    # 4. expression bias
    bias = np.zeros(len(TASK_COLUMNS["expr"]))
    if space.expr_bias:
        bias, _, _ = tune_expr_bias(
            truth["expression"], smoothed.expr_probs[pos], grid=np.array(space.bias_grid)
        )
        details["expression bias"] = f"log offsets {np.round(bias, 2).tolist()}"
    config = PostConfig(kernels=kernels, au_thresholds=thr, expr_bias=bias, blend_weights=weights)
    return config, details


def stage_configs(config: PostConfig, n_models: int) -> list[tuple[str, PostConfig]]:
    """The pipeline built up step by step: (step name, config of everything up to that step)."""
    w, k, thr = config.blend_weights, config.kernels, config.au_thresholds
    stages: list[tuple[str, PostConfig]] = []
    if n_models > 1:
        stages.append(("blend", PostConfig(blend_weights=w)))
    stages.append(("smoothing", PostConfig(kernels=k, blend_weights=w)))
    stages.append(("AU thresholds", PostConfig(kernels=k, au_thresholds=thr, blend_weights=w)))
    if config.expr_bias.any():
        full = PostConfig(kernels=k, au_thresholds=thr, expr_bias=config.expr_bias, blend_weights=w)
        stages.append(("expression bias", full))
    return stages


def evaluate_stages(
    gt: LabelTable,
    tables: Sequence[PredictionTable],
    config: PostConfig,
    baseline: int | None,
    details: dict[str, str],
) -> tuple[list[MetricResult], list[Step], int]:
    """Each input's raw score and each step's before/after on the rows of ``gt``.

    The first step's "before" is input ``baseline`` (None: the best input on these rows), which is
    returned too so that held-out rows can be compared with the same input.
    """
    aligned = align_tables(tables)
    pos = _positions(aligned[0], gt.images)
    default = np.full(NUM_AUS, DEFAULT_AU_THRESHOLD)
    inputs = [_score(gt, t, pos, default) for t in aligned]
    if baseline is None:
        baseline = int(np.argmax([r.P for r in inputs]))
    previous = inputs[baseline]
    steps = []
    for name, stage in stage_configs(config, len(aligned)):
        result = _score(gt, stage.apply(aligned), pos, stage.au_thresholds)
        steps.append(Step(name, details.get(name, ""), previous, result))
        previous = result
    return inputs, steps, baseline


def tune(
    gt: LabelTable,
    tables: Sequence[PredictionTable],
    *,
    space: SearchSpace | None = None,
    nested: bool = True,
    tune_fraction: float = 0.5,
    split_seed: int = 0,
    refit: bool = False,
    names: Sequence[str] | None = None,
) -> TuneReport:
    """Search the post-processing on validation labels and report its gain (nested by default).

    ``tables`` are the models' predictions (at least the label images; more frames of the same videos
    make smoothing better). ``refit`` re-runs the search on all videos for the returned config.
    """
    tables = list(tables)
    if not tables:
        raise ValueError("tune needs at least one prediction table")
    names = list(names) if names is not None else [t.source or f"model{i + 1}" for i, t in enumerate(tables)]
    _require_scored(gt, "tune")
    video_cols = [_videos_of(t) for t in tables]
    label_videos = gt.videos
    if nested:
        tune_videos, report_videos = split_videos(label_videos, tune_fraction, split_seed)
    else:
        tune_videos, report_videos = list(label_videos), []

    def part(videos: list[str]) -> tuple[LabelTable, list[PredictionTable]]:
        keep = set(videos)
        return gt.select_videos(videos), [
            _restrict(t, v, keep) for t, v in zip(tables, video_cols, strict=True)
        ]

    gt_tune, tables_tune = part(tune_videos)
    if nested:  # each half must hold labels: a search or a score on nothing is no result
        gt_rep, tables_rep = part(report_videos)
        _require_scored(gt_tune, "tune", half=f"the {len(tune_videos)} tuning videos")
        _require_scored(gt_rep, "score", half=f"the {len(report_videos)} held-out videos")
    config, details = search(gt_tune, tables_tune, space)
    inputs_tune, tune_steps, baseline = evaluate_stages(gt_tune, tables_tune, config, None, details)
    if len(tables) > 1:
        tune_steps[0].detail = f"vs best input {names[baseline]}: {tune_steps[0].detail}"
    report_steps: list[Step] | None = None
    inputs_report: list[MetricResult] = []
    if nested:
        inputs_report, report_steps, _ = evaluate_stages(gt_rep, tables_rep, config, baseline, details)
    final = config
    if refit and nested:
        final, _ = search(gt, tables, space)
    report = TuneReport(
        config=final,
        inputs=names,
        nested=nested,
        tune_videos=tune_videos,
        report_videos=report_videos,
        tune_steps=tune_steps,
        report_steps=report_steps,
        inputs_tune=inputs_tune,
        inputs_report=inputs_report,
        refit=refit and nested,
    )
    final.info = report.summary()
    return report
