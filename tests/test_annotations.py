"""Annotation files: every quirk of the official s-Aff-Wild2 files, strict errors, lenient reads, writing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtaffect.data.annotations import (
    AnnotationError,
    LabelTable,
    RowProblem,
    image_path,
    load_split,
    read_annotations,
    write_annotations,
)
from mtaffect.io import OutputExistsError
from mtaffect.schema import AU_NAMES, LABEL_COLUMNS, OFFICIAL_HEADER, TRAIN_ANNOTATIONS, VAL_ANNOTATIONS

AUS_0 = ",".join(["0"] * len(AU_NAMES))


def row(image: str, v="0.1", a="0.2", e="3", aus: str = AUS_0) -> str:
    return f"{image},{v},{a},{e},{aus}"


def write(
    tmp_path: Path, lines: list[str], name: str = "ann.txt", header: str = OFFICIAL_HEADER, nl="\n"
) -> Path:
    p = tmp_path / name
    p.write_bytes((nl.join([header, *lines]) + nl).encode())
    return p


GOOD = [
    "341/00008.jpg,-0.00233333333333,0.062,7,0,0,0,0,1,0,0,0,0,0,0,0",
    row("139-14-720x480/00012.jpg"),
    row("46-30-484x360_left/00001.jpg", v="-5", a="-5.0", e="-1"),
    row("video5_right/00100.jpg", aus="1,-1,0,1,-1,0,0,0,0,0,0,1"),
]


def test_reads_official_rows_and_video_ids(tmp_path):
    t = read_annotations(write(tmp_path, GOOD, header="whatever the header says"))
    assert tuple(t.frame.columns) == LABEL_COLUMNS
    assert len(t) == 4 and t.duplicates == 0 and t.skipped == []
    assert t.frame["video"].tolist() == ["341", "139-14-720x480", "46-30-484x360_left", "video5_right"]
    assert t.frame["frame"].tolist() == [8, 12, 1, 100]
    assert t.images[0] == "341/00008.jpg"
    assert t.valence.dtype == np.float32 and t.valence[0] == np.float32(-0.00233333333333)
    assert t.expression.dtype == np.int64 and t.expression.tolist() == [7, 3, -1, 3]
    assert t.aus.dtype == np.int8 and t.aus.shape == (4, 12)
    assert t.frame["frame"].dtype == np.int64
    assert t.videos == sorted(["341", "139-14-720x480", "46-30-484x360_left", "video5_right"])


def test_missing_codes_and_masks(tmp_path):
    lines = [
        row("a/00001.jpg", v="-5", a="0.3"),  # valence missing, arousal present
        row("a/00002.jpg", v="0.4", a="-5.0", e="-1"),
        row("a/00003.jpg", v="-5.0", a="-5", e="-1", aus=",".join(["-1"] * 12)),
        row("a/00004.jpg", aus="1,-1,0,1,-1,0,0,0,0,0,0,-1"),
    ]
    t = read_annotations(write(tmp_path, lines))
    assert t.valence_mask.tolist() == [False, True, False, True]
    assert t.arousal_mask.tolist() == [True, False, False, True]
    assert t.expr_mask.tolist() == [True, False, False, True]
    assert t.au_mask.shape == (4, 12)
    assert t.au_mask[3].tolist() == [True, False, True, True, False] + [True] * 6 + [False]
    assert not t.au_mask[2].any()
    assert t.any_label_mask.tolist() == [True, True, False, True]
    assert t.valence[0] == -5.0 and t.arousal[1] == -5.0


def test_crlf_whitespace_trailing_lines_and_integral_floats(tmp_path):
    lines = [
        " a/00001.jpg , 0.5 ,-0.25, 1.0 ," + ",".join(["1.0"] + ["0"] * 11),
        row("a/00002.jpg"),
        "",
        "  ",
    ]
    t = read_annotations(write(tmp_path, lines, nl="\r\n"))
    assert t.images.tolist() == ["a/00001.jpg", "a/00002.jpg"]
    assert t.valence[0] == 0.5 and t.arousal[0] == -0.25
    assert t.expression[0] == 1 and t.aus[0, 0] == 1


def test_blank_line_inside_keeps_line_numbers(tmp_path):
    p = write(tmp_path, [row("a/00001.jpg"), "", row("a/00002.jpg", e="9")])
    with pytest.raises(AnnotationError) as ei:
        read_annotations(p)
    assert ei.value.line == 4


def test_exact_duplicates_dropped_or_kept_and_counted(tmp_path):
    lines = [row("a/00001.jpg"), row("a/00002.jpg"), row("a/00001.jpg"), row("a/00001.jpg", v="0.10")]
    p = write(tmp_path, lines)
    t = read_annotations(p)
    assert t.images.tolist() == ["a/00001.jpg", "a/00002.jpg"]
    assert t.duplicates == 2
    kept = read_annotations(p, keep_duplicates=True)
    assert kept.images.tolist() == ["a/00001.jpg", "a/00002.jpg", "a/00001.jpg", "a/00001.jpg"]
    assert kept.duplicates == 2


def test_conflicting_duplicate_is_an_error_naming_both_lines(tmp_path):
    p = write(tmp_path, [row("a/00001.jpg"), row("a/00002.jpg"), row("a/00001.jpg", e="4")])
    with pytest.raises(AnnotationError) as ei:
        read_annotations(p)
    err = ei.value
    assert err.line == 4 and err.path == str(p)
    assert str(err).startswith(f"{p}:4: ")
    assert "lines 2 and 4" in str(err) and "expression=4" in str(err)
    with pytest.raises(AnnotationError):
        read_annotations(p, keep_duplicates=True)


def test_conflicting_duplicate_lenient_keeps_first(tmp_path):
    lines = [row("a/00001.jpg"), row("a/00001.jpg", e="4"), row("a/00001.jpg", e="4"), row("a/00001.jpg")]
    t = read_annotations(write(tmp_path, lines), lenient=True)
    assert len(t) == 1 and t.expression.tolist() == [3]
    assert [s.line for s in t.skipped] == [3, 4]
    assert t.duplicates == 1
    assert all(isinstance(s, RowProblem) and "labelled differently" in s.message for s in t.skipped)


BAD_ROWS = [
    ("too few fields", "a/00002.jpg,0.1,0.2,3," + ",".join(["0"] * 11), ["16", "found 15"]),
    ("too many fields", row("a/00002.jpg") + ",0", ["16", "found 17"]),
    ("valence not a number", row("a/00002.jpg", v="abc"), ["valence", "'abc'"]),
    ("valence empty", row("a/00002.jpg", v=""), ["valence", "''"]),
    ("valence nan", row("a/00002.jpg", v="nan"), ["valence", "'nan'"]),
    ("valence out of range", row("a/00002.jpg", v="1.5"), ["valence", "[-1, 1]", "'1.5'"]),
    ("arousal wrong missing code", row("a/00002.jpg", a="-4"), ["arousal", "'-4'"]),
    ("expression too large", row("a/00002.jpg", e="8"), ["expression", "'8'"]),
    ("expression below missing", row("a/00002.jpg", e="-2"), ["expression", "'-2'"]),
    ("expression not integral", row("a/00002.jpg", e="2.5"), ["expression", "'2.5'"]),
    ("AU not 0/1/-1", row("a/00002.jpg", aus="0,0,2" + ",0" * 9), ["AU4", "'2'"]),
    ("AU fraction", row("a/00002.jpg", aus="0" + ",0" * 10 + ",0.5"), ["AU26", "'0.5'"]),
    ("stem not an integer", row("a/frame7.jpg"), ["image", "'a/frame7.jpg'"]),
    ("no video folder", row("00002.jpg"), ["image", "'00002.jpg'"]),
]


@pytest.mark.parametrize(("kind", "bad", "needles"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_malformed_row_names_file_line_field_and_value(tmp_path, kind, bad, needles):
    p = write(tmp_path, [row("a/00001.jpg"), bad, row("a/00003.jpg")])
    with pytest.raises(AnnotationError) as ei:
        read_annotations(p)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.path == str(p) and err.line == 3
    msg = str(err)
    assert msg.startswith(f"{p}:3: ") and "(got: " in msg
    for needle in needles:
        assert needle in msg, (kind, msg)
    lenient = read_annotations(p, lenient=True)
    assert lenient.images.tolist() == ["a/00001.jpg", "a/00003.jpg"]
    assert lenient.skipped == [RowProblem(str(p), 3, msg)]


@pytest.mark.parametrize(("every_row", "line"), [(True, 2), (False, 3)])
def test_trailing_comma_is_an_extra_field(tmp_path, every_row, line):
    lines = [row("a/00001.jpg") + ("," if every_row else ""), row("a/00002.jpg") + ","]
    with pytest.raises(AnnotationError, match="found 17") as ei:
        read_annotations(write(tmp_path, lines))
    assert ei.value.line == line


def test_first_error_is_reported_and_lenient_records_all(tmp_path):
    lines = [row("a/00001.jpg"), row("a/00002.jpg", e="9"), row("a/00003.jpg", v="2"), "x,y"]
    p = write(tmp_path, lines)
    with pytest.raises(AnnotationError) as ei:
        read_annotations(p)
    assert ei.value.line == 3 and "expression" in str(ei.value)
    t = read_annotations(p, lenient=True)
    assert len(t) == 1 and [s.line for s in t.skipped] == [3, 4, 5]


def test_lenient_result_matches_clean_file(tmp_path):
    rng = np.random.default_rng(0)
    lines = [
        row(f"v-{i // 50}_left/{i % 50:05d}.jpg", v=f"{x:.6f}") for i, x in enumerate(rng.uniform(-1, 1, 300))
    ]
    clean = read_annotations(write(tmp_path, lines, name="clean.txt"))
    dirty = read_annotations(
        write(tmp_path, [*lines[:100], "bad,row", *lines[100:]], name="d.txt"), lenient=True
    )
    pd.testing.assert_frame_equal(clean.frame, dirty.frame)
    assert [s.line for s in dirty.skipped] == [102]


def test_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(AnnotationError, match="empty"):
        read_annotations(empty)
    t = read_annotations(write(tmp_path, []))
    assert len(t) == 0 and tuple(t.frame.columns) == LABEL_COLUMNS
    assert t.aus.shape == (0, 12)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_annotations(tmp_path / "nope.txt")


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    n = 200
    v = rng.uniform(-1, 1, n)
    v[::7] = -5
    a = rng.uniform(-1, 1, n)
    a[::5] = -5
    lines = [
        row(
            f"vid{i % 3}-x_right/{i:05d}.jpg",
            v=repr(float(v[i])),
            a=repr(float(a[i])),
            e=str(rng.integers(-1, 8)),
            aus=",".join(map(str, rng.integers(-1, 2, 12))),
        )
        for i in range(n)
    ]
    t = read_annotations(write(tmp_path, lines))
    out = write_annotations(t, tmp_path / "out" / "copy.txt")
    text = out.read_text()
    assert text.splitlines()[0] == OFFICIAL_HEADER
    assert ",-5," in text or ",-5.0," in text
    assert all(len(line.split(",")) == 16 for line in text.splitlines()[1:])
    back = read_annotations(out)
    pd.testing.assert_frame_equal(back.frame, t.frame)
    with pytest.raises(OutputExistsError):
        write_annotations(t, out)
    write_annotations(t.subset(np.arange(3)), out, overwrite=True)
    assert len(read_annotations(out)) == 3


def test_subset_select_concat(tmp_path):
    t = read_annotations(write(tmp_path, GOOD))
    assert t.subset(t.expr_mask).images.tolist() == [
        GOOD[0].split(",")[0],
        "139-14-720x480/00012.jpg",
        "video5_right/00100.jpg",
    ]
    assert t.subset([3, 0, 0]).frame["frame"].tolist() == [100, 8, 8]
    sel = t.select_videos(["video5_right", "341"])
    assert sel.images.tolist() == ["341/00008.jpg", "video5_right/00100.jpg"]
    with pytest.raises(ValueError, match="nope"):
        t.select_videos(["nope"])
    assert len(t.select_videos(["nope"], strict=False)) == 0
    both = LabelTable.concat([t, sel])
    assert len(both) == 6 and list(both.frame.index) == list(range(6))
    assert both.frame.dtypes.equals(t.frame.dtypes)


def test_from_frame_validates_and_derives(tmp_path):
    t = read_annotations(write(tmp_path, GOOD))
    df = t.frame.drop(columns=["video", "frame"]).assign(extra=1)
    rebuilt = LabelTable.from_frame(df, source="mem")
    pd.testing.assert_frame_equal(rebuilt.frame, t.frame)
    bad = t.frame.copy()
    bad.loc[2, "AU4"] = 3
    with pytest.raises(AnnotationError) as ei:
        LabelTable.from_frame(bad, source="mem")
    assert ei.value.line == 4 and "AU4" in str(ei.value) and str(ei.value).startswith("mem:4:")
    wrong_video = t.frame.copy()
    wrong_video["video"] = wrong_video["video"].astype(object)
    wrong_video.loc[1, "video"] = "other"
    with pytest.raises(AnnotationError, match="video column disagrees"):
        LabelTable.from_frame(wrong_video)
    with pytest.raises(ValueError, match="missing label column"):
        LabelTable.from_frame(t.frame.drop(columns=["AU26"]))
    with pytest.raises(ValueError, match="exactly the columns"):
        LabelTable(t.frame.drop(columns=["AU26"]))


def test_load_split_and_image_path(tmp_path):
    write(tmp_path, GOOD, name=TRAIN_ANNOTATIONS)
    t = load_split(tmp_path, "train")
    assert len(t) == 4 and t.source == str(tmp_path / TRAIN_ANNOTATIONS)
    with pytest.raises(FileNotFoundError) as ei:
        load_split(tmp_path, "val")
    assert VAL_ANNOTATIONS in str(ei.value) and TRAIN_ANNOTATIONS in str(ei.value)
    with pytest.raises(ValueError, match="unknown split"):
        load_split(tmp_path, "test")
    assert image_path(tmp_path, "341/00008.jpg") == tmp_path / "cropped_aligned" / "341" / "00008.jpg"


def test_parses_a_real_size_file(tmp_path):
    """142k training rows is the real size (speed is measured in benchmarks/bench_data_io.py)."""
    n = 150_000
    rng = np.random.default_rng(2)
    tails = [
        f"{rng.uniform(-1, 1):.6f},{rng.uniform(-1, 1):.6f},{rng.integers(-1, 8)},"
        + ",".join(map(str, rng.integers(-1, 2, 12)))
        for _ in range(97)
    ]
    body = "\n".join(f"{i // 600}-30-484x360_left/{i % 600 + 1:05d}.jpg,{tails[i % 97]}" for i in range(n))
    p = tmp_path / "big.txt"
    p.write_text(OFFICIAL_HEADER + "\n" + body + "\n")
    t = read_annotations(p)
    assert len(t) == n and t.frame["frame"].iloc[-1] == 600
    assert t.videos[:2] == ["0-30-484x360_left", "1-30-484x360_left"]


# ---- safety (issue 12) -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/passwd/00001.jpg", "is an absolute path"),
        ("../../secret/00001.jpg", "has a '..' part"),
        ("vid/../../00001.jpg", "has a '..' part"),
        ("C:/x/00001.jpg", "is an absolute path"),  # the fast path once let these two through
        ("\\x/00001.jpg", "is an absolute path"),
    ],
)
def test_image_names_may_not_leave_the_dataset(tmp_path, name, why):
    lines = [*GOOD[:2], row(name), GOOD[2]]
    path = write(tmp_path, lines)
    with pytest.raises(AnnotationError, match=rf"^{path}:4: image name {why}"):
        read_annotations(path)
    assert [s.line for s in read_annotations(path, lenient=True).skipped] == [4]
    big = write(tmp_path, [row(f"v/{i:05d}.jpg") for i in range(1, 300)] + [row(name)], name="big.txt")
    with pytest.raises(AnnotationError, match=rf"^{big}:301: image name {why}"):  # the fast path too
        read_annotations(big)


def test_dots_inside_a_video_name_are_fine(tmp_path):
    t = read_annotations(write(tmp_path, [row("clip..v2/00003.jpg")]))
    assert t.frame["video"].tolist() == ["clip..v2"]


@pytest.mark.parametrize("nl", ["\r", "\r\n"])
def test_cr_only_and_crlf_line_ends_are_line_ends(tmp_path, nl):
    lf = read_annotations(write(tmp_path, GOOD, name="lf.txt"))
    other = read_annotations(write(tmp_path, GOOD, name="cr.txt", nl=nl))
    assert len(other) == len(GOOD)
    pd.testing.assert_frame_equal(lf.frame, other.frame)
    bad = write(tmp_path, [*GOOD[:2], row("v/00001.jpg", v="7")], name="bad.txt", nl=nl)
    with pytest.raises(AnnotationError, match=rf"^{bad}:4: valence"):
        read_annotations(bad)


def test_a_data_row_on_line_1_is_reported(tmp_path):
    path = write(tmp_path, GOOD[1:], header=GOOD[0])  # a file without its header line
    with pytest.warns(UserWarning, match=rf"^{path}:1: line 1 is a data row .* add 'image,valence"):
        t = read_annotations(path)
    assert len(t) == len(GOOD) - 1
    for header in (OFFICIAL_HEADER, "image,valence,arousal,expression," + ",".join(AU_NAMES), "x"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read_annotations(write(tmp_path, GOOD, name="h.txt", header=header))


def test_a_binary_file_is_named_as_such(tmp_path):
    path = tmp_path / "ann.txt"
    path.write_bytes(OFFICIAL_HEADER.encode() + b"\n" + b"\x00\x01\x02PK\x03\x04")
    with pytest.raises(AnnotationError, match=rf"^{path}:2: a binary file"):
        read_annotations(path)


def test_the_frame_is_the_whole_stem_on_every_path(tmp_path):
    """Found by the fuzz tests: the fast path read 'v/0.5.jpg' as frame 0, the row check refused it."""
    for name, rows in (("small.txt", 1), ("big.txt", 300)):
        lines = [row(f"v/{i:05d}.jpg") for i in range(1, rows)] + [row("v/0.50004.jpg")]
        path = write(tmp_path, lines, name=name)
        with pytest.raises(AnnotationError, match=rf"^{path}:{rows + 1}: image name must be"):
            read_annotations(path)


def test_a_frame_number_has_at_most_18_digits_on_every_path(tmp_path):
    """The fast path once read a 19-digit frame that fits an int64; the row check refuses it."""
    for stem in ("1000000000000000000", "99999999999999999999999"):
        for name, rows in (("small.txt", 1), ("big.txt", 300)):
            lines = [row(f"v/{i:05d}.jpg") for i in range(1, rows)] + [row(f"v/{stem}.jpg")]
            path = write(tmp_path, lines, name=name)
            with pytest.raises(AnnotationError, match=rf"^{path}:{rows + 1}: image name must be"):
                read_annotations(path)
    t = read_annotations(write(tmp_path, [row("v/999999999999999999.jpg")]))
    assert t.frame["frame"].tolist() == [999999999999999999]
