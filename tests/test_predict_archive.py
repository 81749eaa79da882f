"""`mtaffect predict` over an archive: per-file tables, worker processes, processes sharing one folder,
shards, a killed worker, Ctrl-C, and `collect`: the same tables as one process, every file once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("skimage")  # the public-domain test face

from cli_helpers import run

from mtaffect.predict import demo_media
from mtaffect.predict.archive import plan_units, worker_threads
from mtaffect.predict.claims import RECORDS_DIR
from mtaffect.predict.job import JOB_FILE, partial_dir
from mtaffect.predict.outputs import read_table

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="flock, SIGKILL")]
MTAFFECT = Path(sys.executable).parent / "mtaffect"
DONE_LINE = re.compile(r"^(?P<source>\S+): (?P<frames>\d+) frames, ", re.M)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Four files with faces (a 3 s video, a two-face clip, a short clip, a real photo) and a broken one."""
    root = tmp_path_factory.mktemp("archive") / "interviews"
    root.mkdir()
    demo_media.make_demo_video(root / "long.mp4", seconds=3.0, faces=1)
    demo_media.make_demo_video(root / "two.mp4", seconds=1.0, faces=2)
    demo_media.make_demo_video(root / "short.mp4", seconds=0.6, faces=1)
    from PIL import Image
    from skimage import data

    (root / "stills").mkdir()
    Image.fromarray(data.astronaut()).save(root / "stills" / "astronaut.jpg")
    (root / "broken.mp4").write_bytes(b"not a video at all")
    return root


LONG = "interviews_long_mp4.csv"
TABLES = [LONG, "interviews_two_mp4.csv", "interviews_short_mp4.csv", "interviews_stills_astronaut_jpg.csv"]


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory) -> Path:
    """One process, one file after another."""
    out = tmp_path_factory.mktemp("ref")
    text = run("predict", archive, "-r", "--per-file", "--out", out, "--quiet")
    assert "error: " in text and "broken.mp4" in text  # the broken file fails alone: exit 0
    assert sorted(p.name for p in out.glob("*.csv")) == sorted(TABLES)
    return out


def _done_sources(text: str) -> list[str]:
    return [m["source"] for m in DONE_LINE.finditer(text)]


def _same_tables(a: Path, b: Path) -> None:
    for name in TABLES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _cli(*args) -> list[str]:
    return [str(MTAFFECT), *map(str, args)]


def test_two_workers_write_the_tables_one_process_writes_and_combine_them(archive, reference, tmp_path):
    out = tmp_path / "par"
    text = run("predict", archive, "-r", "--workers", "2", "--out", out, "--combine", "--report", "--quiet")
    threads = worker_threads(2, os.cpu_count())
    assert f"2 worker(s) x {threads} thread(s) on {os.cpu_count()} core(s)" in text
    assert sorted(_done_sources(text)) == sorted(
        str(p) for p in archive.rglob("*") if p.suffix in (".mp4", ".jpg") and p.name != "broken.mp4"
    )
    _same_tables(reference, out)  # byte-identical per-file tables
    records = {p.name: json.loads(p.read_text()) for p in (out / RECORDS_DIR).glob("*.json")}
    assert records["interviews_broken_mp4.csv.json"]["status"] == "failed"
    assert {r["status"] for n, r in records.items() if n in {f"{t}.json" for t in TABLES}} == {"done"}
    combined = read_table(out / "combined.csv")
    parts = [read_table(reference / t) for t in TABLES]
    expected = pd.concat(sorted(parts, key=lambda t: t["file"].iloc[0]), ignore_index=True)
    pd.testing.assert_frame_equal(combined, expected)
    summary = pd.read_csv(out / "combined_summary.csv")
    assert set(summary["file"]) == set(combined["file"])
    index = (out / "report.html").read_text()
    assert all(f'href="{t[:-4]}.html"' in index for t in TABLES) and "broken.mp4" in index
    # a rerun finds everything done: no worker starts, nothing is written again
    mtimes = {t: (out / t).stat().st_mtime_ns for t in TABLES}
    again = run("predict", archive, "-r", "--workers", "2", "--out", out, "--combine", "--quiet")
    assert "4 of 5 file(s) done earlier" in again and _done_sources(again) == []
    assert mtimes == {t: (out / t).stat().st_mtime_ns for t in TABLES}


def test_two_processes_into_one_folder_run_every_file_once(archive, reference, tmp_path):
    out = tmp_path / "shared"
    cmd = _cli("predict", archive, "-r", "--per-file", "--out", out, "--quiet")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    texts = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], texts
    done = [_done_sources(stdout) for stdout, _ in texts]
    assert sorted(done[0] + done[1]) == sorted(set(done[0] + done[1]))  # nothing processed twice
    assert len(done[0] + done[1]) == len(TABLES)  # nothing missed
    _same_tables(reference, out)
    holders = {json.loads((out / RECORDS_DIR / f"{t}.json").read_text())["pid"] for t in TABLES}
    assert holders <= {p.pid for p in procs}


def test_shards_split_the_files_and_the_last_one_combines(archive, reference, tmp_path, monkeypatch):
    monkeypatch.chdir(archive.parent)  # the paths hashed are the ones typed: "interviews/..."
    plan = plan_units(["interviews"], recursive=True)
    n = next(n for n in range(2, 9) if sum(1 for k in range(1, n + 1) if plan.shard(k, n)) >= 2)
    out, done, texts = tmp_path / "sharded", [], []
    for k in range(1, n + 1):
        texts.append(
            run("predict", "interviews", "-r", "--shard", f"{k}/{n}", "--out", out, "--combine", "--quiet")
        )
        done.append(_done_sources(texts[-1]))
        assert (out / "combined.csv").exists() == (k == n)  # the last to finish combines
    assert sum(map(len, done)) == len(TABLES) == len({s for d in done for s in d})  # once each
    assert sum(1 for d in done if d) >= 2 and "combined 4 file(s)" in texts[-1]
    parts = []
    for name in TABLES:  # as one process wrote them (the paths as typed: relative here)
        table = read_table(out / name)
        parts.append(table)
        table = table.assign(file=[str(archive.parent / f) for f in table["file"]])
        pd.testing.assert_frame_equal(table, read_table(reference / name))
    expected = pd.concat(sorted(parts, key=lambda t: t["file"].iloc[0]), ignore_index=True)
    pd.testing.assert_frame_equal(read_table(out / "combined.csv"), expected)


def _wait_for_rows(out: Path, table: str, timeout: float = 120.0) -> dict:
    """The job record of ``table`` once its running job has committed rows (then it is mid-video)."""
    job = partial_dir(out / table) / JOB_FILE
    record = out / RECORDS_DIR / f"{table}.json"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if json.loads(job.read_text())["rows_bytes"] > 0:
                return json.loads(record.read_text())
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"{table} never had committed rows")


def test_a_killed_worker_loses_only_its_file_and_a_rerun_resumes_it(archive, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = _cli("predict", archive, "-r", "--workers", "2", "--out", out, "--quiet")
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = _wait_for_rows(out, LONG)  # longest first: a worker took it at once
    assert record["status"] == "running" and record["pid"] != parent.pid
    os.kill(record["pid"], signal.SIGKILL)
    stdout, stderr = parent.communicate(timeout=300)
    assert parent.returncode == 0, stderr  # the other files went on
    assert "died (signal 9)" in stderr and "long.mp4" in stderr
    assert not (out / LONG).exists() and partial_dir(out / LONG).is_dir()
    assert "long.mp4" not in " ".join(_done_sources(stdout)) and len(_done_sources(stdout)) == 3
    again = run("predict", archive, "-r", "--workers", "2", "--out", out, "--quiet")
    assert "resuming" in again and _done_sources(again) == [str(archive / "long.mp4")]
    resumed, ref = read_table(out / LONG), read_table(reference / LONG)
    assert not resumed.duplicated(["frame", "face_id"]).any()
    pd.testing.assert_frame_equal(resumed, ref, check_exact=False, atol=1e-6)
    for name in TABLES[1:]:  # the files the other worker ran: as one process writes them
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_ctrl_c_stops_every_worker_and_the_next_run_finishes(archive, reference, tmp_path):
    out = tmp_path / "interrupted"
    cmd = _cli("predict", archive, "-r", "--workers", "2", "--out", out, "--quiet")
    parent = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _wait_for_rows(out, LONG)
    os.killpg(parent.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole process group
    t0 = time.monotonic()
    _, stderr = parent.communicate(timeout=120)
    assert parent.returncode == 130, stderr
    assert time.monotonic() - t0 < 15  # the workers stopped at their next chunk, not at the 30 s grace
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert partial_dir(out / LONG).is_dir()
    again = run("predict", archive, "-r", "--workers", "2", "--out", out, "--quiet")
    assert "resuming" in again
    for name in TABLES:
        pd.testing.assert_frame_equal(
            read_table(out / name), read_table(reference / name), check_exact=False, atol=1e-6
        )


def test_per_file_options_are_checked_before_any_work(archive, tmp_path):
    assert "--combine combines" in run("predict", archive, "--combine", "--out", tmp_path / "a", code=2)
    assert "--shard" in run("predict", archive, "--shard", "3/2", "--out", tmp_path / "b", code=2)
    assert "--workers" in run("predict", archive, "--workers", "0", "--out", tmp_path / "c", code=2)
    out = tmp_path / "d"
    out.mkdir()
    (out / "interviews_short_mp4.csv").write_text("my own table\n")
    text = run("predict", archive, "-r", "--per-file", "--out", out, code=2)
    assert "would be replaced" in text and "interviews_short_mp4.csv" in text
    assert (out / "interviews_short_mp4.csv").read_text() == "my own table\n"
    assert "no finished file" in run("collect", out, code=2)


def test_outputs_asked_for_on_a_rerun_are_made_from_the_tables(archive, reference, tmp_path):
    out = tmp_path / "later"
    run("predict", archive, "-r", "--per-file", "--out", out, "--quiet")
    tables = {t: (out / t).stat().st_mtime_ns for t in TABLES}
    (out / "interviews_two_mp4_face0.png").write_bytes(b"my picture")  # a user's file where a timeline goes
    refused = run("predict", archive, "-r", "--per-file", "--plot", "--out", out, "--quiet", code=2)
    assert "interviews_two_mp4_face0.png (not written by a per-file run)" in refused
    assert (out / "interviews_two_mp4_face0.png").read_bytes() == b"my picture"
    (out / "interviews_two_mp4_face0.png").unlink()
    text = run("predict", archive, "-r", "--per-file", "--report", "--combine", "--out", out, "--quiet")
    assert tables == {t: (out / t).stat().st_mtime_ns for t in TABLES}  # not run again
    assert all((out / f"{t[:-4]}.html").is_file() for t in TABLES) and "combined 4 file(s)" in text
    index = (out / "report.html").read_text()
    assert all(f'href="{t[:-4]}.html"' in index for t in TABLES)
    again = run("predict", archive, "-r", "--per-file", "--report", "--out", out, "--quiet")
    assert "4 of 5 file(s) done earlier" in again  # complete now: skipped
    _same_tables(reference, out)


def test_workers_that_cannot_load_the_model_are_one_error(archive, tmp_path):
    from mtaffect.predict.archive import UnitOptions
    from mtaffect.predict.workers import WorkerSpec, run_pool

    plan = plan_units([str(archive)], recursive=True)
    model = {"model": str(tmp_path / "no-such-checkpoint")}
    spec = WorkerSpec(model, plan.units, UnitOptions(tmp_path / "o"))
    with pytest.raises(ValueError, match="no-such-checkpoint"):
        run_pool(spec, [0, 1, 2], workers=2)


def test_a_shard_without_files_succeeds_with_nothing_to_do(archive, tmp_path):
    from mtaffect.predict.archive import plan_units

    plan = plan_units([str(archive)], recursive=True)
    empty = next(k for k in range(1, 41) if not plan.shard(k, 40))
    text = run("predict", archive, "-r", "--shard", f"{empty}/40", "--out", tmp_path / "e", "--quiet")
    assert "0 file(s) to run (shard" in text and "0 file(s) done, 0 failed" in text


def test_a_warning_that_names_no_file_is_said_once_per_run(tmp_path):
    """Frame folders without --fps: the one line that says their times are empty, not one per folder."""
    from PIL import Image

    frames = list(demo_media.frames(2, faces=1, width=160, height=120))
    for name in ("a", "b"):
        (tmp_path / "seqs" / name).mkdir(parents=True)
        for i, img in enumerate(frames):
            Image.fromarray(img).save(tmp_path / "seqs" / name / f"{i + 1:05d}.png")
    out = tmp_path / "o"
    seqs = tmp_path / "seqs"
    text = run("predict", seqs, "-r", "--per-file", "--landmarks", "none", "--out", out, "--quiet")
    assert text.count("no frame rate") == 1, text
    assert sorted(p.name for p in out.glob("*.csv")) == ["seqs_a.csv", "seqs_b.csv"]
