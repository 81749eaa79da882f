"""The two engines agree on real photos and a real video: `predict --engine onnxruntime` finds the torch
engine's faces (boxes to 0.05 px), gives them the same ids and labels, and every row's probabilities
and VA to 1e-4.

The media are public-domain and public photos shipped with scikit-image (the astronaut, the
cameraman, faces of Labeled Faces in the Wild), not rendered faces: on them the engines used to differ,
by a box (a saturated O-Net probability decided NMS) or by up to 8e-3 on a row (landmarks 1e-5 px apart
aligned different uint8 crops)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("onnxscript")
skimage_data = pytest.importorskip("skimage.data")

from mtaffect.predict.demo_media import write_video  # noqa: E402
from mtaffect.predict.pipeline import Predictor  # noqa: E402
from mtaffect.schema import AU_PROB_COLUMNS, BOX_COLUMNS, EXPR_PROB_COLUMNS, VA_NAMES  # noqa: E402

PROBS = [*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS, *VA_NAMES]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))


def _lfw_mosaic(rows: int = 4, cols: int = 5, side: int = 130) -> np.ndarray:
    """rows x cols faces of Labeled Faces in the Wild (scikit-image's 25x25 subset), enlarged."""
    faces = (skimage_data.lfw_subset()[: rows * cols] * 255).round().astype(np.uint8)
    tiles = [np.asarray(Image.fromarray(f).resize((side, side), Image.Resampling.BICUBIC)) for f in faces]
    grid = np.concatenate([np.concatenate(tiles[r * cols : (r + 1) * cols], 1) for r in range(rows)], 0)
    return _grey_rgb(grid)


def _pan(image: np.ndarray, n: int, size: tuple[int, int], zoom: float, shift: tuple[int, int]):
    """A camera move over ``image``: ``n`` frames of ``size`` (W, H), zooming in by ``zoom`` while the
    view moves by ``shift`` pixels."""
    h, w = image.shape[:2]
    for i in range(n):
        t = i / n
        s = 1.0 - zoom * t
        x0, y0 = round(shift[0] * t), round(shift[1] * t)
        view = image[y0 : y0 + round(h * s), x0 : x0 + round(w * s)]
        yield np.asarray(Image.fromarray(view).resize(size, Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(_grey_rgb(skimage_data.camera())).save(folder / "cameraman.png")
    Image.fromarray(_lfw_mosaic()).save(folder / "lfw.jpg", quality=92)
    return folder


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """24 frames of a slow zoom over 20 LFW faces, then 24 over the cameraman: about 500 face rows."""
    mosaic = _lfw_mosaic()[:480, :640]
    cameraman = _grey_rgb(skimage_data.camera())
    frames = [
        *_pan(mosaic, 24, (640, 480), 0.08, (5, 20)),
        *(np.pad(f, ((0, 0), (80, 80), (0, 0))) for f in _pan(cameraman, 24, (480, 480), 0.4, (120, 40))),
    ]
    return write_video(tmp_path_factory.mktemp("video") / "real.mp4", frames, fps=25)


def _engines(export: Path) -> tuple[Predictor, Predictor]:
    torch_p = Predictor(num_threads=1)
    ort_p = Predictor(model=export, engine="onnxruntime", precision="float32", num_threads=1)
    return torch_p, ort_p


def _assert_same_rows(got: pd.DataFrame, ref: pd.DataFrame, min_faces: int) -> None:
    keys = ["file", "frame", "face_id", "success"]
    pd.testing.assert_frame_equal(got[keys], ref[keys])
    ok = (ref["success"] == 1).to_numpy()
    assert ok.sum() >= min_faces
    np.testing.assert_allclose(got.loc[ok, list(BOX_COLUMNS)], ref.loc[ok, list(BOX_COLUMNS)], atol=0.05)
    diff = np.abs(got.loc[ok, PROBS].to_numpy() - ref.loc[ok, PROBS].to_numpy()).max(1)
    bad = int((diff > 1e-4).sum())
    assert bad == 0, f"{bad} of {ok.sum()} rows differ by more than 1e-4, by up to {diff.max():.1e}"
    assert (got["expression"] == ref["expression"]).all()
    au_c = [c for c in ref.columns if c.endswith("_c")]
    assert (got[au_c].to_numpy() == ref[au_c].to_numpy()).all()


@pytest.mark.slow
def test_both_engines_give_one_table_on_real_photos(default_export, photos):
    torch_p, ort_p = _engines(default_export[0])
    ref, got = torch_p.predict(photos), ort_p.predict(photos)
    assert ref["file"].nunique() == 3
    _assert_same_rows(got, ref, min_faces=20)  # the astronaut, the cameraman and most of the 20 LFW faces


@pytest.mark.slow
def test_both_engines_give_one_table_on_a_real_video(default_export, video):
    torch_p, ort_p = _engines(default_export[0])
    ref, got = torch_p.predict(video), ort_p.predict(video)
    assert ref["frame"].nunique() == 48
    _assert_same_rows(got, ref, min_faces=400)
