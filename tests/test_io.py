"""Outputs are written atomically and never replace a user's file unless asked."""

from __future__ import annotations

import os

import pytest

from mtaffect.io import OutputExistsError, atomic_open


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "scores.json"
    out.write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"), atomic_open(out):
        pass
    assert out.read_text() == "mine"
    with atomic_open(out, overwrite=True) as fh:
        fh.write("new")
    assert out.read_text() == "new"


def test_a_crash_mid_write_leaves_the_old_file_and_no_debris(tmp_path):
    out = tmp_path / "table.csv"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(out, overwrite=True) as fh:
        fh.write("half")
        raise RuntimeError("killed")
    assert out.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["table.csv"]


def test_creates_parent_folders_with_normal_permissions(tmp_path):
    out = tmp_path / "a" / "b" / "x.txt"
    with atomic_open(out) as fh:
        fh.write("x")
    assert out.read_text() == "x"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_folder_is_never_replaced_by_a_file_output(tmp_path):
    from mtaffect.io import check_writable

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with (
            pytest.raises(IsADirectoryError, match="is a folder; give the path of a file"),
            atomic_open(tmp_path / "out", overwrite=overwrite),
        ):
            pass
        with pytest.raises(IsADirectoryError):
            check_writable(tmp_path / "out", overwrite=overwrite)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
