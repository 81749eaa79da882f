"""The synthetic s-Aff-Wild2 generator: layout, determinism, label statistics, rendering follows AUs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtaffect.data import synth
from mtaffect.data.synth import SynthConfig, generate, label_stats
from mtaffect.data.synth_faces import FaceIdentity, render_face
from mtaffect.io import OutputExistsError
from mtaffect.schema import (
    AU_NAMES,
    CROPPED_DIR,
    EXPR_NAMES,
    NUM_FIELDS,
    OFFICIAL_HEADER,
    TEST_ANNOTATIONS,
    TRAIN_ANNOTATIONS,
    VAL_ANNOTATIONS,
)

AUS = list(AU_NAMES)
SHARED_STATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "abaw_label_stats"


def read_annotations(path: Path) -> pd.DataFrame:
    """Small local reader (the project's parser is tested elsewhere): all lines, duplicates kept."""
    df = pd.read_csv(
        path, header=0, names=["image", "valence", "arousal", "expression", *AUS], dtype={"image": str}
    )
    parts = df["image"].str.split("/")
    return df.assign(video=parts.str[0], frame=parts.str[1].str[:5].astype(int))


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("small")
    return out, generate(out, SynthConfig(videos=6, frames=30, seed=3))


_TINY_JPEG = io.BytesIO()
Image.new("RGB", (8, 8)).save(_TINY_JPEG, format="JPEG")


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """A larger set for statistics; faces replaced by a tiny constant JPEG to keep it fast."""
    out = tmp_path_factory.mktemp("medium")
    mp = pytest.MonkeyPatch()
    mp.setattr(synth, "render_jpeg", lambda *a, **k: _TINY_JPEG.getvalue())
    try:
        generate(out, SynthConfig(videos=30, frames=200, seed=11))
    finally:
        mp.undo()
    return out


# ---- layout ---------------------------------------------------------------------------------------------
def test_layout_is_complete_and_official(small):
    root, summary = small
    train, val = read_annotations(root / TRAIN_ANNOTATIONS), read_annotations(root / VAL_ANNOTATIONS)
    test = read_annotations(root / TEST_ANNOTATIONS)
    for name in (TRAIN_ANNOTATIONS, VAL_ANNOTATIONS, TEST_ANNOTATIONS):
        lines = (root / name).read_text().splitlines()
        assert lines[0] == OFFICIAL_HEADER
        assert all(len(ln.split(",")) == NUM_FIELDS for ln in lines[1:])
    listed = (root / "MTL.txt").read_text().splitlines()
    assert listed[0] == "image"
    assert all(re.fullmatch(r"[^,/]+/\d{5}\.jpg,", ln) for ln in listed[1:])
    assert sorted(set(ln[:-1] for ln in listed[1:])) == sorted(test["image"])
    assert not test["image"].duplicated().any()
    images = set(train["image"]) | set(val["image"]) | set(test["image"])
    on_disk = {str(p.relative_to(root / CROPPED_DIR)) for p in (root / CROPPED_DIR).rglob("*.jpg")}
    assert images == on_disk
    assert summary.images == len(images)
    assert summary.rows == {
        "train": train["image"].nunique(),
        "val": val["image"].nunique(),
        "test": len(test),
    }
    for rel in sorted(images)[:: max(1, len(images) // 25)]:
        with Image.open(root / CROPPED_DIR / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (112, 112)
            im.load()
    info = json.loads((root / synth.INFO_FILE).read_text())
    assert info["config"]["seed"] == 3 and info["version"] == synth.GENERATOR_VERSION
    assert info["images"] == summary.images
    assert info["counts"]["train"]["rows"] == summary.rows["train"]


def test_values_are_written_like_the_official_files(small):
    root, _ = small
    rows = [ln.split(",") for ln in (root / TRAIN_ANNOTATIONS).read_text().splitlines()[1:]]
    for f in rows:
        for va in f[1:3]:
            assert va in ("-5", "-5.0") or (-1 <= float(va) <= 1 and "." in va)
        assert int(f[3]) in range(-1, len(EXPR_NAMES))
        assert all(v in ("-1", "0", "1") for v in f[4:])
    decimals = [f[1] for f in rows if f[1] not in ("-5", "-5.0")]
    assert max(len(v.lstrip("-")) for v in decimals) <= 16  # 12 significant digits, like Python 2 str()


# ---- determinism ----------------------------------------------------------------------------------------
def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    cfg = SynthConfig(videos=4, frames=12, seed=5, val_fraction=0.25, test_fraction=0.25)
    a = file_hashes(generate(tmp_path / "a", cfg).root)
    b = file_hashes(generate(tmp_path / "b", cfg, workers=2).root)
    assert a == b and len(a) > 20
    c = file_hashes(generate(tmp_path / "c", SynthConfig(videos=4, frames=12, seed=6)).root)
    assert c != a
    shared = set(a) & set(c)
    assert all(a[k] != c[k] for k in shared if k.endswith(".jpg"))


# ---- statistics -----------------------------------------------------------------------------------------
def test_label_statistics_follow_the_published_figures(medium):
    train = read_annotations(medium / TRAIN_ANNOTATIONS).drop_duplicates()
    val = read_annotations(medium / VAL_ANNOTATIONS).drop_duplicates()
    both = pd.concat([train, val])
    target = np.array(label_stats()["train"]["au_positive_rate"])
    au = both[(both[AUS] >= 0).all(axis=1)]
    err = np.abs(au[AUS].mean().to_numpy() - target)
    assert err.max() < 0.13 and err.mean() < 0.04, err
    labelled = both[(both.expression >= 0) & (both[AUS] >= 0).all(axis=1)]
    happy = labelled.expression == EXPR_NAMES.index("Happiness")
    assert labelled[happy].AU12.mean() > 0.7 > 0.3 > labelled[~happy].AU12.mean()
    # expression-consistent AUs (classes with enough rows; rare classes may have few segments)
    pairs = [
        ("Happiness", "AU6"),
        ("Surprise", "AU1"),
        ("Surprise", "AU2"),
        ("Surprise", "AU26"),
        ("Anger", "AU4"),
        ("Anger", "AU24"),
        ("Sadness", "AU4"),
        ("Fear", "AU1"),
    ]
    checked = 0
    for expr, au_name in pairs:
        inside = labelled.expression == EXPR_NAMES.index(expr)
        if inside.sum() >= 30:
            rate_in, rate_out = labelled[inside][au_name].mean(), labelled[~inside][au_name].mean()
            assert rate_in > max(0.3, 2 * rate_out), (expr, au_name, rate_in, rate_out)
            checked += 1
    assert checked >= 5
    phi = np.corrcoef(au[AUS].to_numpy(float).T)
    assert phi[AUS.index("AU1"), AUS.index("AU2")] > 0.35 and phi[AUS.index("AU6"), AUS.index("AU12")] > 0.35
    va = both[(both.valence != -5) & (both.expression >= 0)]
    negative = va[va.expression.isin([EXPR_NAMES.index(n) for n in ("Anger", "Disgust", "Fear", "Sadness")])]
    happy_va = va[va.expression == EXPR_NAMES.index("Happiness")]
    neutral_va = va[va.expression == EXPR_NAMES.index("Neutral")]
    assert negative.valence.mean() < -0.25 and happy_va.valence.mean() > 0.2
    assert negative.arousal.mean() > neutral_va.arousal.mean() + 0.2
    counts = train[train.expression >= 0].expression.value_counts()
    assert set(counts.index) == set(range(len(EXPR_NAMES)))  # every class present in training
    common = counts[[EXPR_NAMES.index("Other"), EXPR_NAMES.index("Neutral")]].sum() / counts.sum()
    assert common > 0.3  # the real imbalance: Other and Neutral are ~54% of labelled training rows


def test_temporal_structure_and_sparse_frames(medium):
    train = read_annotations(medium / TRAIN_ANNOTATIONS).drop_duplicates()
    same, pairs, runs, missing = 0, 0, 0, 0
    for _, g in train.groupby("video"):
        gaps = np.diff(g.frame.to_numpy())
        assert gaps.min() >= 1 and gaps.max() <= 8
        e = g.expression.to_numpy()
        ok = (e[1:] >= 0) & (e[:-1] >= 0)
        same += int((e[1:] == e[:-1])[ok].sum())
        pairs += int(ok.sum())
        miss = e < 0
        missing += int(miss.sum())
        runs += int(miss[0]) + int((miss[1:] & ~miss[:-1]).sum())
    assert same / pairs > 0.95
    assert missing / runs > 10  # missing labels come in runs, not i.i.d.


def test_missing_rates_and_duplicates(medium):
    train_all = read_annotations(medium / TRAIN_ANNOTATIONS)
    val_all = read_annotations(medium / VAL_ANNOTATIONS)
    train, val = train_all.drop_duplicates(), val_all.drop_duplicates()
    au_missing = (train[AUS] == -1).all(axis=1)
    partial = (train[AUS] == -1).any(axis=1) & ~au_missing
    assert abs((train.expression == -1).mean() - 0.363) < 0.12
    assert abs((train.valence == -5).mean() - 0.27) < 0.12
    assert abs(au_missing.mean() - 0.274) < 0.12
    assert 0.003 < partial.mean() < 0.08
    assert not ((train.expression == -1) & (train.valence == -5) & au_missing).any()
    assert (val.valence != -5).all() and (val[AUS] >= 0).all(axis=None)
    assert abs((val.expression == -1).mean() - 0.43) < 0.2
    for whole, unique in ((train_all, train), (val_all, val)):
        assert 0.002 < 1 - len(unique) / len(whole) < 0.02
    spellings = {ln.split(",")[1] for ln in (medium / TRAIN_ANNOTATIONS).read_text().splitlines()[1:]}
    assert {"-5", "-5.0"} <= spellings


def test_splits_by_video_with_pairs_together_and_real_looking_ids(medium):
    videos = {
        "train": set(read_annotations(medium / TRAIN_ANNOTATIONS).video),
        "val": set(read_annotations(medium / VAL_ANNOTATIONS).video),
        "test": set(read_annotations(medium / TEST_ANNOTATIONS).video),
    }
    assert not (
        videos["train"] & videos["val"] or videos["train"] & videos["test"] or videos["val"] & videos["test"]
    )
    assert sum(map(len, videos.values())) == 30
    split_of = {v: s for s, vs in videos.items() for v in vs}
    for v, s in split_of.items():
        if v.endswith("_left") and v[:-5] + "_right" in split_of:
            assert split_of[v[:-5] + "_right"] == s
    names = list(split_of)
    assert any(re.fullmatch(r"\d+", v) for v in names)
    assert any(re.fullmatch(r"\d+-\d+-\d+x\d+", v) for v in names)
    assert any(re.fullmatch(r"(\d+-\d+-\d+x\d+|video\d+)_(left|right)", v) for v in names)
    listed = (medium / "MTL.txt").read_text().splitlines()[1:]
    assert len(listed) > len(set(listed)) and all(ln.endswith(".jpg,") for ln in listed)


# ---- rendering --------------------------------------------------------------------------------------------
def _region(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    s = img.shape[0]
    return img[int(y0 * s) : int(y1 * s), int(x0 * s) : int(x1 * s)].astype(float)


def _diff(a: np.ndarray, b: np.ndarray, box: tuple[float, float, float, float]) -> float:
    return float(np.abs(_region(a, *box) - _region(b, *box)).mean())


def test_rendering_follows_the_aus():
    mouth, brows = (0.3, 0.7, 0.62, 0.92), (0.2, 0.8, 0.16, 0.36)
    for seed in range(4):
        ident = dataclasses.replace(FaceIdentity.sample(np.random.default_rng(seed)), jitter_px=0.0)

        def face(ident: FaceIdentity = ident, **aus: float) -> np.ndarray:
            v = np.zeros(len(AUS))
            for k, x in aus.items():
                v[AUS.index(k)] = x
            return render_face(v, ident, np.random.default_rng(0))  # same jitter for every render

        neutral = face()
        assert neutral.shape == (112, 112, 3) and neutral.dtype == np.uint8
        open_mouth = face(AU25=1.0, AU26=1.0)
        assert _diff(neutral, open_mouth, mouth) > 4 * max(_diff(neutral, open_mouth, brows), 0.5)
        raised = face(AU1=1.0, AU2=1.0)
        assert _diff(neutral, raised, brows) > 4 * max(_diff(neutral, raised, mouth), 0.5)
        smile = face(AU12=1.0)
        assert _diff(neutral, smile, mouth) > 1.0
        # the jaw drop lowers the chin: the rows below the relaxed chin change too
        assert _diff(neutral, open_mouth, (0.35, 0.65, 0.93, 1.0)) > 1.0


def test_render_face_rejects_a_wrong_au_vector():
    ident = FaceIdentity.sample(np.random.default_rng(0))
    with pytest.raises(ValueError, match="12 values"):
        render_face(np.zeros(5), ident, np.random.default_rng(0))


# ---- safety and configuration ------------------------------------------------------------------------------
def test_refuses_to_overwrite_unless_asked(tmp_path):
    cfg = SynthConfig(videos=3, frames=8, seed=1)
    generate(tmp_path / "s", cfg)
    with pytest.raises(OutputExistsError, match="not empty"):
        generate(tmp_path / "s", cfg)
    before = file_hashes(tmp_path / "s")
    generate(tmp_path / "s", SynthConfig(videos=3, frames=8, seed=2), overwrite=True)
    after = file_hashes(tmp_path / "s")
    assert after != before
    cfg_info = json.loads((tmp_path / "s" / synth.INFO_FILE).read_text())["config"]
    assert cfg_info["seed"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not part of a synthetic set"):
        generate(foreign, cfg, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        generate(tmp_path / "afile", cfg)


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot fill"):
        generate(tmp_path / "x", SynthConfig(videos=2))
    with pytest.raises(ValueError, match="fractions"):
        generate(tmp_path / "x", SynthConfig(val_fraction=0.6, test_fraction=0.5))
    assert not (tmp_path / "x").exists()


def test_embedded_statistics():
    st = label_stats()
    assert "YenanLiu/ABAW7th" in st["_source"]
    assert len(st["train"]["expression_counts"]) == len(EXPR_NAMES)
    assert len(st["train"]["au_positive_rate"]) == len(AUS)
    if not SHARED_STATS.is_dir():
        pytest.skip("shared label statistics not available")
    shared = json.loads((SHARED_STATS / "validation_label_stats.json").read_text())
    for key, value in shared.items():
        assert st[key] == value


def test_image_size_follows_the_config(tmp_path):
    root = generate(tmp_path / "s", SynthConfig(videos=3, frames=4, seed=0, image_size=64)).root
    first = next((root / CROPPED_DIR).rglob("*.jpg"))
    with Image.open(first) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_workers_fall_back_to_one_process_when_main_cannot_be_imported(tmp_path, monkeypatch):
    cfg = SynthConfig(videos=3, frames=5, seed=4)
    reference = file_hashes(generate(tmp_path / "a", cfg).root)
    monkeypatch.setattr(synth, "_spawn_can_import_main", lambda: False)
    with pytest.warns(RuntimeWarning, match="one process"):
        summary = generate(tmp_path / "b", cfg, workers=2)
    assert file_hashes(summary.root) == reference


@pytest.mark.parametrize("seed", [1, 2, 4])  # seeds where a left/right pair used to leave a split empty
def test_three_videos_fill_every_split(tmp_path, seed):
    from mtaffect.data.annotations import read_annotations
    from mtaffect.data.submission import read_test_list

    summary = generate(tmp_path / "s", SynthConfig(videos=3, frames=8, seed=seed))
    assert all(summary.rows[s] > 0 for s in ("train", "val", "test"))
    assert read_test_list(tmp_path / "s" / "MTL.txt")
    files = (TRAIN_ANNOTATIONS, VAL_ANNOTATIONS, TEST_ANNOTATIONS)
    videos = [set(read_annotations(tmp_path / "s" / f).frame["video"]) for f in files]
    assert all(videos) and not (videos[0] & videos[1] or videos[0] & videos[2] or videos[1] & videos[2])


def test_overwrite_never_replaces_a_dataset_it_did_not_write(tmp_path):
    """A real s-Aff-Wild2 root has exactly the names of a synthetic set: --overwrite must not delete it."""
    real = tmp_path / "real"
    (real / "cropped_aligned" / "v1").mkdir(parents=True)
    (real / "cropped_aligned" / "v1" / "00001.jpg").write_bytes(b"\xff\xd8 a face")
    for name in ("training_set_annotations.txt", "validation_set_annotations.txt", "MTL.txt"):
        (real / name).write_text("image\n")
    with pytest.raises(OutputExistsError, match="did not write"):
        generate(real, SynthConfig(videos=3, frames=8), overwrite=True)
    assert (real / "cropped_aligned" / "v1" / "00001.jpg").read_bytes() == b"\xff\xd8 a face"
