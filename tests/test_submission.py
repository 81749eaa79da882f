"""Test lists, submission writing and validation, AU threshold files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtaffect.data.predictions import MissingPredictionsError, PredictionTable
from mtaffect.data.submission import (
    SubmissionError,
    read_test_list,
    thresholds_from_json,
    validate_submission,
    write_submission,
)
from mtaffect.io import OutputExistsError
from mtaffect.schema import AU_NAMES, DEFAULT_AU_THRESHOLD, NUM_AUS, NUM_EXPR, OFFICIAL_HEADER

NAMES = [
    "video45_1/00001.jpg",
    "video45_1/00002.jpg",
    "139-14-720x480/00007.jpg",
    "46-30-484x360_left/00010.jpg",
]


def preds(names=NAMES, seed: int = 0) -> PredictionTable:
    rng = np.random.default_rng(seed)
    n = len(names)
    return PredictionTable.from_arrays(
        names,
        rng.uniform(-1.5, 1.5, n),  # some outside [-1, 1]: the writer clips
        rng.uniform(-1.5, 1.5, n),
        rng.dirichlet(np.ones(NUM_EXPR), n),
        rng.uniform(0, 1, (n, NUM_AUS)),
    )


# ---- test lists ------------------------------------------------------------------------------------
def test_abaw7_test_list_trailing_commas_repeats_and_crlf(tmp_path):
    p = tmp_path / "MTL.txt"
    p.write_bytes(b"video45_1/00001.jpg,\r\nvideo45_1/00002.jpg,\r\nvideo45_1/00001.jpg,\r\n\r\n\r\n")
    assert read_test_list(p) == ["video45_1/00001.jpg", "video45_1/00002.jpg", "video45_1/00001.jpg"]


@pytest.mark.parametrize("header", ["image", OFFICIAL_HEADER, "image,"])
def test_test_list_header_is_skipped(tmp_path, header):
    p = tmp_path / "list.txt"
    p.write_text("\n".join([header, *NAMES]) + "\n")
    assert read_test_list(p) == NAMES


def test_test_list_errors_name_the_line(tmp_path):
    p = tmp_path / "list.txt"
    p.write_text("image\nv/00001.jpg\n\nv/00002.jpg\n")
    with pytest.raises(SubmissionError, match=r"list\.txt:3: blank line"):
        read_test_list(p)
    p.write_text("v/00001.jpg\nnot an image\n")
    with pytest.raises(SubmissionError, match=r"list\.txt:2: 'not an image'"):
        read_test_list(p)
    p.write_text("image\n\n")
    with pytest.raises(SubmissionError, match="names no images"):
        read_test_list(p)
    with pytest.raises(FileNotFoundError):
        read_test_list(tmp_path / "missing.txt")


# ---- writing ---------------------------------------------------------------------------------------
def test_write_validate_and_read_back(tmp_path):
    order = [NAMES[2], NAMES[0], NAMES[2], NAMES[1], NAMES[3]]  # repeats repeated, test-list order
    p = preds()
    thr = np.linspace(0.2, 0.8, NUM_AUS)
    out = write_submission(p, order, tmp_path / "sub" / "predictions.txt", au_thresholds=thr)
    lines = out.read_text().splitlines()
    assert lines[0] == OFFICIAL_HEADER and len(lines) == 1 + len(order)
    assert [ln.split(",")[0] for ln in lines[1:]] == order
    assert validate_submission(out, order) == []

    back = PredictionTable.read(out)
    aligned = p.align_to(order)
    assert back.images.tolist() == order
    np.testing.assert_array_equal(back.valence, np.clip(aligned.valence, -1, 1))
    np.testing.assert_array_equal(back.arousal, np.clip(aligned.arousal, -1, 1))
    np.testing.assert_array_equal(back.expr_labels, aligned.expr_labels)
    np.testing.assert_array_equal(back.au_probs >= 0.5, aligned.au_probs >= thr)
    with pytest.raises(OutputExistsError):
        write_submission(p, order, out)
    write_submission(p, order, out, overwrite=True)


def test_threshold_is_inclusive_and_default(tmp_path):
    probs = np.full((1, NUM_AUS), DEFAULT_AU_THRESHOLD)
    probs[0, 1] = DEFAULT_AU_THRESHOLD - 1e-9
    t = PredictionTable.from_arrays(["v/00001.jpg"], [0.0], [0.0], np.eye(NUM_EXPR)[[6]], probs)
    lines = write_submission(t, ["v/00001.jpg"], tmp_path / "s.txt").read_text().splitlines()
    fields = lines[1].split(",")
    assert fields[3] == "6"
    assert fields[4:] == ["1", "0"] + ["1"] * (NUM_AUS - 2)


def test_write_refuses_missing_predictions_and_bad_thresholds(tmp_path):
    with pytest.raises(MissingPredictionsError, match="1 of 2"):
        write_submission(preds(NAMES[:2]), [NAMES[0], "other/00001.jpg"], tmp_path / "s.txt")
    with pytest.raises(SubmissionError, match="12 values"):
        write_submission(preds(), NAMES, tmp_path / "s.txt", au_thresholds=[0.5] * 3)
    with pytest.raises(SubmissionError, match=r"\[0, 1\]"):
        write_submission(preds(), NAMES, tmp_path / "s.txt", au_thresholds=[1.5] * NUM_AUS)
    assert not (tmp_path / "s.txt").exists()


# ---- validation ------------------------------------------------------------------------------------
@pytest.fixture
def good_submission(tmp_path):
    return write_submission(preds(), NAMES, tmp_path / "s.txt")


def _edit(path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def test_validator_catches_wrong_count(good_submission):
    _edit(good_submission, lambda ls: ls[:-1])
    problems = validate_submission(good_submission, NAMES)
    assert problems == ["expected 4 prediction lines after the header (one per test-list line), found 3"]


def test_validator_catches_wrong_order(good_submission):
    _edit(good_submission, lambda ls: [ls[0], ls[2], ls[1], *ls[3:]])
    problems = validate_submission(good_submission, NAMES)
    assert problems == [
        f"line 2: expected image '{NAMES[0]}', found '{NAMES[1]}'",
        f"line 3: expected image '{NAMES[1]}', found '{NAMES[0]}'",
    ]


def test_validator_catches_ranges_and_fields(good_submission):
    def corrupt(ls):
        f = ls[1].split(",")
        f[1], f[3], f[5] = "1.5", "8", "2"
        g = ls[2].split(",")
        g[2], g[3] = "nan", "3.0"
        return [ls[0], ",".join(f), ",".join(g), ls[3] + ",0", ""]

    _edit(good_submission, corrupt)
    problems = validate_submission(good_submission, NAMES)
    assert problems == [
        "expected 4 prediction lines after the header (one per test-list line), found 3",
        "line 2: valence must be a number in [-1, 1], found '1.5'",
        "line 2: expression must be an integer 0..7, found '8'",
        "line 2: AU2 must be 0 or 1, found '2'",
        "line 3: arousal must be a number in [-1, 1], found 'nan'",
        "line 3: expression must be an integer 0..7, found '3.0'",
        "line 4: expected 16 comma-separated fields, found 17",
    ]


def test_validator_header_and_cap(good_submission, tmp_path):
    _edit(good_submission, lambda ls: ["img,v,a,e,aus", *ls[1:]])
    assert validate_submission(good_submission, NAMES) == [
        f"line 1: expected the header '{OFFICIAL_HEADER}', found 'img,v,a,e,aus'"
    ]
    _edit(good_submission, lambda ls: ls[1:])
    problems = validate_submission(good_submission, NAMES)
    assert problems[0].startswith("line 1: the header") and len(problems) == 1  # rest is still checked

    many = [f"v/{i:05d}.jpg" for i in range(40)]
    sub = write_submission(preds(many), many, tmp_path / "many.txt")
    problems = validate_submission(sub, list(reversed(many)), max_problems=5)
    assert len(problems) == 6 and problems[-1] == "... and 35 more problem(s)"
    assert problems[0] == f"line 2: expected image '{many[-1]}', found '{many[0]}'"
    assert validate_submission(tmp_path / "none.txt", many)[0].startswith("submission not found")


# ---- thresholds ------------------------------------------------------------------------------------
def test_thresholds_from_json(tmp_path):
    thr = thresholds_from_json({"AU1": 0.4, "AU26": 0.7})
    assert thr.shape == (NUM_AUS,) and thr[0] == 0.4 and thr[-1] == 0.7
    assert (thr[1:-1] == DEFAULT_AU_THRESHOLD).all()
    assert thresholds_from_json({"AU04": 0.3})[AU_NAMES.index("AU4")] == 0.3
    p = tmp_path / "thr.json"
    p.write_text(json.dumps({"au_thresholds": [0.1 * (i % 9 + 1) for i in range(NUM_AUS)]}))
    np.testing.assert_allclose(thresholds_from_json(p), [0.1 * (i % 9 + 1) for i in range(NUM_AUS)])
    np.testing.assert_allclose(thresholds_from_json(str(p)), thresholds_from_json(p))
    with pytest.raises(SubmissionError, match="unknown AU"):
        thresholds_from_json({"AU3": 0.5})
    with pytest.raises(SubmissionError, match="12 values"):
        thresholds_from_json([0.5] * 11)
    with pytest.raises(SubmissionError, match="AU2"):
        thresholds_from_json({"AU2": "high"})
    p.write_text("{bad json")
    with pytest.raises(SubmissionError, match=r"thr\.json:1: not valid JSON"):
        thresholds_from_json(p)


# ---- safety (issue 12) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/abs/video/00001.jpg", "../other/00001.jpg", "v/../../x/00002.jpg"])
def test_test_list_names_may_not_leave_the_dataset(tmp_path, name):
    p = tmp_path / "MTL.txt"
    p.write_text(f"image\n{NAMES[0]},\n{name},\n")
    with pytest.raises(SubmissionError, match=rf"^{p}:3: image name .* (absolute path|'\.\.' part)"):
        read_test_list(p)


def test_test_list_with_cr_only_line_ends(tmp_path):
    p = tmp_path / "MTL.txt"
    p.write_bytes(("image\r" + "".join(f"{n},\r" for n in NAMES)).encode())
    assert read_test_list(p) == NAMES


def _annotation_lines(bad_line_2: bool = False) -> list[str]:
    aus = ",".join(["0"] * NUM_AUS)
    rows = [f"{n},0.1,0.2,3,{aus}" for n in NAMES]
    if bad_line_2:
        rows[0] = rows[0].rsplit(",", 3)[0]  # three fields short
    return [OFFICIAL_HEADER, *rows]


def test_the_kind_of_an_image_list_comes_from_its_first_line(tmp_path):
    from mtaffect.data.submission import ANNOTATIONS, TEST_LIST, list_kind, read_image_names

    cases = {
        "ann.txt": ("\n".join(_annotation_lines()) + "\n", ANNOTATIONS),
        "ann_headerless.txt": ("\n".join(_annotation_lines()[1:]) + "\n", ANNOTATIONS),
        "mtl.txt": ("image\n" + "".join(f"{n},\n" for n in NAMES), TEST_LIST),
        "mtl_headerless.txt": ("".join(f"{n}\n" for n in NAMES), TEST_LIST),
        "mtl_official_header.txt": (OFFICIAL_HEADER + "\n" + "".join(f"{n},\n" for n in NAMES), TEST_LIST),
    }
    for name, (text, kind) in cases.items():
        (tmp_path / name).write_text(text)
        assert list_kind(tmp_path / name) == kind, name
    # One malformed line 2 does not turn annotations into a test list: the row error is reported.
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(_annotation_lines(bad_line_2=True)) + "\n")
    assert list_kind(bad) == ANNOTATIONS
    with pytest.raises(ValueError, match=rf"^{bad}:2: expected 16 .*read as an annotation file"):
        read_image_names(bad)


@pytest.mark.parametrize(("data", "what"), [(b"", "is empty"), (b"\x89PNG\r\n\x1a\n\x00\x00", "binary file")])
def test_empty_or_binary_image_lists_say_what_was_expected(tmp_path, data, what):
    from mtaffect.data.submission import read_image_names

    p = tmp_path / "list.txt"
    p.write_bytes(data)
    with pytest.raises(
        SubmissionError, match=rf"^{p}: .*{what}.*expected an annotation file .* or a test list"
    ):
        read_image_names(p)
    with pytest.raises(SubmissionError, match=rf"^{p}.*{what}.*expected a test list"):
        read_test_list(p)
