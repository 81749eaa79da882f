"""Long `predict` jobs: rows written as produced, a killed run resumed, the table atomic; the output
folder checked, locked and cleared of what killed runs left (and nothing else)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("skimage")  # the public-domain test face

from mtaffect.cli import app
from mtaffect.predict import demo_media
from mtaffect.predict.job import JOB_FILE, ROWS_FILE, OutputFolder, partial_dir, predict_to_file
from mtaffect.predict.outputs import read_table
from mtaffect.predict.pipeline import Predictor

SETTINGS = {"detect_every": 3, "chunk_frames": 4}  # O-Net tracking between detections: state to resume


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return demo_media.make_demo_video(tmp_path_factory.mktemp("job") / "two.mp4", seconds=0.8, faces=2)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(**SETTINGS)


@pytest.fixture(scope="module")
def reference(clip, predictor, tmp_path_factory) -> pd.DataFrame:
    path = tmp_path_factory.mktemp("ref") / "two.csv"
    predict_to_file(predictor, clip, path)
    return read_table(path)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import mtaffect.predict.job as job
    from mtaffect.predict.pipeline import Predictor

    torch.set_num_threads(int(sys.argv[4]))  # as the parent: the same numbers, to the last bit
    job.COMMIT_SECONDS = 0.0  # commit every chunk, so where the kill lands is known
    seen = 0

    def progress(n):
        global seen
        seen += n
        if seen >= int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)

    predictor = Predictor(detect_every=3, chunk_frames=4)
    job.predict_to_file(predictor, sys.argv[1], sys.argv[2], progress=progress)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_job_resumes_after_the_last_completed_frame(clip, predictor, reference, tmp_path):
    target = tmp_path / "two.csv"
    import torch

    threads = str(torch.get_num_threads())
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(clip), str(target), "13", threads], capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not target.exists()  # no half table, ever
    part = partial_dir(target)
    state = json.loads((part / JOB_FILE).read_text())
    after = state["current"]["resume"]["after"]
    rows = pd.read_csv(part / ROWS_FILE)
    assert after == 11 and rows["frame"].max() == after  # killed in chunk 4 (frames 12-15): 0-11 written
    pd.testing.assert_frame_equal(
        read_table(part / ROWS_FILE).drop(columns="_input"),
        reference[reference.frame <= after],
        check_exact=False,
        atol=1e-6,
    )
    (part / f".{JOB_FILE}.abcd1234.part").write_text("{")  # a kill during a commit leaves this too
    analysed, notes = [], []
    predict_to_file(predictor, clip, target, progress=analysed.append, log=notes.append)
    assert sum(analysed) == 20 - (after + 1)  # only the frames after the last completed one
    assert any("resuming" in n and "after frame 11" in n for n in notes)
    pd.testing.assert_frame_equal(read_table(target), reference, check_exact=False, atol=1e-6)
    assert not part.exists()


def test_interrupted_list_of_inputs_resumes_and_changed_settings_start_again(clip, predictor, tmp_path):
    stills = tmp_path / "stills"
    stills.mkdir()
    from PIL import Image

    for k, frame in enumerate(demo_media.frames(2, faces=1, width=320, height=240)):
        Image.fromarray(frame).save(stills / f"s{k}.png")
    inputs = [stills, clip]
    target = tmp_path / "all.parquet"
    seen = []

    def interrupt(n: int) -> None:
        seen.append(n)
        if sum(seen) > 8:  # the two stills done, the video part-way
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_to_file(predictor, inputs, target, progress=interrupt)
    state = json.loads((partial_dir(target) / JOB_FILE).read_text())
    assert sorted(state["done"]) == ["0", "1"] and state["current"]["index"] == 2
    done, notes = [], []
    predict_to_file(predictor, inputs, target, progress=done.append, log=notes.append)
    assert sum(done) == 20 - (state["current"]["resume"]["after"] + 1)
    table = read_table(target)
    assert [Path(f).name for f in table["file"].unique()] == ["s0.png", "s1.png", "two.mp4"]
    assert table[table.file == str(clip)]["frame"].nunique() == 20

    with pytest.raises(KeyboardInterrupt):  # again, then rerun with other settings: no mixing
        predict_to_file(predictor, inputs, tmp_path / "b.csv", progress=interrupt)
    other = Predictor(every=2)
    predict_to_file(other, inputs, tmp_path / "b.csv", log=notes.append)
    assert any("discarding" in n for n in notes)
    b = read_table(tmp_path / "b.csv")
    assert b[b.file == str(clip)]["frame"].tolist()[::2] == list(range(0, 20, 2))


def test_a_folder_of_the_partial_name_that_is_not_ours_is_left_alone(clip, predictor, tmp_path):
    target = tmp_path / "two.csv"
    mine = partial_dir(target)
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="not an mtaffect partial"):
        predict_to_file(predictor, clip, target)
    assert (mine / "notes.txt").read_text() == "a user's file"


def test_output_folder_removes_only_the_temporary_files_of_killed_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".two.csv.k3j_x9a2.part", out / ".report.html.abcdefgh.part"]
    stale.append(out / ".t_face1.png.a1b2c3d4.part")
    kept = [
        out / ".notes.part",  # not a temporary-file name of ours
        out / "two.csv.k3j_x9a2.part",  # not hidden
        out / ".data.txt.abcdefgh.part",  # not a kind of file predict writes
        out / ".two.csv.TOOLONG12.part",
    ]
    for p in stale + kept:
        p.write_text("x")
    (out / ".dir.csv.abcdefgh.part").mkdir()  # a folder: never
    notes = []
    with OutputFolder(out, log=notes.append) as folder:
        assert sorted(folder.removed) == sorted(stale)
        with pytest.raises(ValueError, match="another mtaffect predict is writing"), OutputFolder(out):
            pass
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert (out / ".dir.csv.abcdefgh.part").is_dir() and "removed 3" in notes[0]
    with OutputFolder(out):  # released on exit
        pass


def test_cli_keeps_a_resumable_partial_when_interrupted(clip, tmp_path, monkeypatch):
    import mtaffect.predict.job as job

    real = job._run_input

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "_run_input", interrupted)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(clip), "--out", str(out), "--quiet"])
    assert res.exit_code == 130 and "rerun the same command to resume" in res.output
    assert (partial_dir(out / "two.csv") / JOB_FILE).is_file() and not (out / "two.csv").exists()
    monkeypatch.setattr(job, "_run_input", real)
    res = CliRunner().invoke(app, ["predict", str(clip), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert read_table(out / "two.csv")["frame"].nunique() == 20 and not partial_dir(out / "two.csv").exists()
    assert os.listdir(out) == ["two.csv"]


def test_ctrl_c_ends_a_live_stream_and_keeps_its_rows(predictor, tmp_path):
    from mtaffect.predict.sources import StreamInput

    live = StreamInput("testsrc=size=96x64:rate=25", "lavfi", "camera")  # endless, like a camera
    seen = []

    def ctrl_c(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 12:
            raise KeyboardInterrupt

    (res,) = predict_to_file(predictor, live, tmp_path / "cam.csv", progress=ctrl_c)
    table = read_table(tmp_path / "cam.csv")
    assert res.ok and res.info.kind == "stream" and res.info.ended_early is None
    assert table["frame"].tolist() == list(range(8))  # the chunks handed out before Ctrl-C
    assert (table["ended_early"] == 0).all() and not partial_dir(tmp_path / "cam.csv").exists()
