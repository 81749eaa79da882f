"""PredictionTable: validation, CSV/Parquet round-trips, submission files read back, alignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mtaffect.data.predictions import MissingPredictionsError, PredictionError, PredictionTable
from mtaffect.io import OutputExistsError
from mtaffect.schema import (
    AU_PROB_COLUMNS,
    EXPR_PROB_COLUMNS,
    NUM_AUS,
    NUM_EXPR,
    OFFICIAL_HEADER,
    PREDICTION_COLUMNS,
)


def make(n: int = 6, seed: int = 0, **extra) -> PredictionTable:
    rng = np.random.default_rng(seed)
    return PredictionTable.from_arrays(
        [f"139-14-720x480/{i + 1:05d}.jpg" for i in range(n)],
        rng.uniform(-1, 1, n),
        rng.uniform(-1, 1, n),
        rng.dirichlet(np.ones(NUM_EXPR), n),
        rng.uniform(0, 1, (n, NUM_AUS)),
        **extra,
    )


def test_from_arrays_columns_and_views():
    t = make(4, video=["341"] * 4, face_id=[0, 0, 1, 0])
    assert list(t.frame.columns) == [*PREDICTION_COLUMNS, "video", "face_id"]
    assert len(t) == 4
    assert t.expr_probs.shape == (4, NUM_EXPR) and t.au_probs.shape == (4, NUM_AUS)
    assert t.expr_labels.tolist() == t.expr_probs.argmax(axis=1).tolist()
    assert t.images[0] == "139-14-720x480/00001.jpg"
    assert t.valence.dtype == np.float64
    with pytest.raises(PredictionError, match="expr_probs has shape"):
        PredictionTable.from_arrays(["a/1.jpg"], [0], [0], np.ones((1, 7)), np.zeros((1, NUM_AUS)))
    with pytest.raises(PredictionError, match="clashes"):
        make(2, Anger_p=[0, 0])


def test_probabilities_are_not_renormalised():
    probs = np.full((1, NUM_EXPR), 0.1)  # sums to 0.8: kept as given
    t = PredictionTable.from_arrays(["a/00001.jpg"], [0.2], [0.1], probs, np.zeros((1, NUM_AUS)))
    np.testing.assert_array_equal(t.expr_probs, probs)


@pytest.mark.parametrize(
    ("column", "value", "needle"),
    [
        ("Anger_p", 1.2, "probability in [0, 1]"),
        ("AU12_p", -0.1, "probability in [0, 1]"),
        ("Fear_p", np.nan, "probability in [0, 1]"),
        ("valence", np.inf, "finite number"),
        ("arousal", "high", "finite number"),
    ],
)
def test_invalid_values_rejected_with_column_and_row(column, value, needle):
    df = make(5).frame.astype({column: object})
    df.loc[3, column] = value
    with pytest.raises(PredictionError) as ei:
        PredictionTable(df, source="preds.parquet")
    msg = str(ei.value)
    assert msg.startswith("preds.parquet: ") and repr(column) in msg and needle in msg and "row 3" in msg


def test_missing_columns_listed():
    df = make(2).frame.drop(columns=["AU04_p", "arousal"])
    with pytest.raises(PredictionError) as ei:
        PredictionTable(df, source="x.csv")
    assert "x.csv" in str(ei.value) and "['arousal', 'AU04_p']" in str(ei.value)


def test_csv_and_parquet_round_trip_exactly(tmp_path):
    t = make(50, video=[f"{i % 3}" for i in range(50)], frame=np.arange(50), time=np.linspace(0, 2, 50))
    for name in ("p.csv", "p.parquet", "p.pq"):
        path = t.write(tmp_path / name)
        back = PredictionTable.read(path)
        pd.testing.assert_frame_equal(back.frame, t.frame, check_exact=True)
        assert back.source == str(path)
        with pytest.raises(OutputExistsError):
            t.write(path)
    t.write(tmp_path / "p.csv", overwrite=True)
    with pytest.raises(PredictionError, match="write_submission"):
        t.write(tmp_path / "p.txt")


def test_csv_errors_name_file_and_line(tmp_path):
    df = make(4).frame
    df.loc[2, "AU01_p"] = 3.0
    p = tmp_path / "bad.csv"
    df.to_csv(p, index=False)
    with pytest.raises(PredictionError) as ei:
        PredictionTable.read(p)
    assert str(ei.value).startswith(f"{p}: column 'AU01_p'") and "line 4" in str(ei.value)
    with pytest.raises(PredictionError, match="unsupported suffix"):
        PredictionTable.read(_touch(tmp_path / "p.json"))
    with pytest.raises(FileNotFoundError):
        PredictionTable.read(tmp_path / "none.csv")


def _touch(p):
    p.write_text("{}")
    return p


SUB_ROWS = [
    "a-1_left/00001.jpg,0.5,-0.25,4,1,0,0,0,0,0,1,0,0,0,1,0",
    "a-1_left/00002.jpg,-1,1,0,0,0,0,0,0,0,0,0,0,0,0,1",
]


@pytest.mark.parametrize("header", [OFFICIAL_HEADER, None])
def test_submission_file_read_as_probabilities(tmp_path, header):
    p = tmp_path / "predictions.txt"
    p.write_text("\n".join([header] * (header is not None) + SUB_ROWS) + "\n\n")
    t = PredictionTable.read(p)
    assert t.images.tolist() == ["a-1_left/00001.jpg", "a-1_left/00002.jpg"]
    assert t.valence.tolist() == [0.5, -1.0] and t.arousal.tolist() == [-0.25, 1.0]
    assert t.expr_labels.tolist() == [4, 0]
    np.testing.assert_array_equal(t.expr_probs[0], np.eye(NUM_EXPR)[4])
    assert (t.au_probs >= 0.5).astype(int)[0].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0]
    assert set(np.unique(t.au_probs)) <= {0.0, 1.0}


def test_a_submission_after_blank_lines_is_still_one_and_a_blank_file_is_empty(tmp_path):
    p = tmp_path / "predictions.txt"
    for body in ("\r\n \t\r\n" + OFFICIAL_HEADER + "\r\n" + SUB_ROWS[0] + "\r\n", "\n\n" + SUB_ROWS[0]):
        p.write_bytes(body.encode())
        assert PredictionTable.read(p).images.tolist() == ["a-1_left/00001.jpg"]
    p.write_bytes(b" \r\n\t\n\r")
    with pytest.raises(PredictionError, match=rf"^{p}: the file is empty"):
        PredictionTable.read(p)


def test_bad_submission_rows_name_the_line(tmp_path):
    p = tmp_path / "s.csv"
    bad_expr = "a-1_left/00002.jpg,-1,1,9," + ",".join(["0"] * NUM_AUS)
    bad_au = "a-1_left/00003.jpg,0,0,1,0,0,2," + ",".join(["0"] * (NUM_AUS - 3))
    p.write_text("\n".join([OFFICIAL_HEADER, SUB_ROWS[0], bad_expr, bad_au]))
    with pytest.raises(PredictionError, match=rf"{p}:3: expression must be an integer 0\.\.7 \(got: '9'\)"):
        PredictionTable.read(p)
    p.write_text("\n".join([OFFICIAL_HEADER, SUB_ROWS[0], bad_au]))
    with pytest.raises(PredictionError, match=rf"{p}:3: AU4 must be 0 or 1 \(got: '2'\)"):
        PredictionTable.read(p)
    p.write_text("\n".join([OFFICIAL_HEADER, SUB_ROWS[0] + ",1"]))
    with pytest.raises(PredictionError, match=rf"{p}:2: expected 16"):
        PredictionTable.read(p)


def test_align_to_reorders_repeats_and_reports_missing():
    t = make(5, frame=np.arange(5))
    names = t.images
    aligned = t.align_to([names[3], names[0], names[3]])
    assert aligned.frame["frame"].tolist() == [3, 0, 3]
    np.testing.assert_array_equal(aligned.au_probs[0], t.au_probs[3])
    with pytest.raises(MissingPredictionsError) as ei:
        t.align_to([names[0], *[f"x/{i:05d}.jpg" for i in range(8)], "x/00000.jpg"])
    err = ei.value
    assert isinstance(err, PredictionError)
    assert "8 of 9 requested image(s) have no prediction" in str(err)
    assert "x/00004.jpg" in str(err) and "x/00005.jpg" not in str(err)  # at most 5 examples
    assert err.missing[:2] == ["x/00000.jpg", "x/00001.jpg"] and len(err.missing) == 8


def test_align_to_duplicate_predictions():
    t = make(3)
    same = PredictionTable(pd.concat([t.frame, t.frame.iloc[[1]]], ignore_index=True))
    assert same.align_to(t.images).frame.equals(t.frame)
    changed = t.frame.iloc[[1]].copy()
    changed["valence"] = 0.99
    ambiguous = PredictionTable(pd.concat([t.frame, changed], ignore_index=True), source="two_faces.csv")
    with pytest.raises(PredictionError, match="ambiguous") as ei:
        ambiguous.align_to(t.images)
    assert t.images[1] in str(ei.value) and "two_faces.csv" in str(ei.value)


def test_column_constants_are_in_schema_order():
    t = make(1)
    assert [c for c in t.frame.columns if c.endswith("_p")] == [*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS]


def test_pre_release_probability_names_are_missing_columns(tmp_path):
    """A table with the pre-release ``p_AU1`` / ``p_Happiness`` names is refused with the usual message
    naming the columns it lacks (no silent renaming)."""
    t = make(3, face_id=[0, 1, 2])
    old = t.frame.rename(columns={"AU01_p": "p_AU1", "Happiness_p": "p_Happiness"})
    for name in ("old.csv", "old.parquet"):
        path = tmp_path / name
        old.to_csv(path, index=False) if name.endswith(".csv") else old.to_parquet(path, index=False)
        with pytest.raises(PredictionError, match=r"missing column\(s\) \['Happiness_p', 'AU01_p'\]"):
            PredictionTable.read(path)


def test_csv_round_trip_of_awkward_text_columns(tmp_path):
    t = make(2, note=['says "hi", twice', "plain"], face=[0, 1])
    back = PredictionTable.read(t.write(tmp_path / "p.csv"))
    assert back.frame["note"].tolist() == ['says "hi", twice', "plain"]
    assert back.frame["face"].tolist() == [0, 1]
    np.testing.assert_array_equal(back.au_probs, t.au_probs)


@pytest.mark.parametrize("bad", ["../../secret/00001.jpg", "/etc/vid/00001.jpg", "C:\\data\\00001.jpg"])
@pytest.mark.parametrize("kind", ["csv", "parquet", "submission"])
def test_files_naming_images_outside_the_dataset_are_refused(tmp_path, kind, bad):
    """Issue 20, item 15: a name that leaves the dataset folder is refused with FILE:LINE (Parquet: row)."""
    t = make(4)
    frame = t.frame.copy()
    frame.loc[2, "image"] = bad
    table = PredictionTable(frame)  # in memory, names are free (predict's are file paths)
    if kind == "submission":
        path = tmp_path / "sub.txt"
        lines = [OFFICIAL_HEADER, *(f"{n},0.1,0.2,3,{','.join(['0'] * NUM_AUS)}" for n in frame["image"])]
        path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line 3
        where = f"sub.txt:5: image name {bad!r}"
    else:
        path = table.write(tmp_path / f"p.{kind}")
        where = f"p.csv:4: image name {bad!r}" if kind == "csv" else f"p.parquet: row 2: image name {bad!r}"
    with pytest.raises(PredictionError, match="may not leave it") as err:
        PredictionTable.read(path)
    assert where in str(err.value) and "\n" not in str(err.value)
    reason = "has a '..' part" if bad.startswith("..") else "is an absolute path"
    assert reason in str(err.value)
