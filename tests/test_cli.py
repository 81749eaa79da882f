"""The command line end to end on a small synthetic set: what a user types, what they get back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtaffect.cli import app

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    return result


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    run("synth", "--out", root, "--videos", "8", "--frames", "40", "--seed", "3")
    return root


def test_synth_refuses_to_overwrite(synth_root: Path):
    result = run("synth", "--out", synth_root, "--videos", "4", "--frames", "5", code=2)
    assert "overwrite" in result.output


def test_data_stats_json(synth_root: Path, tmp_path: Path):
    out = tmp_path / "stats.json"
    run("data", "stats", synth_root, "--json", out)
    stats = json.loads(out.read_text())
    assert {"train", "val"} <= set(stats)
    assert stats["train"]["rows"] > 0


def test_baselines_evaluate_submit_validate(synth_root: Path, tmp_path: Path):
    train = synth_root / "training_set_annotations.txt"
    val = synth_root / "validation_set_annotations.txt"
    scores = {}
    for kind in ("constant", "random"):
        pred = tmp_path / f"{kind}.csv"
        run("baseline", "--kind", kind, "--train", train, "--images", val, "--out", pred)
        js = tmp_path / f"{kind}.json"
        out = run("evaluate", "--gt", val, "--pred", pred, "--json", js).output
        assert "P =" in out
        scores[kind] = json.loads(js.read_text())
    for s in scores.values():
        assert set(s) == {"P", "va", "expr", "au", "counts"}
        assert set(s["va"]) == {"ccc_v", "ccc_a", "mean"}
        assert set(s["expr"]) == {"f1", "per_class"} and set(s["au"]) == {"f1", "per_au"}
        assert s["P"] == pytest.approx(s["va"]["mean"] + s["expr"]["f1"] + s["au"]["f1"])
    # A constant VA has CCC 0 by definition: its P is F1 only.
    assert scores["constant"]["va"]["mean"] == 0.0

    test_list = synth_root / "MTL.txt"
    pred = tmp_path / "test.csv"
    run("baseline", "--kind", "constant", "--train", train, "--images", test_list, "--out", pred)
    sub = tmp_path / "submission.txt"
    run("submit", "--pred", pred, "--test-list", test_list, "--out", sub)
    run("validate-submission", "--test-list", test_list, sub)
    # The submission (hard labels) is itself scoreable against the synthetic test labels.
    run("evaluate", "--gt", synth_root / "test_set_annotations.txt", "--pred", sub)
    # And nothing is overwritten without being asked.
    assert "overwrite" in run("submit", "--pred", pred, "--test-list", test_list, "--out", sub, code=2).output
    run("submit", "--pred", pred, "--test-list", test_list, "--out", sub, "--overwrite")


def test_bad_submission_is_reported_with_line(synth_root: Path, tmp_path: Path):
    test_list = synth_root / "MTL.txt"
    pred = tmp_path / "p.csv"
    run("baseline", "--kind", "random", "--train", synth_root / "training_set_annotations.txt",
        "--images", test_list, "--out", pred)
    sub = tmp_path / "sub.txt"
    run("submit", "--pred", pred, "--test-list", test_list, "--out", sub)
    lines = sub.read_text().splitlines()
    del lines[3]
    sub.write_text("\n".join(lines) + "\n")
    out = run("validate-submission", "--test-list", test_list, sub, code=1).output
    assert "line" in out


def test_malformed_annotation_names_file_and_line(synth_root: Path, tmp_path: Path):
    bad = tmp_path / "bad.txt"
    lines = (synth_root / "validation_set_annotations.txt").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",7"  # an AU of 7
    bad.write_text("\n".join(lines) + "\n")
    pred = tmp_path / "p.csv"
    run("baseline", "--kind", "random", "--train", synth_root / "training_set_annotations.txt",
        "--images", synth_root / "validation_set_annotations.txt", "--out", pred)
    out = run("evaluate", "--gt", bad, "--pred", pred, code=2).output
    assert "bad.txt:6" in out
    # --lenient skips the row, reports it, and scores the rest.
    out = run("evaluate", "--gt", bad, "--pred", pred, "--lenient").output
    assert "bad.txt:6" in out and "P =" in out


def test_missing_predictions_are_an_error(synth_root: Path, tmp_path: Path):
    val = synth_root / "validation_set_annotations.txt"
    pred = tmp_path / "p.csv"
    run("baseline", "--kind", "random", "--train", synth_root / "training_set_annotations.txt",
        "--images", val, "--out", pred)
    text = pred.read_text().splitlines()
    pred.write_text("\n".join(text[:-3]) + "\n")
    out = run("evaluate", "--gt", val, "--pred", pred, code=2).output
    assert "3" in out and "prediction" in out.lower()


def test_tune_then_post_applies_to_evaluate(synth_root: Path, tmp_path: Path):
    """`tune` writes a config that `evaluate --post` applies exactly as the library does."""
    from mtaffect.data.annotations import read_annotations
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.metrics import score
    from mtaffect.post.config import PostConfig

    train = synth_root / "training_set_annotations.txt"
    val = synth_root / "validation_set_annotations.txt"
    preds = []
    for seed in (1, 2):
        preds.append(tmp_path / f"r{seed}.csv")
        run("baseline", "--kind", "random", "--seed", seed, "--train", train, "--images", val,
            "--out", preds[-1])  # fmt: skip
    post = tmp_path / "post.yaml"
    out = run("tune", "--gt", val, "--pred", preds[0], preds[1], "--out", post, "--widths", "2,4").output
    assert "held-out" in out
    both = ("--pred", preds[0], "--pred", preds[1])
    assert "blending them needs --post" in run("evaluate", "--gt", val, *both, code=2).output
    js = tmp_path / "post.json"
    run("evaluate", "--gt", val, *both, "--post", post, "--json", js)
    config = PostConfig.load(post)
    expected = score(
        read_annotations(val), config.apply([PredictionTable.read(p) for p in preds]),
        au_thresholds=config.au_thresholds,
    )  # fmt: skip
    assert json.loads(js.read_text())["P"] == pytest.approx(expected.P, abs=1e-9)
