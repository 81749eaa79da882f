"""Checkpoints: safetensors + config.json round trip, no silent overwrite, the FaceAffectModel contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from store_helpers import set_meta
from test_train import TinyModel, TinyTemporal, make_store, video_names

from mtaffect.features.store import FeatureStore, StoreError
from mtaffect.io import OutputExistsError
from mtaffect.models.base import FaceAffectModel
from mtaffect.models.checkpoint import CheckpointError, save_checkpoint
from mtaffect.models.loading import load_model

BACKBONE = {"name": "hand-made", "spec": {"name": "hand-made"}, "fingerprint": "abc123"}


def _save(model, path, **kw):
    return save_checkpoint(path, model, backbone=BACKBONE, feature_dim=12, **kw)


def test_round_trip_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    model = TinyModel(12, hidden=8).eval()
    _save(model, tmp_path / "ck", metrics={"P": 1.23}, au_thresholds=[0.4] * 12)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["recipe"] == "tiny-test" and cfg["model_config"] == {"feature_dim": 12, "hidden": 8}
    assert (
        cfg["backbone"]["fingerprint"] == "abc123" and cfg["metrics"]["P"] == 1.23 and cfg["mtaffect_version"]
    )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ck")
    assert isinstance(loaded, FaceAffectModel)
    assert loaded.backbone == "hand-made" and loaded.backbone_kwargs == {}
    np.testing.assert_allclose(loaded.au_thresholds, 0.4)
    x = torch.randn(5, 12)
    out = loaded.predict(x)
    ref = model({"features": x})
    np.testing.assert_allclose(out.expr_probs, torch.softmax(ref["expr"], -1).detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(out.au_probs, torch.sigmoid(ref["au"]).detach().numpy(), atol=1e-6)
    assert out.va.shape == (5, 2) and np.allclose(out.expr_probs.sum(1), 1)


def test_never_overwrites_without_permission(tmp_path):
    model = TinyModel(12)
    _save(model, tmp_path / "ck")
    np.testing.assert_array_equal(load_model(tmp_path / "ck").au_thresholds, np.full(12, 0.5))  # the default
    with pytest.raises(OutputExistsError, match="overwrite"):
        _save(model, tmp_path / "ck")
    _save(TinyModel(12, hidden=4), tmp_path / "ck", overwrite=True)
    assert load_model(tmp_path / "ck").model.hidden == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind


def test_damaged_checkpoints_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing: model not found"):
        load_model(tmp_path / "nothing")
    _save(TinyModel(12), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_model(tmp_path / "ck")
    _save(TinyModel(12, hidden=8), tmp_path / "ck2")
    cfg = json.loads((tmp_path / "ck2" / "config.json").read_text())
    cfg["model_config"]["hidden"] = 9  # weights no longer fit
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "ck2")


def test_temporal_predict_and_predict_store_take_each_frame_once(tmp_path):
    torch.manual_seed(0)
    names = video_names(2, 7)
    make_store(tmp_path / "s", names)
    store = FeatureStore.open(tmp_path / "s")
    model = TinyTemporal(12).eval()
    _save(model, tmp_path / "ck", window=3)
    m = load_model(tmp_path / "ck")
    x = torch.from_numpy(store.features(store.rows(names[:3])))
    seq = m.predict(x[None])  # one sequence (1, T, D) -> T rows with temporal context
    single = m.predict(x)  # N faces, each a sequence of length 1
    assert seq.va.shape == single.va.shape == (3, 2) and not np.allclose(seq.au_probs, single.au_probs)
    # windows of 3 listed frames per video, sorted by frame; asked in shuffled order with a repeat
    order = np.random.default_rng(0).permutation(len(names))
    asked = [names[i] for i in order] + [names[6]]
    table = m.predict_store(store, asked).align_to([*names, names[6]])
    assert len(table) == len(names) + 1
    feats = torch.from_numpy(store.features(store.rows(names)))
    # video 0 (frames 1-7): windows 1-3, 4-6 and 7 padded with copies of frame 7
    padded = torch.cat([feats[6:7]] * 3)[None]
    for rows, window in (
        (slice(0, 3), feats[None, :3]),
        (slice(3, 6), feats[None, 3:6]),
        (slice(6, 7), padded),
    ):
        ref = torch.sigmoid(model({"features": window})["au"][0]).detach().numpy()
        np.testing.assert_allclose(table.au_probs[rows], ref[: rows.stop - rows.start], atol=1e-6)
    np.testing.assert_allclose(table.au_probs[6], table.au_probs[-1])  # the repeat gets the same row
    other = make_store(tmp_path / "s2", names)  # same names, different backbone fingerprint below
    set_meta(tmp_path / "s2", fingerprint="fff999")
    with pytest.raises(StoreError, match="never mix"):
        m.predict_store(tmp_path / "s2", names)
    del other


# ---- a checkpoint is data, never code (issue 12) -----------------------------------------------------------
def _hub_folder_with_code(folder, sentinel):
    """A transformers folder whose config asks to import its own Python module (which leaves a sentinel)."""
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.Evil"}}
        )
    )
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n")
    return folder


def test_a_checkpoint_cannot_switch_on_remote_code(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from mtaffect.features.registry import create_backbone

    sentinel = tmp_path / "code_ran"
    hub = _hub_folder_with_code(tmp_path / "hub", sentinel)
    ck = save_checkpoint(
        tmp_path / "ck", TinyModel(12), backbone={**BACKBONE, "name": f"hf:{hub}"}, feature_dim=12
    )
    cfg = json.loads((ck / "config.json").read_text())
    cfg["backbone"]["kwargs"] = {"trust_remote_code": True}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"backbone.kwargs sets 'trust_remote_code'.*--trust-remote-code"
    ):
        load_model(ck)

    del cfg["backbone"]["kwargs"]
    (ck / "config.json").write_text(json.dumps(cfg))
    model = load_model(ck)
    assert model.backbone_kwargs == {}
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run code"))
    with pytest.raises(OSError, match="custom code"):
        create_backbone(model.backbone, **model.backbone_kwargs)
    assert not sentinel.exists()
    # Only the person running the command switches it on, and only for backbones that can run code.
    assert load_model(ck, trust_remote_code=True).backbone_kwargs == {"trust_remote_code": True}
    _save(TinyModel(12), tmp_path / "plain")
    with pytest.raises(ValueError, match="applies to hub backbones"):
        load_model(tmp_path / "plain", trust_remote_code=True)


def test_saving_never_records_remote_code_trust(tmp_path):
    backbone = {**BACKBONE, "name": "hf:org/model", "kwargs": {"trust_remote_code": True, "pooling": "mean"}}
    ck = save_checkpoint(tmp_path / "ck", TinyModel(12), backbone=backbone, feature_dim=12)
    assert json.loads((ck / "config.json").read_text())["backbone"]["kwargs"] == {"pooling": "mean"}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format_version", [1], "format_version must be a positive integer"),
        ("recipe", 3, "recipe must be a recipe name"),
        ("model_config", "hidden=8", "model_config must be a mapping"),
        ("inputs", ["features", "os.system"], "inputs must list some of features, logits, tokens"),
        ("window", 0, "window must be an integer >= 1"),
        ("au_thresholds", [0.5] * 11, "au_thresholds must be 12 numbers in"),
        ("au_thresholds", [2.0] * 12, "au_thresholds must be 12 numbers in"),
        ("backbone", {"name": ""}, "backbone must be a mapping with the backbone's registry name"),
        ("backbone", {"name": "x", "kwargs": ["a"]}, "backbone.kwargs must be a mapping"),
        ("model_config", {"feature_dim": 12, "hidden": -3}, "cannot rebuild recipe 'tiny-test'"),
        ("recipe", "no-such-recipe", "cannot rebuild recipe 'no-such-recipe' .*unknown model"),
    ],
)
def test_every_config_field_is_checked(tmp_path, key, value, message):
    ck = _save(TinyModel(12, hidden=8), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg[key] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_model(ck)


def test_corrupt_weights_are_a_checkpoint_error(tmp_path):
    ck = _save(TinyModel(12), tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(ck)
    (ck / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(ck)


def test_replacing_keeps_a_users_folder_named_like_the_swap(tmp_path):
    _save(TinyModel(12), tmp_path / "ck")
    mine = tmp_path / ".ck.replaced"  # the swap name older versions used (and deleted)
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _save(TinyModel(12, hidden=4), tmp_path / "ck", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ck.replaced", "ck"]


def test_a_checkpoint_never_replaces_a_users_folder(tmp_path):
    """The ownership rule: --overwrite replaces a checkpoint, never a folder that is not one."""
    users = tmp_path / "best"
    users.mkdir()
    (users / "config.json").write_text('{"my": "settings"}')  # a checkpoint's file name, not ours
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"best is not a checkpoint written by mtaffect"):
        _save(TinyModel(12), users, overwrite=True)
    assert sorted(p.name for p in users.iterdir()) == ["config.json", "notes.txt"]


def test_ensembles_do_not_nest(tmp_path):
    """Issue 20 case 9: nested ensemble folders recursed without a limit (RecursionError at ~400)."""
    import shutil

    from mtaffect.models.ensemble import save_ensemble

    ck = _save(TinyModel(12), tmp_path / "ck")
    tasks = {"au": "m", "expr": "m", "va": "m"}
    inner = save_ensemble(tmp_path / "inner", {"m": ck}, tasks)
    assert load_model(inner).members["m"].model.hidden == TinyModel(12).hidden
    with pytest.raises(CheckpointError, match=r"inner is an ensemble: the members and sources of one are"):
        save_ensemble(tmp_path / "outer", {"m": inner}, tasks)
    outer = tmp_path / "outer"  # made by hand: an ensemble whose member is an ensemble (holding a config)
    shutil.copytree(inner, outer)
    member = outer / "members" / "m"
    shutil.copytree(inner, member / "nested")
    (member / "ensemble.json").write_text((inner / "ensemble.json").read_text())
    with pytest.raises(CheckpointError, match=r"members.m = 'members/m' is an ensemble, not a checkpoint"):
        load_model(outer)
