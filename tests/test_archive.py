"""Per-file planning (names, shards, order, threads), per-file claims and collect: no model needed."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtaffect.predict import claims
from mtaffect.predict.archive import (
    RESERVED_STEMS,
    Unit,
    expected_frames,
    longest_first,
    model_identity,
    parse_shard,
    plan_units,
    shard_index,
    worker_threads,
)
from mtaffect.predict.claims import Claim, JobRecords, Skip
from mtaffect.predict.collect import collect, render_index
from mtaffect.predict.outputs import empty_table, write_table
from mtaffect.predict.sources import FrameSequence


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def archive(tmp_path) -> Path:
    root = tmp_path / "interviews"
    for rel in ("s1.mp4", "s1.avi", "a/clip.mp4", "b/clip.mp4", "b/photo.jpg", "seq/1.jpg", "seq/2.jpg"):
        _touch(root / rel)
    return root


def test_plan_gives_every_file_a_stable_unique_stem(archive, tmp_path):
    plan = plan_units([str(archive)], recursive=True)
    stems = {Path(u.source).relative_to(archive).as_posix(): u.stem for u in plan.units}
    assert stems == {
        "s1.avi": "interviews_s1_avi",  # the path inside the folder, extension included
        "s1.mp4": "interviews_s1_mp4",
        "a/clip.mp4": "interviews_a_clip_mp4",
        "b/clip.mp4": "interviews_b_clip_mp4",
        "b/photo.jpg": "interviews_b_photo_jpg",
        "seq": "interviews_seq",  # numbered frames: one sequence, named by its folder
    }
    assert isinstance(next(u.item for u in plan.units if u.stem == "interviews_seq"), FrameSequence)
    # the same command gives the same plan (every shard and every machine computes it alike)
    assert plan_units([str(archive)], recursive=True) == plan
    # files added later never rename the others (their tables stay theirs)
    _touch(archive / "a" / "clip.avi")  # same stem, same folder
    _touch(archive / "c" / "clip.mp4")  # same name, another folder
    grown = {u.source: u.stem for u in plan_units([str(archive)], recursive=True).units}
    assert all(grown[u.source] == u.stem for u in plan.units)
    assert grown[str(archive / "a" / "clip.avi")] == "interviews_a_clip_avi"


def test_a_file_named_twice_is_planned_once_and_stems_differ_without_case(tmp_path):
    clip = _touch(tmp_path / "arch" / "a" / "clip.mp4")
    again = tmp_path / "arch" / "a" / ".." / "a" / "clip.mp4"
    plan = plan_units([str(tmp_path / "arch"), str(clip), str(again)], recursive=True)
    assert [u.source for u in plan.units] == [str(clip)] and plan.repeated == 2
    upper, lower = _touch(tmp_path / "x" / "Clip.mp4"), _touch(tmp_path / "y" / "clip.mp4")
    stems = [u.stem for u in plan_units([str(upper), str(lower)]).units]
    assert stems == ["Clip", "clip-2"]  # Clip.csv is clip.csv on a case-insensitive file system


def test_a_folder_of_one_file_still_prefixes_and_names_never_collide_or_take_combined_names(tmp_path):
    _touch(tmp_path / "one" / "talk.mp4")
    lone = _touch(tmp_path / "combined.jpg")
    other = _touch(tmp_path / "x" / "one_talk_mp4.mp4")
    plan = plan_units([str(tmp_path / "one"), str(lone), str(other)])
    assert [u.stem for u in plan.units] == ["one_talk_mp4", "combined-2", "one_talk_mp4-2"]
    assert not RESERVED_STEMS & {u.stem for u in plan.units}


def test_plan_refuses_streams_and_reports_an_empty_folder_alone(tmp_path):
    with pytest.raises(ValueError, match="runs files"):
        plan_units(["rtsp://127.0.0.1/cam"])
    (tmp_path / "empty").mkdir()
    clip = _touch(tmp_path / "c.mp4")
    plan = plan_units([str(tmp_path / "empty"), str(clip)])
    assert [u.source for u in plan.units] == [str(clip)]
    assert len(plan.errors) == 1 and "no images or videos" in plan.errors[0]


def test_shards_split_the_files_disjointly_and_stably(tmp_path):
    files = [str(_touch(tmp_path / f"v{i:03d}.mp4")) for i in range(60)]
    plan = plan_units(files)
    shards = [plan.shard(k, 4) for k in range(1, 5)]
    got = [u.source for s in shards for u in s]
    assert sorted(got) == sorted(files) and len(got) == len(set(got))  # every file exactly once
    assert min(len(s) for s in shards) >= 6  # a hash, not "all in shard 1"
    # the split is a property of the path text (SHA-256), fixed across Python versions and machines
    assert [shard_index(f"v{i}.mp4", 3) for i in range(6)] == [
        int.from_bytes(hashlib.sha256(f"v{i}.mp4".encode()).digest()[:8], "big") % 3 for i in range(6)
    ]


@pytest.mark.parametrize("text", ["0/4", "5/4", "1", "a/b", "1/0", "2/4/1"])
def test_bad_shards_are_refused(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def test_parse_shard_reads_k_of_n():
    assert parse_shard("3/8") == (3, 8)


def test_longest_files_run_first_and_ties_keep_the_plan_order():
    assert longest_first(["a", "b", "c", "d"], [10, 500, 10, 0]) == [1, 0, 2, 3]


@pytest.mark.parametrize(
    ("workers", "cores", "threads"),
    [(1, 2, 1), (2, 2, 1), (1, 16, 15), (4, 16, 3), (8, 16, 1), (16, 16, 1), (32, 16, 1), (1, 1, 1)],
)
def test_workers_times_threads_fit_the_cores(workers, cores, threads):
    assert worker_threads(workers, cores) == threads
    assert workers * threads <= max(cores, workers)


def test_expected_frames_of_stills_sequences_and_unreadable_videos(tmp_path):
    seq = FrameSequence(tmp_path, tuple(tmp_path / f"{i}.jpg" for i in range(7)), tuple(range(7)))
    assert expected_frames(Unit(seq, "s", "x"), every=2) == 4
    assert expected_frames(Unit(tmp_path / "a.jpg", "a", "x")) == 1
    assert expected_frames(Unit(_touch(tmp_path / "bad.mp4"), "b", "x")) == 0  # scheduled last, fails later


def test_a_retrained_checkpoint_is_another_model(tmp_path):
    assert model_identity(None) == model_identity("default") == {"model": "default"}
    assert model_identity("emotiefflib:enet_b0_8_va_mtl") == {"model": "emotiefflib:enet_b0_8_va_mtl"}
    run = tmp_path / "best"
    _touch(run / "model.safetensors")
    _touch(run / "config.json")
    before = model_identity(run)
    assert [f[0] for f in before["files"]] == ["config.json", "model.safetensors"]
    (run / "model.safetensors").write_bytes(b"retrained")  # same config, new weights
    assert model_identity(run) != before


# ---- claims ---------------------------------------------------------------------------------------------

SIG = {"settings": {"every": 1}, "input": {"path": "v.mp4", "size": 3}}


def test_a_held_file_is_skipped_and_a_killed_holders_file_is_taken_over(tmp_path):
    records = JobRecords(tmp_path)
    first = records.claim("v.csv", SIG, time.time(), "v.mp4")
    assert isinstance(first, Claim) and first.record["status"] == "running"
    assert first.record["host"] == claims.HOST and first.record["pid"] == os.getpid()
    second = records.claim("v.csv", SIG, time.time(), "v.mp4")  # its own lock: as another process
    assert isinstance(second, Skip) and second.why == "running" and records.is_running("v.csv")
    first.release()  # as the kernel does when a process dies: the record still says "running"
    assert records.read("v.csv")["status"] == "running" and not records.is_running("v.csv")
    taken = records.claim("v.csv", SIG, time.time(), "v.mp4")
    assert isinstance(taken, Claim) and taken.previous["status"] == "running"
    taken.release()


def test_done_files_are_skipped_failed_ones_retried_only_by_a_later_run(tmp_path):
    records = JobRecords(tmp_path)
    started = time.time()
    c = records.claim("v.csv", SIG, started, "v.mp4")
    c.finish("done", frames=10)
    c.release()
    assert not (tmp_path / "v.csv").exists()  # done, but its table is gone: run again
    again = records.claim("v.csv", SIG, started, "v.mp4")
    assert isinstance(again, Claim)
    write_table(empty_table(), tmp_path / "v.csv")
    again.finish("done")
    again.release()
    skip = records.claim("v.csv", SIG, started, "v.mp4")
    assert isinstance(skip, Skip) and skip.why == "done"
    other = {**SIG, "fps": 30}
    refused = records.claim("v.csv", other, started, "v.mp4")  # another run's table: left alone
    assert isinstance(refused, Skip) and refused.why == "settings"
    assert records.read("v.csv")["status"] == "done" and records.read("v.csv")["signature"] == SIG
    changed = records.claim("v.csv", other, started, "v.mp4", replace=True)  # --overwrite: run again
    assert isinstance(changed, Claim)
    changed.finish("failed", error="broken")
    changed.release()
    same_run = records.claim("v.csv", other, started, "v.mp4")
    assert isinstance(same_run, Skip) and same_run.why == "failed"  # once a run
    later = records.claim("v.csv", other, time.time() + 1, "v.mp4")
    assert isinstance(later, Claim)  # a rerun tries a failed file again
    later.release()


def test_a_running_record_of_another_host_is_trusted_while_its_heartbeat_is_fresh(tmp_path):
    records = JobRecords(tmp_path, stale_after=60)
    c = records.claim("v.csv", SIG, time.time(), "v.mp4")
    c.release()
    path = records.record_path("v.csv")
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "host": "node-17", "heartbeat": time.time()}))
    busy = records.claim("v.csv", SIG, time.time(), "v.mp4")
    assert isinstance(busy, Skip) and busy.why == "running"  # its lock may not reach us: trust the beat
    path.write_text(json.dumps({**rec, "host": "node-17", "heartbeat": time.time() - 61}))
    assert isinstance(records.claim("v.csv", SIG, time.time(), "v.mp4"), Claim)  # silent: taken over


def test_a_damaged_or_foreign_record_is_not_trusted(tmp_path):
    records = JobRecords(tmp_path)
    records.folder.mkdir()
    records.record_path("v.csv").write_text("{not json")
    c = records.claim("v.csv", SIG, time.time(), "v.mp4")
    assert isinstance(c, Claim) and c.previous is None
    c.release()
    with pytest.raises(ValueError):
        c.finish("maybe")


# ---- collect --------------------------------------------------------------------------------------------


def _table(file: str, n: int) -> pd.DataFrame:
    t = empty_table().reindex(range(n))
    t["file"], t["frame"], t["face_id"], t["success"] = file, np.arange(n), 0, 1
    t["valence"], t["arousal"], t["expression"] = 0.5, -0.25, "Happiness"
    return t


def _finished(out: Path, table: str, source: str, n: int, status: str = "done") -> None:
    records = JobRecords(out)
    c = records.claim(table, SIG, time.time(), source)
    if status == "done":
        write_table(_table(source, n), out / table)
        c.finish("done", frames=n, faces=1, report=None)
    elif status == "failed":
        c.finish("failed", error=f"{source}: not a readable video")
    c.release()


def test_collect_combines_done_files_in_source_order_and_lists_the_rest(tmp_path):
    _finished(tmp_path, "b.csv", "arch/b.mp4", 3)
    _finished(tmp_path, "a.csv", "arch/a.mp4", 2)
    _finished(tmp_path, "bad.csv", "arch/bad.mp4", 0, "failed")
    _finished(tmp_path, "killed.csv", "arch/killed.mp4", 0, "running")  # lock released: a killed run
    found = collect(tmp_path, report=True)
    assert found.done == ["a.csv", "b.csv"] and found.rows == 5
    assert list(found.failed) == ["bad.csv"] and found.unfinished == ["killed.csv"]
    combined = pd.read_csv(tmp_path / "combined.csv")
    assert combined["file"].tolist() == ["arch/a.mp4"] * 2 + ["arch/b.mp4"] * 3
    summary = pd.read_csv(tmp_path / "combined_summary.csv")
    assert summary[["file", "frames"]].values.tolist() == [["arch/a.mp4", 2], ["arch/b.mp4", 3]]
    page = (tmp_path / "report.html").read_text()
    assert "not a readable video" in page and "a.mp4" in page and page.count("<tr>") == 5
    assert found.settings == 1 and found.superseded == []
    rec = JobRecords(tmp_path).read("b.csv")  # a hostile record may not put a URL in the index
    JobRecords(tmp_path).record_path("b.csv").write_text(json.dumps({**rec, "report": "javascript:alert(1)"}))
    assert "javascript" not in render_index([JobRecords(tmp_path).read("b.csv")], [_table("b", 1)], {})
    assert collect(tmp_path).rows == 5  # its own outputs are replaced on the next collect


def test_collect_takes_a_file_once_and_says_when_settings_differ(tmp_path):
    _finished(tmp_path, "old_name.csv", "arch/a.mp4", 2)
    time.sleep(0.01)
    _finished(tmp_path, "a.parquet", "arch/a.mp4", 3)  # the same file again, later, as Parquet
    records = JobRecords(tmp_path)
    c = records.claim("b.csv", {**SIG, "fps": 12}, time.time(), "arch/b.mp4")
    write_table(_table("arch/b.mp4", 1), tmp_path / "b.csv")
    c.finish("done")
    c.release()
    found = collect(tmp_path)
    assert found.done == ["a.parquet", "b.csv"] and found.superseded == ["old_name.csv"] and found.rows == 4
    assert found.settings == 2


def test_collect_never_replaces_a_users_file_and_needs_a_finished_file(tmp_path):
    with pytest.raises(ValueError, match="no finished file"):
        collect(tmp_path)
    _finished(tmp_path, "a.csv", "arch/a.mp4", 2)
    (tmp_path / "combined.csv").write_text("my notes\n")
    with pytest.raises(FileExistsError, match="no collect wrote it"):
        collect(tmp_path)
    assert (tmp_path / "combined.csv").read_text() == "my notes\n"
    assert collect(tmp_path, overwrite=True).rows == 2


class _Settings:
    """What run_unit asks of a predictor before it runs anything."""

    post = None
    smoothing, smoothing_seconds = "none", 0.2

    def settings(self) -> dict:
        return {"every": 1}


def test_a_file_that_breaks_the_pipeline_fails_alone_with_its_record(tmp_path, monkeypatch):
    from mtaffect.predict import archive

    def broken(*_a, **_k):
        raise RuntimeError("decoder crashed on frame 7")

    monkeypatch.setattr(archive, "predict_to_file", broken)
    unit = Unit(_touch(tmp_path / "v.mp4"), "v", "x")
    opts = archive.UnitOptions(tmp_path / "out")
    outcome = archive.run_unit(_Settings(), unit, opts)
    assert outcome.status == "failed" and "RuntimeError: decoder crashed on frame 7" in outcome.error
    records = JobRecords(opts.out)
    assert records.read("v.csv")["status"] == "failed" and not records.is_running("v.csv")
    again = archive.run_unit(_Settings(), unit, opts)  # another process of the same run: not again
    assert again.status == "skipped" and again.why == "failed"


def _opts(tmp_path, **kw):
    from mtaffect.predict.archive import UnitOptions

    return UnitOptions(tmp_path / "out", **kw)


def _signature(unit, opts):
    from mtaffect.predict.archive import unit_signature

    return unit_signature(_Settings(), unit, opts)


def test_a_run_joining_mid_extras_or_after_an_interruption_owns_that_runs_files(tmp_path):
    from mtaffect.predict.archive import check_in_the_way

    unit = Unit(_touch(tmp_path / "v.mp4"), "v", "x")
    opts = _opts(tmp_path, plot=True)
    opts.out.mkdir()
    claim = JobRecords(opts.out).claim("v.csv", _signature(unit, opts), time.time(), unit.source)
    write_table(empty_table(), opts.out / "v.csv")
    (opts.out / "v_face0.png").write_bytes(b"png")  # written by the running claim, not yet recorded
    check_in_the_way(_Settings(), [unit], opts)  # another process of the same command: not in the way
    claim.release()  # interrupted there
    check_in_the_way(_Settings(), [unit], opts)  # the rerun: still its own
    other = _opts(tmp_path, plot=True, fps=12.0)  # other settings: the table and picture are in the way
    with pytest.raises(FileExistsError, match=r"v\.csv \(made with other settings.*v_face0\.png"):
        check_in_the_way(_Settings(), [unit], other)


def test_a_failed_overwrite_never_makes_another_runs_table_ours(tmp_path, monkeypatch):
    from mtaffect.predict import archive

    unit = Unit(_touch(tmp_path / "v.mp4"), "v", "x")
    first = _opts(tmp_path)
    first.out.mkdir()
    c = JobRecords(first.out).claim("v.csv", _signature(unit, first), time.time(), unit.source)
    write_table(empty_table(), first.out / "v.csv")
    c.finish("done", outputs=["v.csv"])
    c.release()

    def broken(*_a, **kw):
        assert kw["identity"] == second.model  # the model's files name the partial rows too
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive, "predict_to_file", broken)
    second = _opts(tmp_path, fps=12.0, overwrite=True)
    assert archive.run_unit(_Settings(), unit, second).status == "failed"
    assert "v.csv" not in JobRecords(first.out).read("v.csv")["outputs"]
    with pytest.raises(FileExistsError, match="made with other settings"):
        archive.check_in_the_way(_Settings(), [unit], _opts(tmp_path, fps=5.0))


def test_extras_that_fail_on_a_rerun_leave_the_file_done(tmp_path, monkeypatch):
    from mtaffect.predict import archive

    unit = Unit(_touch(tmp_path / "v.mp4"), "v", "x")
    opts = _opts(tmp_path)
    opts.out.mkdir()
    c = JobRecords(opts.out).claim("v.csv", _signature(unit, opts), time.time(), unit.source)
    write_table(_table(unit.source, 3), opts.out / "v.csv")
    c.finish("done", frames=3, outputs=["v.csv"], extras={"plot": False, "video": False, "report": False})
    c.release()
    with_report = _opts(tmp_path, report=True, plot=True)
    assert archive.file_state(_Settings(), unit, with_report) == "extras"

    def full_disk(*_a, **_k):
        (opts.out / "v_face0.png").write_bytes(b"png")  # one timeline written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive, "write_extras", full_disk)
    outcome = archive.run_unit(_Settings(), unit, with_report)
    assert outcome.status == "failed" and "its table is done" in outcome.error
    rec = JobRecords(opts.out).read("v.csv")
    assert rec["status"] == "done" and rec["frames"] == 3 and "No space" in rec["extras_error"]
    assert "v_face0.png" in rec["outputs"]  # what it wrote is its own: the next run may replace it
    archive.check_in_the_way(_Settings(), [unit], with_report)
    assert collect(opts.out).done == ["v.csv"]  # still combined


def test_a_stem_taken_by_another_file_is_an_error_not_a_skip(tmp_path):
    from mtaffect.predict import archive

    mine, theirs = Unit(_touch(tmp_path / "a" / "v.mp4"), "v", "x"), _touch(tmp_path / "b" / "v.mp4")
    opts = _opts(tmp_path)
    held = JobRecords(opts.out).claim("v.csv", SIG, time.time(), str(theirs))
    outcome = archive.run_unit(_Settings(), mine, opts)
    held.release()
    assert outcome.status == "failed" and f"taken by {theirs}" in outcome.error


def test_a_hand_edited_record_does_not_keep_its_lock(tmp_path):
    records = JobRecords(tmp_path)
    c = records.claim("v.csv", SIG, time.time(), "v.mp4")
    c.finish("failed", error="x")
    c.release()
    rec = json.loads(records.record_path("v.csv").read_text())
    records.record_path("v.csv").write_text(json.dumps({**rec, "finished": "yesterday"}))
    again = records.claim("v.csv", SIG, time.time(), "v.mp4")
    assert isinstance(again, Claim) and again.previous is None  # not trusted
    again.release()
    assert not records.is_running("v.csv")


def test_the_heartbeat_thread_refreshes_a_running_record_and_stops_at_release(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    records = JobRecords(tmp_path)
    c = records.claim("v.csv", SIG, time.time(), "v.mp4")
    first = records.read("v.csv")["heartbeat"]
    time.sleep(0.3)
    assert records.read("v.csv")["heartbeat"] > first
    c.release()
    last = records.read("v.csv")["heartbeat"]
    time.sleep(0.2)
    assert records.read("v.csv")["heartbeat"] == last  # nothing written after release
