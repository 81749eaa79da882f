"""Cross-validation: folds by source video, mean ± std, saved fold models and the test ensemble."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_train import cfg, make_labels, make_store

from mtaffect.models.loading import load_model
from mtaffect.train.cv import cross_validate, ensemble, fold_split, group_key, video_folds


def _names() -> list[str]:
    vids = ["10-30-1920x1080_left", "10-30-1920x1080_right", "a", "b", "c_left", "c_right", "d", "e"]
    sizes = [20, 20, 35, 15, 10, 10, 25, 30]
    return [f"{v}/{f:05d}.jpg" for v, n in zip(vids, sizes, strict=True) for f in range(1, n + 1)]


def test_group_key_joins_left_and_right_faces():
    assert group_key("10-30-1920x1080_left") == group_key("10-30-1920x1080_right") == "10-30-1920x1080"
    assert group_key("video_leftover") == "video_leftover" and group_key("7") == "7"


def test_folds_split_by_source_video_and_cover_every_row():
    names = _names()
    labels = make_labels(names, np.random.default_rng(0).normal(size=(len(names), 12)).astype(np.float32))
    folds = video_folds(labels, 3, seed=0)
    allrows = np.concatenate(folds)
    assert sorted(allrows) == list(range(len(labels)))  # a partition
    groups = [{group_key(v) for v in labels.frame["video"].iloc[f]} for f in folds]
    for i in range(3):
        for j in range(i + 1, 3):
            assert groups[i].isdisjoint(groups[j])  # never a (source) video on both sides
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 35  # balanced to within the largest group
    assert [f.tolist() for f in video_folds(labels, 3, seed=0)] == [f.tolist() for f in folds]
    with pytest.raises(ValueError, match="at least 9 source videos"):
        video_folds(labels, 9)


def test_fold_split_is_the_cv_assignment_and_names_its_fold():
    """`train --fold K` and `cv` share it: fold K's validation rows are video_folds' K-th part."""
    names = _names()
    labels = make_labels(names, np.random.default_rng(0).normal(size=(len(names), 12)).astype(np.float32))
    labels.source = "train.txt+val.txt"
    for k in range(3):
        train, val = fold_split(labels, 3, k, seed=4)
        assert val.frame.equals(labels.subset(video_folds(labels, 3, seed=4)[k]).frame)
        assert set(train.videos) == set(labels.videos) - set(val.videos)
        assert len(train) + len(val) == len(labels)
        assert val.source == f"train.txt+val.txt (fold {k} of 3, split seed 4: validation rows)"
    with pytest.raises(ValueError, match="fold 3 does not exist: folds are numbered 0 to 2"):
        fold_split(labels, 3, 3)


def test_resume_is_for_pipeline_configs_only(tmp_path):
    names = _names()
    feats = make_store(tmp_path / "store", names)
    with pytest.raises(ValueError, match="resume applies to pipeline configs"):
        cross_validate(cfg(), tmp_path / "store", make_labels(names, feats), 2, tmp_path / "cv", resume=True)


def test_ensemble_is_the_mean_of_the_models():
    from mtaffect.data.predictions import PredictionTable

    rng = np.random.default_rng(0)
    imgs = ["v/00001.jpg", "v/00002.jpg"]

    def table():
        e = rng.random((2, 8))
        return PredictionTable.from_arrays(
            imgs,
            rng.uniform(-1, 1, 2),
            rng.uniform(-1, 1, 2),
            e / e.sum(1, keepdims=True),
            rng.random((2, 12)),
        )

    a, b = table(), table()
    m = ensemble([a, b.take([1, 0])], imgs)  # order of the inputs does not matter
    np.testing.assert_allclose(m.au_probs, (a.au_probs + b.au_probs) / 2)
    np.testing.assert_allclose(m.valence, (a.valence + b.valence) / 2)


@pytest.mark.slow
def test_cross_validate_reports_mean_std_saves_folds_and_ensembles(tmp_path):
    names = _names()
    feats = make_store(tmp_path / "store", names)
    labels = make_labels(names, feats)
    test_images = names[::9]
    res = cross_validate(
        cfg(trainer={"epochs": 2}),
        tmp_path / "store",
        labels,
        3,
        tmp_path / "cv",
        test_images=test_images,
        log=None,
    )
    assert len(res.folds) == 3 and len(res.checkpoints) == 3
    ps = [f["P"] for f in res.folds]
    assert res.mean["P"] == pytest.approx(np.mean(ps)) and res.std["P"] == pytest.approx(np.std(ps))
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert saved["mean"]["P"] == pytest.approx(res.mean["P"]) and set(saved["std"]) == {
        "P",
        "ccc_va",
        "f1_expr",
        "f1_au",
    }
    fold_preds = [load_model(c).predict_store(tmp_path / "store", test_images) for c in res.checkpoints]
    expected = np.mean([p.au_probs for p in fold_preds], axis=0)
    np.testing.assert_allclose(res.test_predictions.au_probs, expected, atol=1e-6)
    written = pd.read_parquet(tmp_path / "cv" / "test_predictions.parquet")
    assert written["image"].tolist() == test_images
    val_videos = [v for f in res.folds for v in f["val_videos"]]  # each video validated exactly once
    assert sorted(val_videos) == labels.videos
    with pytest.raises(FileExistsError):
        cross_validate(cfg(), tmp_path / "store", labels, 3, tmp_path / "cv", log=None)


@pytest.mark.slow
def test_the_fold_ensemble_refuses_failed_test_images_unless_allowed(tmp_path):
    """Item 5: a test image whose extraction failed is never predicted from zero features silently."""
    from mtaffect.features.reader import FailedImagesError

    names = _names()
    feats = make_store(tmp_path / "store", names, invalid=(4,))
    labels = make_labels(names, feats)
    test_images = names[:8]
    c = cfg(trainer={"epochs": 1})
    with pytest.raises(FailedImagesError, match=rf"1 of 8 images failed extraction .*{names[4]}"):
        cross_validate(c, tmp_path / "store", labels, 2, test_images=test_images, log=None)
    res = cross_validate(
        c, tmp_path / "store", labels, 2, test_images=test_images, allow_missing=True, log=None
    )
    assert res.test_predictions.frame["valid"].tolist() == [1, 1, 1, 1, 0, 1, 1, 1]
