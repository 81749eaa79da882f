"""The official metric against an independent implementation written here from the definition."""

from __future__ import annotations

import importlib.util
import itertools
import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from mtaffect.metrics import MetricResult, MTLMetric, au_f1, ccc, expression_f1, official_metric, score
from mtaffect.schema import AU_NAMES, DEFAULT_AU_THRESHOLD, EXPR_NAMES, NUM_AUS, NUM_EXPR

TOL = 1e-6


# ---- independent reference ------------------------------------------------------------------------
def ref_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """CCC from np.cov with population moments; 0 on no rows."""
    if len(x) == 0:
        return 0.0
    cov = np.cov(np.asarray(x, float), np.asarray(y, float), bias=True)
    denom = cov[0, 0] + cov[1, 1] + (np.mean(x) - np.mean(y)) ** 2
    return 0.0 if denom == 0 else float(2 * cov[0, 1] / denom)


def ref_metric(d: dict, thr=None) -> dict:
    thr = np.full(NUM_AUS, DEFAULT_AU_THRESHOLD) if thr is None else np.broadcast_to(thr, (NUM_AUS,))
    out = {}
    for task in ("valence", "arousal"):
        m = np.asarray(d[f"{task}_true"], float) != -5
        out[task] = ref_ccc(np.asarray(d[f"{task}_pred"], float)[m], np.asarray(d[f"{task}_true"], float)[m])
    m = d["expr_true"] != -1
    pred = d["expr_pred"] if d["expr_pred"].ndim == 1 else np.argmax(d["expr_pred"], axis=1)
    out["expr"] = (
        f1_score(d["expr_true"][m], pred[m], labels=list(range(8)), average="macro", zero_division=0)
        if m.any()
        else 0.0
    )
    per_au = []
    for j in range(NUM_AUS):
        m = d["au_true"][:, j] != -1
        yp = (np.asarray(d["au_pred"][:, j], np.float64) >= thr[j]).astype(int)
        per_au.append(f1_score(d["au_true"][m, j], yp[m], zero_division=0) if m.any() else 0.0)
    out["per_au"] = np.array(per_au)
    out["au"] = float(np.mean(per_au))
    out["P"] = (out["valence"] + out["arousal"]) / 2 + out["expr"] + out["au"]
    return out


def assert_matches_reference(res: MetricResult, d: dict, thr=None, tol: float = TOL) -> None:
    ref = ref_metric(d, thr)
    assert res.ccc_v == pytest.approx(ref["valence"], abs=tol)
    assert res.ccc_a == pytest.approx(ref["arousal"], abs=tol)
    assert res.expr_f1 == pytest.approx(ref["expr"], abs=tol)
    assert res.au_f1 == pytest.approx(ref["au"], abs=tol)
    np.testing.assert_allclose(res.au_per_au, ref["per_au"], atol=tol)
    assert abs(res.P - ref["P"]) <= tol


# ---- data ---------------------------------------------------------------------------------------------
def make_data(n: int, seed: int = 0, *, missing: float = 0.25) -> dict:
    """Labels with s-Aff-Wild2-like missing rates and predictions correlated with them."""
    rng = np.random.default_rng(seed)
    d = {}
    for task in ("valence", "arousal"):
        truth = np.clip(rng.normal(0.1, 0.4, n), -1, 1)
        d[f"{task}_pred"] = np.clip(0.6 * truth + rng.normal(0, 0.3, n), -1, 1)
        truth[rng.random(n) < missing / 3] = -5
        d[f"{task}_true"] = truth
    expr = rng.choice(NUM_EXPR, n, p=[0.3, 0.05, 0.03, 0.04, 0.25, 0.1, 0.08, 0.15])
    logits = rng.normal(0, 1, (n, NUM_EXPR))
    logits[np.arange(n), expr] += 1.2
    d["expr_pred"] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expr[rng.random(n) < missing] = -1
    d["expr_true"] = expr
    rates = np.linspace(0.05, 0.6, NUM_AUS)
    aus = (rng.random((n, NUM_AUS)) < rates).astype(np.int64)
    d["au_pred"] = np.clip(0.45 * aus + rng.random((n, NUM_AUS)) * 0.6, 0, 1)
    aus[rng.random(n) < missing] = -1  # whole rows without AU labels
    aus[rng.random((n, NUM_AUS)) < 0.02] = -1  # and a few single AUs
    d["au_true"] = aus
    return d


def split(d: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in d.items()}


# ---- agreement with the reference -------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_inputs_match_reference(seed):
    d = make_data(3000, seed)
    res = official_metric(**d)
    assert_matches_reference(res, d)
    assert 0 < res.P < 3
    assert res.counts["rows"] == 3000
    assert res.counts["valence"] == int((d["valence_true"] != -5).sum())
    assert res.counts["expression"] == int((d["expr_true"] != -1).sum())
    assert [res.counts["au"][n] for n in AU_NAMES] == (d["au_true"] != -1).sum(0).tolist()


@pytest.mark.parametrize("n", [26_876, 142_333])
def test_real_size_inputs_match_reference(n):
    d = make_data(n, seed=n)
    d["expr_pred"] = d["expr_pred"].astype(np.float32)
    d["au_pred"] = d["au_pred"].astype(np.float32)
    thr = np.linspace(0.3, 0.7, NUM_AUS)
    assert_matches_reference(official_metric(**d, au_thresholds=thr), d, thr)


def test_per_task_functions_match_reference():
    d = make_data(2000, 5)
    m = d["valence_true"] != -5
    assert ccc(d["valence_pred"][m], d["valence_true"][m]) == pytest.approx(
        ref_ccc(d["valence_pred"][m], d["valence_true"][m]), abs=1e-12
    )
    labels = np.argmax(d["expr_pred"], axis=1)
    f1, per_class = expression_f1(d["expr_true"], labels)
    m = d["expr_true"] != -1
    assert f1 == pytest.approx(ref_metric(d)["expr"], abs=TOL)
    np.testing.assert_allclose(
        per_class, f1_score(d["expr_true"][m], labels[m], labels=list(range(8)), average=None), atol=TOL
    )
    assert expression_f1(d["expr_true"], d["expr_pred"])[0] == f1  # scores are argmaxed the same way
    f1_au, per_au = au_f1(d["au_true"], d["au_pred"])
    assert f1_au == pytest.approx(ref_metric(d)["au"], abs=TOL)
    assert per_au.shape == (NUM_AUS,)


# ---- edge cases ---------------------------------------------------------------------------------------
def test_constant_prediction_gives_exact_zero_not_nan():
    y = np.linspace(-1, 1, 50)
    assert ccc(np.full(50, 0.1), y) == 0.0
    assert ccc(np.full(7, 0.3), np.full(7, 0.3)) == 0.0  # zero denominator
    assert ccc(np.full(7, 0.3), np.full(7, -0.2)) == 0.0
    assert ccc([], []) == 0.0
    d = make_data(500, 3)
    d["valence_pred"] = np.full(500, 0.1)
    res = official_metric(**d)
    assert res.ccc_v == 0.0 and np.isfinite(res.P)


def test_single_row():
    d = {k: v[:1] for k, v in make_data(10, 4, missing=0).items()}
    res = official_metric(**d)
    assert res.ccc_v == 0.0 and res.ccc_a == 0.0  # no spread: every moment is 0 or the offset
    assert_matches_reference(res, d)


def test_class_absent_from_truth_and_prediction_counts_zero():
    truth = np.array([0, 1, 2, 3, 4, 5, 6] * 10)  # class 7 (Other) never appears
    f1, per_class = expression_f1(truth, truth)
    assert per_class.tolist() == [1.0] * 7 + [0.0]
    assert f1 == pytest.approx(7 / 8)
    assert f1 == pytest.approx(
        f1_score(truth, truth, labels=list(range(8)), average="macro", zero_division=0)
    )
    assert f1_score(truth, truth, average="macro") == 1.0  # sklearn's plain macro would skip the class


def test_all_rows_missing_for_a_task():
    d = make_data(400, 6)
    d["valence_true"][:] = -5
    d["expr_true"][:] = -1
    d["au_true"][:, 3] = -1
    res = official_metric(**d)
    assert res.ccc_v == 0.0 and res.counts["valence"] == 0
    assert res.expr_f1 == 0.0 and res.counts["expression"] == 0
    assert res.au_per_au[3] == 0.0 and res.counts["au"]["AU6"] == 0
    assert_matches_reference(res, d)
    d["au_true"][:] = -1
    assert official_metric(**d).au_f1 == 0.0


def test_perfect_prediction_scores_three():
    d = make_data(800, 7, missing=0.2)
    d["valence_pred"] = np.where(d["valence_true"] == -5, 0.0, d["valence_true"])
    d["arousal_pred"] = np.where(d["arousal_true"] == -5, 0.0, d["arousal_true"])
    d["expr_pred"] = np.eye(NUM_EXPR)[np.maximum(d["expr_true"], 0)]
    d["au_pred"] = (d["au_true"] == 1).astype(float)
    res = official_metric(**d)
    assert res.ccc_v == 1.0 and res.ccc_a == 1.0
    assert abs(res.P - 3.0) <= 1e-12
    assert res.va_mean == 1.0


def test_argmax_ties_pick_lowest_index():
    probs = np.zeros((4, NUM_EXPR))
    probs[0, [2, 5]] = 0.5  # tie -> 2
    probs[1] = 1 / NUM_EXPR  # all equal -> 0
    probs[2, [7, 6]] = 0.5  # tie -> 6
    probs[3, 3] = 1.0
    _, per_class = expression_f1(np.array([2, 0, 6, 3]), probs)
    assert per_class[[0, 2, 3, 6]].tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_threshold_equal_to_probability_is_positive(dtype):
    t = np.zeros((3, NUM_AUS), dtype=np.int64)
    t[0] = 1
    p = np.zeros((3, NUM_AUS), dtype=dtype)
    p[0] = dtype(0.3)
    p[1] = np.nextafter(dtype(0.3), dtype(0))  # just below the threshold: a negative
    thr = float(dtype(0.3))  # exactly the stored probability
    _, per_au = au_f1(t, p, thr)
    assert per_au.tolist() == [1.0] * NUM_AUS


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_narrow_probabilities_compare_like_float64(dtype):
    # thresholds between, on and off representable values: p >= t must equal the float64 comparison
    rng = np.random.default_rng(8)
    t = rng.integers(0, 2, (4000, NUM_AUS))
    p = rng.random((4000, NUM_AUS)).astype(dtype)
    thr = np.concatenate([p[:6, 0].astype(np.float64), rng.random(6)])
    thr[:3] = np.nextafter(thr[:3], 1.0)  # just above a stored value
    expected = [f1_score(t[:, j], p[:, j].astype(np.float64) >= thr[j], zero_division=0) for j in range(12)]
    np.testing.assert_allclose(au_f1(t, p, thr)[1], expected, atol=1e-12)


def test_missing_va_written_as_int_float_or_float32():
    d = make_data(600, 9)
    base = official_metric(**d)
    as_list = [-5 if v == -5 else float(v) for v in d["valence_true"]]  # int -5 among floats
    assert official_metric(**dict(d, valence_true=as_list)).ccc_v == base.ccc_v
    as_f32 = dict(d, arousal_true=d["arousal_true"].astype(np.float32))
    assert official_metric(**as_f32).counts["arousal"] == base.counts["arousal"]
    ints = np.array([-5, -1, 0, 1, -5, 1, 0])
    preds = np.array([0.3, -0.8, 0.1, 0.7, 0.2, 0.9, -0.1])
    assert ccc(preds[ints != -5], ints[ints != -5]) == pytest.approx(
        ref_ccc(preds[ints != -5], ints[ints != -5])
    )
    small = {**{k: v[:7] for k, v in d.items()}, "valence_true": ints, "valence_pred": preds}
    res_int = official_metric(**small)
    res_float = official_metric(**{**small, "valence_true": ints.astype(float)})
    assert res_int.counts["valence"] == 5 and res_int.ccc_v == res_float.ccc_v
    assert official_metric(**dict(d, expr_true=d["expr_true"].astype(float))).expr_f1 == base.expr_f1


def test_integer_expression_labels_equal_probabilities():
    d = make_data(700, 10)
    labels = np.argmax(d["expr_pred"], axis=1)
    labels[d["expr_true"] == -1] = -1  # anything is allowed on unlabelled rows
    assert official_metric(**dict(d, expr_pred=labels)).expr_f1 == official_metric(**d).expr_f1


def test_threshold_forms_agree():
    d = make_data(500, 11)
    thr = np.linspace(0.2, 0.8, NUM_AUS)
    a = official_metric(**d, au_thresholds=thr)
    b = official_metric(**d, au_thresholds=dict(zip(AU_NAMES, thr, strict=True)))
    assert a.au_f1 == b.au_f1
    assert_matches_reference(a, d, thr)
    assert official_metric(**d, au_thresholds=0.5).au_f1 == official_metric(**d).au_f1


# ---- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"expr_pred": np.zeros((10, 7))}, r"expr_pred has shape \(10, 7\); expected \(10, 8\)"),
        ({"au_true": np.zeros((10, 11), int)}, r"au_true has shape \(10, 11\)"),
        ({"au_pred": np.zeros((10, 12, 1))}, r"au_pred has shape"),
        ({"valence_pred": np.zeros(9)}, r"valence_pred has shape \(9,\); expected \(10,\)"),
        ({"arousal_true": np.zeros(11)}, r"arousal_true has shape"),
        ({"expr_true": np.full(10, 8)}, r"expr_true has value 8 at row 0"),
        ({"au_true": np.full((10, 12), 2)}, r"au_true has value 2 at row 0, column 0"),
        ({"expr_pred": np.full(10, 2.5)}, r"expr_pred must hold integer codes"),
        ({"valence_pred": np.r_[np.nan, np.zeros(9)]}, r"valence_pred has 1 NaN/inf"),
        ({"au_thresholds": np.full(11, 0.5)}, r"au_thresholds has shape \(11,\)"),
        ({"au_thresholds": {"AU1": 0.5}}, r"au_thresholds keys must be exactly"),
    ],
)
def test_bad_input_gives_clear_error(change, message):
    d = make_data(10, 12, missing=0)
    with pytest.raises(ValueError, match=message):
        official_metric(**{**d, **change})


def test_nan_prediction_on_unlabelled_row_is_ignored():
    d = make_data(50, 13, missing=0)
    d["valence_true"][0] = -5
    d["valence_pred"][0] = np.nan
    d["au_true"][1] = -1
    d["au_pred"][1] = np.nan
    assert_matches_reference(official_metric(**d), {**d, "valence_pred": np.nan_to_num(d["valence_pred"])})


# ---- result object ------------------------------------------------------------------------------------
def test_to_dict_is_plain_json_with_schema_names():
    res = official_metric(**make_data(300, 14))
    out = res.to_dict()
    assert json.loads(json.dumps(out)) == out
    assert set(out) == {"P", "va", "expr", "au", "counts"}
    assert set(out["va"]) == {"ccc_v", "ccc_a", "mean"}
    assert list(out["expr"]["per_class"]) == list(EXPR_NAMES)
    assert list(out["au"]["per_au"]) == list(AU_NAMES)
    assert list(out["counts"]["au"]) == list(AU_NAMES)
    assert set(out["counts"]) == {"rows", "valence", "arousal", "expression", "au"}
    assert out["P"] == pytest.approx(out["va"]["mean"] + out["expr"]["f1"] + out["au"]["f1"])


def test_table_renders_every_term():
    from rich.console import Console

    res = official_metric(**make_data(300, 15))
    console = Console(record=True, width=120)
    console.print(res.table())
    text = console.export_text()
    assert f"{res.P:.4f}" in text
    for name in (*EXPR_NAMES, *AU_NAMES, "CCC valence", "CCC arousal"):
        assert name in text


def test_score_aligns_predictions_to_labels():
    d = make_data(200, 16)
    images = [f"video{i // 50}/{i:05d}.jpg" for i in range(200)]
    order = np.random.default_rng(0).permutation(200)  # predictions stored in another order

    class Pred:  # stand-in for PredictionTable: align_to reorders to the requested images
        def __init__(self, imgs, idx):
            self.images, self.idx = imgs, idx
            self.valence, self.arousal = d["valence_pred"][idx], d["arousal_pred"][idx]
            self.expr_probs, self.au_probs = d["expr_pred"][idx], d["au_pred"][idx]

        def align_to(self, wanted):
            pos = {img: i for i, img in enumerate(self.images)}
            return Pred(wanted, self.idx[[pos[w] for w in wanted]])

    gt = types.SimpleNamespace(
        images=images,
        valence=d["valence_true"],
        arousal=d["arousal_true"],
        expression=d["expr_true"],
        aus=d["au_true"],
    )
    res = score(gt, Pred([images[i] for i in order], order))
    assert res.to_dict() == official_metric(**d).to_dict()


def test_zero_scored_rows_is_an_error_not_a_score():
    """A header-only ground truth (or one without a single label) must not score P = 0 with success."""
    from mtaffect.data.annotations import LabelTable
    from mtaffect.data.predictions import PredictionTable

    columns = ["image", "valence", "arousal", "expression", *AU_NAMES]
    empty = LabelTable.from_frame(pd.DataFrame(columns=columns))
    empty.source = "gt.txt"
    pred = PredictionTable.from_arrays([], [], [], np.zeros((0, NUM_EXPR)), np.zeros((0, NUM_AUS)))
    with pytest.raises(ValueError, match=r"^gt.txt: nothing to score: it holds no data rows"):
        score(empty, pred)
    unlabelled = types.SimpleNamespace(
        images=["v/1.jpg"],
        valence=np.array([-5.0]),
        arousal=np.array([-5.0]),
        expression=np.array([-1]),
        aus=-np.ones((1, NUM_AUS), dtype=int),
        source="gt.txt",
    )
    with pytest.raises(ValueError, match=r"1 rows but not one label"):
        score(unlabelled, pred)


# ---- streaming accumulator ----------------------------------------------------------------------------
def assert_same_result(a: MetricResult, b: MetricResult, tol: float = 1e-9) -> None:
    for key in ("P", "ccc_v", "ccc_a", "expr_f1", "au_f1"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), abs=tol), key
    np.testing.assert_allclose(a.expr_per_class, b.expr_per_class, atol=tol)
    np.testing.assert_allclose(a.au_per_au, b.au_per_au, atol=tol)
    assert a.counts == b.counts


@pytest.mark.parametrize("seed", [0, 1])
def test_accumulator_over_random_batches_equals_one_shot(seed):
    d = make_data(5000, 20 + seed)
    thr = np.linspace(0.3, 0.6, NUM_AUS)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, 5000), 40, replace=False))
    cuts = np.r_[0, cuts, cuts[5], 5000]  # includes an empty batch
    cuts.sort()
    metric = MTLMetric(au_thresholds=thr)
    for lo, hi in itertools.pairwise(cuts):
        metric.update(**split(d, np.arange(lo, hi)))
    assert_same_result(metric.compute(), official_metric(**d, au_thresholds=thr))


def test_accumulator_single_batch_is_exact_and_reset_clears():
    d = make_data(1000, 22)
    metric = MTLMetric()
    metric.update(**d)
    assert metric.compute().to_dict() == official_metric(**d).to_dict()
    metric.reset()
    empty = metric.compute()
    assert empty.P == 0.0 and empty.counts["rows"] == 0


def test_accumulator_keeps_constant_prediction_exactly_zero():
    d = make_data(900, 23)
    d["valence_pred"] = np.full(900, 0.37)
    metric = MTLMetric()
    for part in np.array_split(np.arange(900), 7):
        metric.update(**split(d, part))
    assert metric.compute().ccc_v == 0.0


def test_merge_and_state_round_trip_equal_the_whole():
    d = make_data(4000, 24)
    whole = official_metric(**d)
    a, b = MTLMetric(), MTLMetric()
    a.update(**split(d, np.arange(0, 1500)))
    b.update(**split(d, np.arange(1500, 4000)))
    assert_same_result(MTLMetric.from_state(a.state_dict()).merge(b).compute(), whole)
    assert_same_result(MTLMetric.merge_states([b.state_dict(), a.state_dict()]).compute(), whole)
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert a.compute().to_dict() == MTLMetric.from_state(state).compute().to_dict()


def test_merge_refuses_different_thresholds():
    with pytest.raises(ValueError, match="different AU thresholds"):
        MTLMetric().merge(MTLMetric(au_thresholds=0.4))


def test_accumulator_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    d = make_data(600, 25)
    metric = MTLMetric()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}
    tensors["expr_pred"] = tensors["expr_pred"].to(torch.bfloat16)  # argmax in bf16 may change: compare so
    metric.update(**tensors)
    expected = official_metric(**{**d, "expr_pred": tensors["expr_pred"].float().numpy()})
    assert_same_result(metric.compute(), expected)


# ---- benchmark script ---------------------------------------------------------------------------------
def test_benchmark_script_reports_its_number(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_metric.py"
    spec = importlib.util.spec_from_file_location("bench_metric", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--rows", "2000", "--repeats", "1"])
    assert out["name"] == "metric_1m_rows" and out["rows"] == 2000 and out["seconds"] > 0
    assert "metric_1m_rows" in capsys.readouterr().out


def test_accumulator_is_stable_far_from_zero():
    # CCC ignores a common shift; raw sums of squares at 1e6 would lose every significant digit
    d = make_data(3000, 26, missing=0)
    shifted = {**d, "valence_true": d["valence_true"] + 1e6, "valence_pred": d["valence_pred"] + 1e6}
    metric = MTLMetric()
    for part in np.array_split(np.arange(3000), 13):
        metric.update(**split(shifted, part))
    expected = ref_ccc(d["valence_pred"], d["valence_true"])
    assert metric.compute().ccc_v == pytest.approx(expected, abs=1e-6)
    assert official_metric(**shifted).ccc_v == pytest.approx(expected, abs=1e-6)
