"""Dataset statistics: counts per task and per AU, class balance, prevalence, frame gaps, folder scan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtaffect.data.annotations import read_annotations
from mtaffect.data.stats import dataset_stats, render_stats, stats_for_path
from mtaffect.schema import (
    AU_NAMES,
    EXPR_NAMES,
    OFFICIAL_HEADER,
    TEST_LIST_NAMES,
    TRAIN_ANNOTATIONS,
    VAL_ANNOTATIONS,
)

NO_AU = ",".join(["-1"] * len(AU_NAMES))


def aus(*values: int) -> str:
    return ",".join(map(str, values))


ROWS = [
    # video "v-1_left": frames 1, 2, 5, 20 (gaps 1, 3, 15); video "w": frames 3, 4 (gap 1)
    f"v-1_left/00001.jpg,0.5,0.25,4,{aus(1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, -1)}",
    f"v-1_left/00002.jpg,-5,0.1,-1,{aus(0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, -1)}",
    f"v-1_left/00005.jpg,-0.5,-5.0,0,{NO_AU}",
    f"v-1_left/00020.jpg,-5,-5,-1,{NO_AU}",  # no label at all
    f"w/00003.jpg,0.1,0.2,4,{aus(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)}",
    f"w/00004.jpg,0.1,0.2,7,{aus(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)}",
    f"w/00004.jpg,0.1,0.2,7,{aus(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)}",  # exact duplicate
]


def write(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([OFFICIAL_HEADER, *rows]) + "\n")
    return path


def test_dataset_stats_counts(tmp_path):
    s = dataset_stats(read_annotations(write(tmp_path / "a.txt", ROWS)))
    json.dumps(s)  # JSON-serialisable
    assert s["rows"] == 6 and s["videos"] == 2 and s["images_unique"] == 6
    assert s["duplicates"] == 1 and s["skipped"] == 0
    v = s["valid"]
    assert (v["valence"], v["arousal"], v["va"], v["expression"]) == (4, 4, 3, 4)
    assert v["au_any"] == 4 and v["au_all"] == 2
    assert v["per_au"]["AU1"] == 4 and v["per_au"]["AU26"] == 2
    assert s["rows_with_any_label"] == 5
    assert list(s["expression_counts"]) == list(EXPR_NAMES)
    assert s["expression_counts"]["Happiness"] == 2 and s["expression_counts"]["Other"] == 1
    assert s["expression_counts"]["Neutral"] == 1 and sum(s["expression_counts"].values()) == 4
    assert s["au_prevalence"]["AU1"] == 0.5  # 2 positives among 4 valid
    assert s["au_prevalence"]["AU12"] == 0.75
    assert s["au_prevalence"]["AU26"] == 0.5
    g = s["frame_gaps"]
    assert g["pairs"] == 4 and g["max"] == 15 and g["median"] == 2.0
    assert g["histogram"]["1"] == 2 and g["histogram"]["3-5"] == 1 and g["histogram"]["11-100"] == 1


def test_stats_of_empty_table_have_no_rates(tmp_path):
    s = dataset_stats(read_annotations(write(tmp_path / "a.txt", [])))
    assert s["rows"] == 0 and s["au_prevalence"]["AU1"] is None and s["frame_gaps"]["median"] is None
    json.dumps(s)


def test_stats_for_file_and_root(tmp_path):
    f = write(tmp_path / "custom.txt", ROWS)
    assert list(stats_for_path(f)) == ["custom.txt"]
    write(tmp_path / TRAIN_ANNOTATIONS, ROWS)
    write(tmp_path / VAL_ANNOTATIONS, ROWS[:2])
    (tmp_path / TEST_LIST_NAMES[0]).write_text("v/00001.jpg,\nv/00002.jpg,\nv/00001.jpg,\n")
    s = stats_for_path(tmp_path)
    assert set(s) == {"train", "val", "test_list"}
    assert s["train"]["rows"] == 6 and s["val"]["rows"] == 2
    assert s["test_list"]["lines"] == 3 and s["test_list"]["images_unique"] == 2
    assert stats_for_path(tmp_path / TEST_LIST_NAMES[0])[TEST_LIST_NAMES[0]]["lines"] == 3
    json.dumps(s)


def test_stats_for_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none of the dataset files"):
        stats_for_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        stats_for_path(tmp_path / "nope")
    bad = write(tmp_path / TRAIN_ANNOTATIONS, [*ROWS, "v/00009.jpg,2,0,0," + NO_AU])
    with pytest.raises(ValueError, match=":9: valence"):
        stats_for_path(tmp_path)
    assert stats_for_path(bad, lenient=True)[bad.name]["skipped"] == 1


def test_render_stats_text(tmp_path):
    write(tmp_path / TRAIN_ANNOTATIONS, ROWS)
    (tmp_path / TEST_LIST_NAMES[0]).write_text("v/00001.jpg,\nv/00002.jpg,\n")
    text = render_stats(stats_for_path(tmp_path))
    assert text.splitlines()[0].startswith(f"train ({TRAIN_ANNOTATIONS}): 6 rows, 2 videos")
    assert "expression 4" in text and "Happiness 2 (50.0%)" in text and "AU12 0.750" in text
    assert "frame gaps: median 2, max 15" in text
    assert text.splitlines()[-1] == f"test_list ({TEST_LIST_NAMES[0]}): 2 lines, 2 unique images, 1 videos"
    single = render_stats(dataset_stats(read_annotations(tmp_path / TRAIN_ANNOTATIONS)))
    assert single.startswith("table (")
