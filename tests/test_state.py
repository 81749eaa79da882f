"""Resumable runs: per-epoch state (safetensors + JSON, never a pickle), exact resume after SIGKILL,
and resume refusing other inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_helpers import child_env
from safetensors.torch import load_file
from test_train import cfg, dataset, make_labels, make_store, video_names  # noqa: F401  (fixture)

from mtaffect.train.fit import fit

TESTS = Path(__file__).resolve().parent

ENTRY = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import lightning as L
import pandas as pd
import test_train as T
from mtaffect.data.annotations import LabelTable
from mtaffect.train.fit import fit

class Slow(L.Callback):  # gives the parent time to kill the run between two epochs
    def on_train_epoch_end(self, trainer, module):
        time.sleep(0.4)

train = LabelTable(pd.read_parquet({train!r}))
val = LabelTable(pd.read_parquet({val!r}))
c = T.cfg("tiny-two-stage", trainer={{"epochs": 4}})
fit(c, {store!r}, train, val, {out!r}, callbacks=[Slow()], log=None)
"""


def _state(out: Path) -> dict | None:
    try:
        return json.loads((out / "state" / "state.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_run_killed_mid_stage_resumes_to_bit_identical_weights(dataset, tmp_path):  # noqa: F811
    """Item 2: SIGKILL inside a stage; --resume continues from the last epoch and ends bit-identical."""
    store, train, val = dataset
    c = cfg("tiny-two-stage", trainer={"epochs": 4})
    whole = fit(c, store, train, val, tmp_path / "whole", log=None)

    train.frame.to_parquet(tmp_path / "train.parquet")
    val.frame.to_parquet(tmp_path / "val.parquet")
    out = tmp_path / "killed"
    script = tmp_path / "entry.py"
    paths = {"train": str(tmp_path / "train.parquet"), "val": str(tmp_path / "val.parquet")}
    script.write_text(ENTRY.format(tests=str(TESTS), store=str(store), out=str(out), **paths))
    env = child_env()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    seen = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            s = _state(out)
            if s is not None and s["stage"] == 0 and s["epoch"] >= 1 and not s["stage_done"]:
                seen = s
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and seen is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert seen is not None, f"no per-epoch state appeared mid-stage; stderr: {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()  # it really died mid-run

    logs: list[str] = []
    resumed = fit(c, store, train, val, out, resume=True, log=logs.append)
    assert any("stage au: resuming at epoch" in m for m in logs), logs
    a = load_file(str(tmp_path / "whole" / "best" / "model.safetensors"))
    b = load_file(str(out / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.P == whole.P
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in metrics["history"]] == [
        (s, e) for s in ("au", "rest") for e in range(4)
    ]  # the full history, both sessions
    assert not any(p.suffix in (".ckpt", ".pt", ".pth", ".pkl") for p in out.rglob("*"))  # no pickle


@pytest.mark.slow
def test_state_files_hold_tensors_in_safetensors_and_scalars_in_json(dataset, tmp_path):  # noqa: F811
    import lightning as L

    store, train, val = dataset
    out = tmp_path / "run"

    class Peek(L.Callback):  # the state written at the end of epoch 0
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                self.meta = json.loads((out / "state" / "state.json").read_text())
                self.tensors = load_file(str(out / "state" / "state.safetensors"))

    peek = Peek()
    fit(cfg(trainer={"epochs": 2}), store, train, val, out, callbacks=[peek], log=None)
    meta = peek.meta
    assert meta["epoch"] == 1 and not meta["stage_done"] and meta["selection"]["best_epoch"] == 0
    assert isinstance(peek.meta["rng"]["python"], list) and peek.meta["scheduler"]["last_epoch"] > 0
    assert peek.tensors["rng.torch"].dtype == torch.uint8
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in peek.tensors)
    assert any(k.startswith("model.") for k in peek.tensors)
    final = json.loads((out / "state" / "state.json").read_text())
    assert final["stage_done"] and final["epoch"] == 2 and final["optimizer"] is None


@pytest.mark.slow
def test_resume_refuses_other_features_or_annotations(dataset, tmp_path):  # noqa: F811
    """Item 3: --resume with another store or other labels is refused, naming both."""
    store, train, val = dataset
    out = tmp_path / "run"
    fit(cfg(trainer={"epochs": 1}), store, train, val, out, log=None)
    names = video_names(6, 40) + video_names(3, 30, prefix="w") + ["x0/00001.jpg"]
    other = tmp_path / "other_store"
    make_store(other, names)
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match=r"images_sha256") as err:
        fit(cfg(trainer={"epochs": 1}), other, train, val, out, resume=True, log=None)
    assert str(store) in str(err.value) and str(other) in str(err.value)
    changed = make_labels(list(train.images), np.random.default_rng(5).normal(size=(len(train), 12)))
    with pytest.raises(ValueError, match=r"training annotations .* sha256"):
        fit(cfg(trainer={"epochs": 1}), store, changed, val, out, resume=True, log=None)
    assert (out / "metrics.json").read_bytes() == before  # nothing was rewritten


@pytest.mark.slow
def test_resume_from_a_damaged_state_file_is_an_error_line_not_a_traceback(dataset, tmp_path):  # noqa: F811
    """A truncated state/state.safetensors (safetensors' own error is no ValueError) ends ``train --resume``
    with one error line naming the file and exit code 2; the run folder is left as it was."""
    from typer.testing import CliRunner

    from mtaffect.cli import app
    from mtaffect.data.annotations import write_annotations
    from mtaffect.models.checkpoint import CheckpointError, load_weights

    store, train, val = dataset
    root = tmp_path / "root"
    write_annotations(train, root / "training_set_annotations.txt")
    write_annotations(val, root / "validation_set_annotations.txt")
    conf = tmp_path / "tiny.yaml"
    conf.write_text("model: {recipe: tiny-test}\ntrainer: {epochs: 1, patience: 0}\ndata: {batch_size: 64}\n")
    args = [
        "train",
        "--config",
        str(conf),
        "--features",
        str(store),
        "--data",
        str(root),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    state = tmp_path / "run" / "state" / "state.safetensors"
    damaged = state.read_bytes()[:40]
    state.write_bytes(damaged)
    r = CliRunner().invoke(app, [*args, "--resume"])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "cannot be read" in r.output and "--overwrite" in r.output, r.output
    assert state.read_bytes() == damaged and (tmp_path / "run" / "best" / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(state)


@pytest.mark.slow
def test_best_is_written_once_per_improvement_and_again_on_resume(dataset, tmp_path, monkeypatch):  # noqa: F811
    """The final stage writes best/ each time its selection improves; the end of the run does not write the
    same checkpoint a second time (a fine-tuned ViT's is large). A resumed run whose best/ is missing (a
    session that ended between two writes) writes it again from the selected weights."""
    import math
    import shutil

    import mtaffect.train.build as F

    store, train, val = dataset
    out = tmp_path / "run"
    written: list[Path] = []
    save_model = F.save_model

    def counting(path, *args, **kwargs):
        written.append(Path(path))
        return save_model(path, *args, **kwargs)

    monkeypatch.setattr(F, "save_model", counting)
    c = cfg("tiny-two-stage", trainer={"epochs": 4})
    res = fit(c, store, train, val, out, log=None)
    best, scores = -math.inf, [h["score"] for h in res.history if h["stage"] == "rest" and h["finite"]]
    improvements = 0
    for s in scores:
        improvements, best = (improvements + 1, s) if s > best else (improvements, best)
    assert written.count(out / "best") == improvements >= 1 and res.checkpoint == out / "best"
    saved = load_file(str(out / "best" / "model.safetensors"))
    state = res.model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert json.loads((out / "best" / "config.json").read_text())["metrics"]["P"] == res.metrics["P"]

    shutil.rmtree(out / "best")
    written.clear()
    again = fit(c, store, train, val, out, resume=True, log=None)
    assert written == [out / "best"] and again.checkpoint == out / "best"
    restored = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
