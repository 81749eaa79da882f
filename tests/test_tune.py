"""``tune`` end to end: nested search on synthetic persistent labels, the YAML config, the command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from mtaffect.data.annotations import write_annotations
from mtaffect.data.predictions import PredictionTable
from mtaffect.io import OutputExistsError
from mtaffect.metrics import score
from mtaffect.post.blend import blend
from mtaffect.post.cli import register
from mtaffect.post.config import PostConfig, PostConfigError
from mtaffect.post.smoothing import Kernel, smooth
from mtaffect.post.thresholds import apply_expr_bias
from mtaffect.post.tune import SearchSpace, split_videos, tune

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tune_gain.py"
SMALL = SearchSpace(widths=(2, 6, 16), blend_step=0.25)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tune_gain", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    """12 validation-like videos with persistent labels and two noisy per-frame models."""
    return _bench().run_noisy(videos=12, frames=90, seed=4)


def test_nested_tune_improves_held_out_p_and_says_so(data):
    gt, tables = data
    report = tune(gt, tables, space=SMALL, nested=True, split_seed=1)
    assert set(report.tune_videos).isdisjoint(report.report_videos)
    assert sorted(report.tune_videos + report.report_videos) == gt.videos
    held = report.report_steps
    assert held is not None and [s.name for s in held] == ["blend", "smoothing", "AU thresholds"]
    assert held[-1].after.P > held[0].before.P + 0.05  # the honest gain
    # the held-out baseline is the raw best input, with the default AU threshold
    raw = score(gt.select_videos(report.report_videos), tables[0], au_thresholds=0.5)
    assert pytest.approx(raw.P) == held[0].before.P
    text = " ".join(report.lines())
    assert "nested" in text and f"reported on {len(report.report_videos)} other videos" in text
    assert report.config.info["nested"] is True and "held_out_rows" in report.config.info
    # the saved config reproduces the held-out score through the public apply path
    rep_gt = gt.select_videos(report.report_videos)
    applied = report.config.apply(tables)
    assert (
        pytest.approx(held[-1].after.P) == score(rep_gt, applied, au_thresholds=report.config.au_thresholds).P
    )


def test_not_nested_is_flagged_as_optimistic(data):
    gt, tables = data
    report = tune(gt, tables[:1], space=SMALL, nested=False)
    assert report.report_steps is None
    assert "NOT nested" in " ".join(report.lines())
    assert [s.name for s in report.tune_steps] == ["smoothing", "AU thresholds"]
    assert report.config.blend_weights is None


def test_refit_tunes_on_all_videos(data):
    gt, tables = data
    half = tune(gt, tables[:1], space=SMALL, split_seed=2)
    full = tune(gt, tables[:1], space=SMALL, split_seed=2, refit=True)
    assert full.refit and full.config.info["refit_on_all_videos"] is True
    assert pytest.approx(half.report_steps[-1].after.P) == full.report_steps[-1].after.P  # same estimate


def test_split_keeps_source_videos_together_and_is_seeded():
    videos = ["1-30-640x480_left", "1-30-640x480_right", "7", "8", "9", "10", "video3_left", "video3_right"]
    tune_a, rep_a = split_videos(videos, 0.5, seed=3)
    assert (tune_a, rep_a) == split_videos(videos, 0.5, seed=3)
    for pair in (("1-30-640x480_left", "1-30-640x480_right"), ("video3_left", "video3_right")):
        assert (pair[0] in tune_a) == (pair[1] in tune_a)
    assert tune_a and rep_a and 2 <= len(tune_a) <= 6
    with pytest.raises(ValueError, match="at least 2"):
        split_videos(["a_left", "a_right"])


# ---- PostConfig --------------------------------------------------------------------------------------
def test_config_yaml_round_trip_and_no_overwrite(tmp_path: Path):
    config = PostConfig(
        kernels={"va": Kernel("gaussian", 6.0), "expr": Kernel("box", 4, causal=True, unit="rows")},
        au_thresholds=np.linspace(0.3, 0.6, 12),
        expr_bias=np.r_[-0.5, np.zeros(7)],
        blend_weights={"va": [0.7, 0.3], "expr": [0.5, 0.5], "au": [1, 3]},
        info={"note": np.float64(1.5)},
    )
    path = config.save(tmp_path / "post.yaml")
    loaded = PostConfig.load(path)
    assert loaded.kernels == {**config.kernels, "au": Kernel()}
    np.testing.assert_array_equal(loaded.au_thresholds, config.au_thresholds)
    np.testing.assert_array_equal(loaded.expr_bias, config.expr_bias)
    assert loaded.blend_weights == {"va": [0.7, 0.3], "expr": [0.5, 0.5], "au": [0.25, 0.75]}
    assert loaded.info == {"note": 1.5}
    with pytest.raises(OutputExistsError):
        config.save(path)
    config.save(path, overwrite=True)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("kernels: {va: {kind: median, width: 3}}", r"post.yaml: kernels.va: kernel kind"),
        ("au_thresholds: {AU3: 0.2}", r"post.yaml: au_thresholds: unknown name"),
        ("au_thresholds: {AU1: 1.5}", r"post.yaml: au_thresholds needs 12 values in \[0, 1\]"),
        ("blend_weights: {va: [1, -1]}", r"post.yaml: blend weights for 'va' must be non-negative"),
        ("smoothing: {}", r"post.yaml: unknown key"),
        ("kernels: [1, 2", r"post.yaml:\d+: not valid YAML"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path: Path, text: str, match: str):
    path = tmp_path / "post.yaml"
    path.write_text(text + "\n")
    with pytest.raises(PostConfigError, match=match):
        PostConfig.load(path)


def test_apply_runs_blend_then_smoothing_then_bias(data):
    _, tables = data
    config = PostConfig(
        kernels={"va": Kernel("gaussian", 3), "expr": Kernel("box", 5), "au": Kernel("gaussian", 2)},
        expr_bias=np.r_[-1.0, np.zeros(7)],
        blend_weights={"va": [0.6, 0.4], "expr": [0.5, 0.5], "au": [0.2, 0.8]},
    )
    got = config.apply(tables)
    want = smooth(blend(tables, config.blend_weights), config.kernels)
    np.testing.assert_allclose(got.valence, want.valence)
    np.testing.assert_allclose(got.au_probs, want.au_probs)
    np.testing.assert_allclose(got.expr_probs, apply_expr_bias(want.expr_probs, config.expr_bias))
    np.testing.assert_allclose(got.expr_probs.sum(axis=1), 1.0)
    with pytest.raises(PostConfigError, match="blends 2 model"):
        config.apply(tables[0])
    assert np.array_equal(PostConfig().apply(tables[0]).au_probs, tables[0].au_probs)  # default: identity


# ---- the command -------------------------------------------------------------------------------------
def test_tune_command_writes_yaml_and_prints_the_gain(data, tmp_path: Path):
    gt, tables = data
    write_annotations(gt, tmp_path / "val.txt")
    paths = []
    for i, t in enumerate(tables):
        paths.append(tmp_path / f"m{i}.parquet")
        PredictionTable(t.frame.drop(columns=["video", "frame"])).write(paths[-1])  # video/frame from image
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    runner = CliRunner()
    out = tmp_path / "post.yaml"
    args = ["tune", "--gt", tmp_path / "val.txt", "--pred", paths[0], paths[1], "--out", out]
    args = [str(a) for a in [*args, "--widths", "2,8", "--blend-step", "0.5", "--json", tmp_path / "r.json"]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out videos" in result.output and "nested: tuned on" in result.output
    saved = yaml.safe_load(out.read_text())
    assert len(saved["blend_weights"]["va"]) == 2 and saved["info"]["nested"] is True
    config = PostConfig.load(out)
    assert config.n_models == 2
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "overwrite" in again.output
    bad = runner.invoke(
        app,
        [
            "tune",
            "--gt",
            str(tmp_path / "missing.txt"),
            "--pred",
            str(paths[0]),
            "--out",
            str(tmp_path / "x.yaml"),
        ],
    )
    assert bad.exit_code == 2 and "missing.txt" in bad.output


# ---- zero scored rows is an error, never a result (issue 20, item 12) ------------------------------------
def _unlabelled(gt, videos: list[str] | None = None):
    """``gt`` with every label of ``videos`` (all videos: None) set to its missing code."""
    from mtaffect.data.annotations import LabelTable
    from mtaffect.schema import AU_NAMES, MISSING_AU, MISSING_EXPR, MISSING_VA

    frame = gt.frame.copy()
    rows = frame["video"].isin(videos if videos is not None else gt.videos)
    frame.loc[rows, ["valence", "arousal"]] = MISSING_VA
    frame.loc[rows, "expression"] = MISSING_EXPR
    frame.loc[rows, list(AU_NAMES)] = MISSING_AU
    return LabelTable(frame, source=gt.source)


def _tune_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    return app


@pytest.mark.parametrize("videos", [12, 1])
@pytest.mark.parametrize("nested", [["--nested"], ["--no-nested"]])
def test_tune_on_ground_truth_without_labels_is_an_error(data, tmp_path: Path, nested, videos):
    gt, tables = data
    gt = _unlabelled(gt.select_videos(gt.videos[:videos]))
    write_annotations(gt, tmp_path / "val.txt")
    tables[0].write(tmp_path / "m.parquet")
    out, report = tmp_path / "post.yaml", tmp_path / "r.json"
    args = [
        "tune",
        "--gt",
        tmp_path / "val.txt",
        "--pred",
        tmp_path / "m.parquet",
        "--out",
        out,
        "--json",
        report,
        "--widths",
        "2",
        *nested,
    ]
    result = CliRunner().invoke(_tune_app(), [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert f"val.txt: nothing to tune: it holds {len(gt)} rows but not one label (zero scored rows)" in (
        " ".join(result.output.split())
    )
    assert "found 1" not in result.output and "Traceback" not in result.output
    assert not out.exists() and not report.exists()


def test_a_nested_half_without_labels_is_an_error(data):
    gt, tables = data
    tune_videos, report_videos = split_videos(gt.videos, 0.5, 0)
    with pytest.raises(ValueError, match=rf"{len(report_videos)} held-out videos hold no label .*no-nested"):
        tune(_unlabelled(gt, report_videos), tables[:1], space=SMALL, split_seed=0)
    with pytest.raises(ValueError, match=rf"{len(tune_videos)} tuning videos hold no label"):
        tune(_unlabelled(gt, tune_videos), tables[:1], space=SMALL, split_seed=0)
    with pytest.raises(ValueError, match="it holds no data rows"):
        tune(gt.subset(np.zeros(len(gt), dtype=bool)), tables[:1], space=SMALL, nested=False)
