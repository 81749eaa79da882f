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


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_every_reader_of_a_users_file_refuses_a_fifo_a_folder_and_a_missing_path_by_name(tmp_path):
    """One regular-file check (io.open_regular) serves text files, annotation files, test lists and
    prediction tables: a FIFO is refused at once (it would block a plain open forever), a folder and a
    missing path are named with the kind of file expected."""
    from mtaffect.data.annotations import read_annotations
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.data.submission import read_test_list
    from mtaffect.io import NotRegularFileError, read_regular
    from mtaffect.textfiles import read_text

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    readers = {
        "text file": lambda p: read_text(p, "text file"),
        "annotation file": read_annotations,
        "test list": read_test_list,
        "prediction file": PredictionTable.read,
    }
    for what, read in readers.items():
        with pytest.raises(NotRegularFileError, match=r"a FIFO \(named pipe\), not a regular file: .*pipe"):
            read(fifo)
        with pytest.raises(IsADirectoryError, match=f"is a folder; expected a {what}"):
            read(tmp_path)
        with pytest.raises(FileNotFoundError, match=f"{what} not found: .*missing.txt"):
            read(tmp_path / "missing.txt")
    (tmp_path / "ok.txt").write_bytes(b"a\nb\n")
    assert read_regular(tmp_path / "ok.txt") == b"a\nb\n"
