"""The command line end to end on a small synthetic set: what a user types, what they get back."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from pathlib import Path

import pytest
from cli_helpers import run


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    run("synth", "--out", root, "--videos", "8", "--frames", "40", "--seed", "3")
    return root


def _said(output: str) -> str:
    """The output with rich's line wrapping undone (a long path wraps at 80 columns)."""
    return " ".join(output.split())


def _data_rows(path: Path) -> list[list[str]]:
    """The data lines of an annotation file, split on commas (read here independently of the parser)."""
    return [line.split(",") for line in path.read_text().splitlines()[1:] if line.strip()]


def _p_line(output: str) -> re.Match:
    """`evaluate`'s last line: ``P = 0.1234   (N rows; D duplicate lines dropped)``."""
    pattern = r"^P = (\d\.\d{4}) +\((\d+) rows; (\d+) duplicate lines (dropped|kept)\)$"
    found = re.search(pattern, output, re.MULTILINE)
    assert found, output
    return found


def test_synth_refuses_to_overwrite(synth_root: Path):
    before = sorted(p.relative_to(synth_root) for p in synth_root.rglob("*"))
    out = run("synth", "--out", synth_root, "--videos", "4", "--frames", "5", code=2)
    _one_error_line(out)
    said = f"error: {synth_root} is not empty; pass overwrite=True (CLI: --overwrite) to replace it"
    assert _said(out) == said
    assert sorted(p.relative_to(synth_root) for p in synth_root.rglob("*")) == before


def test_data_stats_json(synth_root: Path, tmp_path: Path):
    out = tmp_path / "stats.json"
    shown = run("data", "stats", synth_root, "--json", out)
    stats = json.loads(out.read_text())
    assert set(stats) == {"train", "val", "test", "test_list"}
    for split, name in (("train", "training"), ("val", "validation"), ("test", "test")):
        rows = _data_rows(synth_root / f"{name}_set_annotations.txt")
        videos = {r[0].split("/")[0] for r in rows}
        got = stats[split]
        distinct, images = {tuple(r) for r in rows}, {r[0] for r in rows}  # exact duplicate lines count once
        assert (got["rows"], got["videos"], got["images_unique"]) == (len(distinct), len(videos), len(images))
        assert got["duplicates"] == len(rows) - len(distinct)
        counted = sum(1 for r in distinct if r[3] != "-1")  # expression -1: missing
        assert sum(got["expression_counts"].values()) == got["valid"]["expression"] == counted
        assert got["source"] == str(synth_root / f"{name}_set_annotations.txt")
        headline = f"{split} ({name}_set_annotations.txt): {len(distinct)} rows, {len(videos)} videos,"
        assert headline in _said(shown)
    assert _said(shown).endswith(f"wrote {out}")


def test_baselines_evaluate_submit_validate(synth_root: Path, tmp_path: Path):
    from mtaffect.data.submission import read_test_list

    train = synth_root / "training_set_annotations.txt"
    val = synth_root / "validation_set_annotations.txt"
    val_rows = _data_rows(val)
    scores = {}
    for kind in ("constant", "random"):
        pred = tmp_path / f"{kind}.csv"
        shown = run("baseline", "--kind", kind, "--train", train, "--images", val, "--out", pred)
        unique = len({r[0] for r in val_rows})
        assert _said(shown) == f"wrote {pred} ({unique} rows, {kind} baseline)"
        with pred.open(newline="") as f:
            assert sorted(r["image"] for r in csv.DictReader(f)) == sorted({r[0] for r in val_rows})
        js = tmp_path / f"{kind}.json"
        out = run("evaluate", "--gt", val, "--pred", pred, "--json", js)
        scores[kind] = json.loads(js.read_text())
        line = _p_line(out)  # the printed P is the P written, over the annotated rows less duplicates
        assert float(line[1]) == pytest.approx(scores[kind]["P"], abs=5e-5)
        assert int(line[2]) + int(line[3]) == len(val_rows) and line[4] == "dropped"
        assert "Traceback" not in out and "error:" not in out
    for s in scores.values():
        assert set(s) == {"P", "va", "expr", "au", "counts"}
        assert set(s["va"]) == {"ccc_v", "ccc_a", "mean"}
        assert set(s["expr"]) == {"f1", "per_class"} and set(s["au"]) == {"f1", "per_au"}
        assert s["P"] == pytest.approx(s["va"]["mean"] + s["expr"]["f1"] + s["au"]["f1"])
    # A constant VA has CCC 0 by definition: its P is F1 only.
    assert scores["constant"]["va"]["mean"] == 0.0

    test_list = synth_root / "MTL.txt"
    names = read_test_list(test_list)
    pred = tmp_path / "test.csv"
    run("baseline", "--kind", "constant", "--train", train, "--images", test_list, "--out", pred)
    sub = tmp_path / "submission.txt"
    shown = run("submit", "--pred", pred, "--test-list", test_list, "--out", sub)
    assert _said(shown) == f"wrote {sub} ({len(names)} lines, validated against {test_list})"
    assert [r[0] for r in _data_rows(sub)] == names  # one line per test-list line, in order
    assert _said(run("validate-submission", "--test-list", test_list, sub)) == f"{sub}: valid"
    # The submission (hard labels) is itself scoreable against the synthetic test labels.
    _p_line(run("evaluate", "--gt", synth_root / "test_set_annotations.txt", "--pred", sub))
    # And nothing is overwritten without being asked.
    written = sub.read_bytes()
    out = run("submit", "--pred", pred, "--test-list", test_list, "--out", sub, code=2)
    _one_error_line(out)
    assert _said(out) == f"error: {sub} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
    assert sub.read_bytes() == written
    run("submit", "--pred", pred, "--test-list", test_list, "--out", sub, "--overwrite")
    assert sub.read_bytes() == written  # the same predictions: the same file


def test_bad_submission_is_reported_with_line(synth_root: Path, tmp_path: Path):
    from mtaffect.data.submission import read_test_list

    test_list = synth_root / "MTL.txt"
    names = read_test_list(test_list)
    pred = tmp_path / "p.csv"
    run(
        "baseline",
        "--kind",
        "random",
        "--train",
        synth_root / "training_set_annotations.txt",
        "--images",
        test_list,
        "--out",
        pred,
    )
    sub = tmp_path / "sub.txt"
    run("submit", "--pred", pred, "--test-list", test_list, "--out", sub)
    lines = sub.read_text().splitlines()
    del lines[3]  # the third data line (file line 4)
    sub.write_text("\n".join(lines) + "\n")
    out = run("validate-submission", "--test-list", test_list, sub, code=1)
    assert "Traceback" not in out
    said = out.splitlines()
    assert said[0] == (
        f"{sub}: expected {len(names)} prediction lines after the header (one per test-list "
        f"line), found {len(names) - 1}"
    )
    assert said[1] == f"{sub}: line 4: expected image {names[2]!r}, found {names[3]!r}"


def test_malformed_annotation_names_file_and_line(synth_root: Path, tmp_path: Path):
    bad = tmp_path / "bad.txt"
    lines = (synth_root / "validation_set_annotations.txt").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",7"  # an AU of 7
    bad.write_text("\n".join(lines) + "\n")
    pred = tmp_path / "p.csv"
    run(
        "baseline",
        "--kind",
        "random",
        "--train",
        synth_root / "training_set_annotations.txt",
        "--images",
        synth_root / "validation_set_annotations.txt",
        "--out",
        pred,
    )
    out = run("evaluate", "--gt", bad, "--pred", pred, code=2)
    _one_error_line(out)
    assert _said(out) == f"error: {bad}:6: AU26 must be 0, 1 or -1 for missing (got: '7')"
    # --lenient skips the row, reports it, and scores the rest.
    out = run("evaluate", "--gt", bad, "--pred", pred, "--lenient")
    assert out.splitlines()[0] == f"skipped {bad}:6: AU26 must be 0, 1 or -1 for missing (got: '7')"
    line = _p_line(out)
    assert int(line[2]) + int(line[3]) == len(lines) - 2  # the header and the skipped row left out


def test_missing_predictions_are_an_error(synth_root: Path, tmp_path: Path):
    val = synth_root / "validation_set_annotations.txt"
    pred = tmp_path / "p.csv"
    run(
        "baseline",
        "--kind",
        "random",
        "--train",
        synth_root / "training_set_annotations.txt",
        "--images",
        val,
        "--out",
        pred,
    )
    text = pred.read_text().splitlines()
    pred.write_text("\n".join(text[:-3]) + "\n")
    dropped = [line.split(",")[0] for line in text[-3:]]
    out = run("evaluate", "--gt", val, "--pred", pred, code=2)
    _one_error_line(out)
    unique = len({r[0] for r in _data_rows(val)})
    assert _said(out) == (
        f"error: {pred}: 3 of {unique} requested image(s) have no prediction, e.g. {dropped}; "
        "predict every image of the test list / annotation file"
    )


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
        run(
            "baseline",
            "--kind",
            "random",
            "--seed",
            seed,
            "--train",
            train,
            "--images",
            val,
            "--out",
            preds[-1],
        )
    post = tmp_path / "post.yaml"
    out = run("tune", "--gt", val, "--pred", preds[0], preds[1], "--out", post, "--widths", "2,4")
    assert re.search(r"^P on \d+ held-out videos \(not seen by the search\)", out, re.M), out
    both = ("--pred", preds[0], "--pred", preds[1])
    _one_error_line(run("evaluate", "--gt", val, *both, code=2), "blending them needs --post")
    js = tmp_path / "post.json"
    run("evaluate", "--gt", val, *both, "--post", post, "--json", js)
    config = PostConfig.load(post)
    expected = score(
        read_annotations(val),
        config.apply([PredictionTable.read(p) for p in preds]),
        au_thresholds=config.au_thresholds,
    )
    assert json.loads(js.read_text())["P"] == pytest.approx(expected.P, abs=1e-9)


# ---- every failure is one `error:` line with exit code 2 (issue 12) ----------------------------------------
@pytest.fixture(scope="module")
def synth_store(synth_root: Path, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("cli_store") / "fer"
    run("extract", "--data", synth_root, "--out", store, "--workers", "0")
    return store


def _os_error(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/mnt/out/file")

    return fail


def _one_error_line(output: str, *needles: str) -> None:
    assert "Traceback" not in output
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_os_errors_in_every_command_are_one_line(synth_root, synth_store, tmp_path, monkeypatch, code):
    import mtaffect.features.extract as extract_module
    import mtaffect.io as io_module
    import mtaffect.train.fit as fit_module
    from mtaffect.features.store import FeatureStore
    from mtaffect.models.checkpoint import save_checkpoint
    from mtaffect.models.registry import create_model

    train = synth_root / "training_set_annotations.txt"
    val = synth_root / "validation_set_annotations.txt"
    st = FeatureStore.open(synth_store)
    model = create_model("emotinet", feature_dim=st.feature_dim, num_logits=st.num_logits)
    backbone = {"name": st.backbone, "spec": st.spec, "fingerprint": st.fingerprint}
    ckpt = save_checkpoint(
        tmp_path / "ck", model, backbone=backbone, feature_dim=st.feature_dim, num_logits=st.num_logits
    )
    reason = os.strerror(code)
    with monkeypatch.context() as m:
        m.setattr(io_module.tempfile, "mkstemp", _os_error(code))  # every atomic file write
        out = run(
            "baseline",
            "--kind",
            "constant",
            "--train",
            train,
            "--images",
            val,
            "--out",
            tmp_path / "b.csv",
            code=2,
        )
        _one_error_line(out, "/mnt/out/file", reason, f"errno {code}")
        out = run(
            "infer",
            "--model",
            ckpt,
            "--features",
            synth_store,
            "--images",
            val,
            "--out",
            tmp_path / "i.csv",
            code=2,
        )
        _one_error_line(out, reason)
    with monkeypatch.context() as m:
        m.setattr(extract_module, "allocate_arrays", _os_error(code))
        out = run("extract", "--data", synth_root, "--out", tmp_path / "st", "--workers", "0", code=2)
        _one_error_line(out, reason)
    with monkeypatch.context() as m:
        m.setattr(fit_module, "atomic_open", _os_error(code))
        config = Path(__file__).resolve().parents[1] / "configs" / "emotinet.yaml"
        out = run(
            "train",
            "--config",
            config,
            "--features",
            synth_store,
            "--data",
            synth_root,
            "--out",
            tmp_path / "run",
            "--no-progress",
            "-o",
            "trainer.epochs=1",
            code=2,
        )
        _one_error_line(out, reason)


def test_a_folder_given_as_output_file_is_refused_even_with_overwrite(synth_root, tmp_path):
    val = synth_root / "validation_set_annotations.txt"
    pred = tmp_path / "p.csv"
    run("baseline", "--kind", "random", "--train", val, "--images", synth_root / "MTL.txt", "--out", pred)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    out = run(
        "submit",
        "--pred",
        pred,
        "--test-list",
        synth_root / "MTL.txt",
        "--out",
        folder,
        "--overwrite",
        code=2,
    )
    _one_error_line(out, "is a folder")
    run("baseline", "--kind", "random", "--train", val, "--images", val, "--out", tmp_path / "v.csv")
    out = run("tune", "--gt", val, "--pred", tmp_path / "v.csv", "--out", folder, "--overwrite", code=2)
    _one_error_line(out, "is a folder")
    assert (folder / "keep.txt").read_text() == "mine"


def test_json_outputs_are_checked_before_the_work(synth_root, tmp_path, monkeypatch):
    import mtaffect.data.stats as stats_module
    import mtaffect.metrics as metrics_module

    val = synth_root / "validation_set_annotations.txt"
    pred = tmp_path / "p.csv"
    run("baseline", "--kind", "random", "--train", val, "--images", val, "--out", pred)
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    monkeypatch.setattr(metrics_module, "score", lambda *a, **k: pytest.fail("scored before checking --json"))
    monkeypatch.setattr(stats_module, "stats_for_path", lambda *a, **k: pytest.fail("computed first"))
    _one_error_line(run("evaluate", "--gt", val, "--pred", pred, "--json", taken, code=2), "overwrite")
    _one_error_line(run("data", "stats", synth_root, "--json", taken, code=2), "overwrite")


def test_cr_only_and_header_only_ground_truth(synth_root, tmp_path):
    val = synth_root / "validation_set_annotations.txt"
    pred = tmp_path / "p.csv"
    run("baseline", "--kind", "random", "--train", val, "--images", val, "--out", pred)
    lf = run("evaluate", "--gt", val, "--pred", pred).splitlines()[-1]
    cr = tmp_path / "cr.txt"
    cr.write_bytes(val.read_bytes().replace(b"\n", b"\r"))
    assert run("evaluate", "--gt", cr, "--pred", pred).splitlines()[-1] == lf
    header_only = tmp_path / "header.txt"
    header_only.write_text(val.read_text().splitlines()[0] + "\n")
    out = run("evaluate", "--gt", header_only, "--pred", pred, code=2)
    _one_error_line(out, "header.txt: nothing to score", "zero scored rows")


def test_lenient_messages_name_file_and_line_once(synth_root, tmp_path):
    val = synth_root / "validation_set_annotations.txt"
    lines = val.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",7"
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines) + "\n")
    pred = tmp_path / "p.csv"
    run("baseline", "--kind", "random", "--train", val, "--images", val, "--out", pred)
    out = run("evaluate", "--gt", bad, "--pred", pred, "--lenient")
    assert f"skipped {bad}:6: AU26 must be" in out and out.count(f"{bad}:6:") == 1


def test_annotations_with_a_bad_line_2_are_not_taken_for_a_test_list(synth_root, tmp_path):
    lines = (synth_root / "validation_set_annotations.txt").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 4)[0]  # four fields short
    bad = tmp_path / "ann.txt"
    bad.write_text("\n".join(lines) + "\n")
    out = run("data", "stats", bad, code=2)
    _one_error_line(out, f"{bad}:2:", "expected 16")
    train = synth_root / "training_set_annotations.txt"
    out = run(
        "baseline", "--kind", "random", "--train", train, "--images", bad, "--out", tmp_path / "x.csv", code=2
    )
    _one_error_line(out, f"{bad}:2:", "read as an annotation file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_error_line(run("data", "stats", empty, code=2), "empty", "annotation file", "test list")


def test_synth_three_videos_then_extract(tmp_path):
    root = tmp_path / "three"
    run("synth", "--out", root, "--videos", "3", "--frames", "6", "--seed", "1")
    from mtaffect.data.submission import read_test_list
    from mtaffect.features.store import FeatureStore

    names = read_test_list(root / "MTL.txt")
    labelled = {
        r[0]
        for split in ("training", "validation")
        for r in _data_rows(root / f"{split}_set_annotations.txt")
    }
    assert names and len({n.split("/")[0] for n in [*names, *labelled]}) == 3  # every split holds images
    run("extract", "--data", root, "--out", tmp_path / "st", "--workers", "0")
    assert sorted(FeatureStore.open(tmp_path / "st").images) == sorted(labelled | set(names))  # each once


def test_trust_remote_code_is_only_a_flag_and_only_where_it_means_something(synth_root, tmp_path):
    out = run("extract", "--data", synth_root, "--out", tmp_path / "st", "--trust-remote-code", code=2)
    _one_error_line(out, "applies to hub backbones")
    out = run("predict", tmp_path / "x.jpg", "--out", tmp_path / "o", "--trust-remote-code", code=2)
    _one_error_line(out, "--trust-remote-code needs --model")
    assert "--trust-remote-code" in run("predict", "--help")


def test_prediction_names_outside_the_dataset_are_refused_by_evaluate_and_tune(tmp_path):
    """Issue 20, item 15: `evaluate` and `tune` refuse a prediction file naming `..` or absolute images."""
    import numpy as np

    from mtaffect.data.predictions import PredictionTable
    from mtaffect.schema import NUM_AUS, NUM_EXPR, OFFICIAL_HEADER

    names = [f"v{v}/{f:05d}.jpg" for v in (1, 2, 3, 4) for f in (1, 2, 3)]
    gt = tmp_path / "val.txt"
    gt.write_text(
        OFFICIAL_HEADER
        + "\n"
        + "".join(f"{n},0.1,-0.2,{i % NUM_EXPR},{','.join(['1', '0'] * 6)}\n" for i, n in enumerate(names))
    )
    rng = np.random.default_rng(0)
    n = len(names) + 1
    for bad in ("../../v1/00001.jpg", str(tmp_path / "v1" / "00001.jpg")):
        pred = tmp_path / "p.csv"
        PredictionTable.from_arrays(
            [*names, bad],
            rng.uniform(-1, 1, n),
            rng.uniform(-1, 1, n),
            rng.dirichlet(np.ones(NUM_EXPR), n),
            rng.uniform(0, 1, (n, NUM_AUS)),
        ).write(pred, overwrite=True)
        line = f"p.csv:{n + 1}: image name {bad!r}"
        _one_error_line(run("evaluate", "--gt", gt, "--pred", pred, code=2), line, "may not leave it")
        post = tmp_path / "post.yaml"
        out = run("tune", "--gt", gt, "--pred", pred, "--out", post, "--no-nested", "--widths", "2", code=2)
        _one_error_line(out, line, "may not leave it")
        assert not post.exists()
