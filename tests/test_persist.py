"""The persistence layer: one header, one ownership rule, one folder swap and one lock (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtaffect import __version__
from mtaffect.io import OutputExistsError
from mtaffect.persist import (
    CHECKPOINT,
    EXPORT,
    FEATURE_STORE,
    FORMATS,
    Format,
    FormatError,
    Lock,
    LockBusy,
    NotOursError,
    atomic_folder,
    check_header,
    check_replaceable,
    header,
    read_header_file,
    remove_ours,
    write_json,
)

TOY = Format("mtaffect-toy", 2, "toy folder", "toy.json", ("toy.json", "*.npy"))


def _ours(path: Path, *extra: str) -> Path:
    path.mkdir(parents=True)
    write_json(path / "toy.json", header(TOY, note="old"))
    (path / "a.npy").write_bytes(b"old")
    for name in extra:
        (path / name).write_text("a user's file")
    return path


def _users(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "toy.json").write_text("notes, not a header")  # the marker's name, but not ours
    (path / "thesis.tex").write_text("years of work")
    return path


# ---- the header ---------------------------------------------------------------------------------------
def test_every_format_reads_back_what_was_written(tmp_path):
    for fmt in FORMATS.values():
        fields = {"n": 3, "x": 0.25, "names": ["a", "é"], "nested": {"k": None}}
        written = write_json(tmp_path / f"{fmt.name}.json", header(fmt, **fields))
        got = read_header_file(written, fmt)
        assert got == {
            "format": fmt.name,
            "format_version": fmt.version,
            "mtaffect_version": __version__,
            **fields,
        }
        assert list(got)[:3] == ["format", "format_version", "mtaffect_version"]  # the header first


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {"format": "mtaffect-toy", "format_version": 3},
            r"toy folder format version 3 is newer than this "
            r"mtaffect \(reads up to 2\); upgrade mtaffect",
        ),
        (
            {"format": "mtaffect-other", "format_version": 1},
            r"not an mtaffect toy folder \(format "
            r"'mtaffect-other', expected 'mtaffect-toy'\)",
        ),
        ({"format": "mtaffect-toy", "format_version": True}, "format_version must be a positive integer"),
        ({"format": "mtaffect-toy", "format_version": "1"}, "format_version must be a positive integer"),
        ({"format": "mtaffect-toy", "format_version": 0}, "format_version must be a positive integer"),
        ({"format": "mtaffect-toy"}, "format_version must be a positive integer, got None"),
        ([1, 2], r"not an mtaffect toy folder \(not a JSON object\)"),
    ],
)
def test_a_header_names_the_file_and_what_is_wrong(obj, message):
    with pytest.raises(FormatError, match=rf"^where\.json: {message}"):
        check_header(obj, TOY, "where.json")


def test_files_written_before_the_one_header_still_read():
    assert check_header({"format": "mtaffect-toy", "version": 1}, TOY, "old.json") == 1  # "version"


def test_write_json_is_atomic_and_refuses_a_users_file_unless_asked(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("mine")
    with pytest.raises(OutputExistsError):
        write_json(target, {"a": 1}, overwrite=False)
    assert target.read_text() == "mine"
    write_json(target, {"a": np.float32(0.5), "n": np.int64(2), "p": tmp_path, "v": np.arange(2)})
    assert json.loads(target.read_text()) == {"a": 0.5, "n": 2, "p": str(tmp_path), "v": [0, 1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left


# ---- the ownership rule -------------------------------------------------------------------------------
def test_only_a_folder_of_ours_is_replaced_and_only_when_asked(tmp_path):
    assert check_replaceable(tmp_path / "new", TOY, overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_replaceable(tmp_path / "empty", TOY, overwrite=False) == tmp_path / "empty"
    ours = _ours(tmp_path / "ours")
    with pytest.raises(OutputExistsError, match=r"is already a toy folder; pass overwrite=True"):
        check_replaceable(ours, TOY, overwrite=False)
    assert check_replaceable(ours, TOY, overwrite=True) == ours
    users = _users(tmp_path / "users")
    for overwrite in (False, True):
        with pytest.raises(
            NotOursError,
            match=r"users is not a toy folder written by mtaffect \(it holds "
            r"thesis.tex, toy.json\); refusing .* even with --overwrite",
        ):
            check_replaceable(users, TOY, overwrite=overwrite)
    added = _ours(tmp_path / "added", "notes.txt")
    with pytest.raises(NotOursError, match=r"is a toy folder but also holds notes.txt, which mtaffect"):
        check_replaceable(added, TOY, overwrite=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(NotOursError, match="exists and is not a folder"):
        check_replaceable(tmp_path / "file", TOY, overwrite=True)


def test_atomic_folder_replaces_ours_whole_and_never_anything_else(tmp_path):
    ours = _ours(tmp_path / "ours")
    with atomic_folder(ours, TOY, overwrite=True) as tmp:
        write_json(tmp / "toy.json", header(TOY, note="new"))
    assert sorted(p.name for p in ours.iterdir()) == ["toy.json"]  # the old a.npy went with the old folder
    assert read_header_file(ours / "toy.json", TOY)["note"] == "new"
    users = _users(tmp_path / "users")
    with pytest.raises(NotOursError), atomic_folder(users, TOY, overwrite=True):
        pytest.fail("checked before any work")
    assert (users / "thesis.tex").read_text() == "years of work"
    with pytest.raises(RuntimeError), atomic_folder(ours, TOY, overwrite=True) as tmp:
        (tmp / "half.npy").write_bytes(b"")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in ours.iterdir()) == ["toy.json"]  # the old one stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "users"]  # nothing hidden left


def test_a_user_who_acts_during_the_work_is_not_overruled(tmp_path):
    ours = _ours(tmp_path / "ours")
    with pytest.raises(NotOursError), atomic_folder(ours, TOY, overwrite=True) as tmp:
        (tmp / "toy.json").write_text("{}")
        (ours / "notes.txt").write_text("written while the work ran")
    assert (ours / "notes.txt").exists()


def test_a_link_to_a_folder_of_ours_is_followed_and_stays_a_link(tmp_path):
    ours = _ours(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(ours)
    with atomic_folder(link, TOY, overwrite=True) as tmp:
        write_json(tmp / "toy.json", header(TOY, note="new"))
    assert link.is_symlink() and link.resolve() == ours.resolve()
    assert read_header_file(link / "toy.json", TOY)["note"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(NotOursError, match=r"is a symbolic link to .*gone, which does not exist"):
        check_replaceable(dangling, TOY, overwrite=True)


def test_remove_ours_deletes_only_ours_and_never_follows_a_link(tmp_path):
    ours, users = _ours(tmp_path / "ours"), _users(tmp_path / "users")
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert remove_ours(link, TOY) and ours.is_dir()  # the link went, not what it points to
    with pytest.raises(NotOursError):
        remove_ours(users, TOY)
    assert (users / "thesis.tex").exists()
    assert remove_ours(ours, TOY) and not ours.exists()
    assert not remove_ours(tmp_path / "missing", TOY)


def test_the_formats_name_what_their_folders_hold():
    assert FEATURE_STORE.marker == "meta.json" and CHECKPOINT.marker == "config.json"
    assert EXPORT.marker == "export.json"
    assert len({f.name for f in FORMATS.values()}) == len(FORMATS)


# ---- the lock -----------------------------------------------------------------------------------------
def test_the_lock_is_exclusive_and_shared_locks_share(tmp_path):
    path = tmp_path / "job.lock"
    with Lock.acquire(path) as held:
        assert held.supported
        with pytest.raises(LockBusy):
            Lock.acquire(path, wait=0.1)
        assert Lock.try_acquire(path) is None
    with Lock.acquire(tmp_path, shared=True), Lock.acquire(tmp_path, shared=True):  # a folder, shared
        assert Lock.try_acquire(tmp_path) is None
    assert Lock.try_acquire(path) is not None


def test_a_killed_atomic_write_of_ours_leaves_the_folder_ours(tmp_path):
    """A crash while rewriting a marker leaves ``.<name>.<8 chars>.part``: still ours, never foreign."""
    ours = _ours(tmp_path / "ours", ".toy.json.abcd1234.part", ".a.npy.x_y9z0k1.part")
    assert check_replaceable(ours, TOY, overwrite=True) == ours
    mine = _ours(tmp_path / "mine", ".notes.txt.abcd1234.part")  # of a name the format never writes
    with pytest.raises(NotOursError, match=r"also holds .notes.txt.abcd1234.part"):
        check_replaceable(mine, TOY, overwrite=True)
