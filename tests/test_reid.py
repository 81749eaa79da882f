"""Re-identification in the pipeline: the appearance embedding and a face that leaves for > 1 s."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

pytest.importorskip("skimage")  # public-domain face photos

from mtaffect.faces.embed import EMBEDDING_DIM, appearance_embedding
from mtaffect.faces.mtcnn import MTCNN
from mtaffect.predict import demo_media
from mtaffect.predict.pipeline import Predictor, align_faces_fast
from mtaffect.predict.tracking import DEFAULT_REID_SIMILARITY


def _aligned(img: np.ndarray, det: MTCNN) -> np.ndarray:
    d = det.detect([img])[0]
    return align_faces_fast(img, d.landmarks[:1])[0]


def test_embedding_tells_people_apart_and_survives_scale_and_light():
    import matplotlib.cbook as cbook

    det = MTCNN(min_face_size=30.0)
    from skimage import data

    astro = data.astronaut()
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.asarray(Image.open(fh).convert("RGB"))
    small = Image.fromarray(astro).resize((300, 300), Image.Resampling.BILINEAR)
    darker = np.asarray(ImageEnhance.Brightness(small).enhance(0.75))
    faces = np.stack([_aligned(astro, det), _aligned(darker, det), _aligned(hopper, det)])
    e = appearance_embedding(faces)
    assert e.shape == (3, EMBEDDING_DIM) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    same, other = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert same > DEFAULT_REID_SIMILARITY > other, (same, other)
    with pytest.raises(ValueError, match="aligned RGB"):
        appearance_embedding(faces[..., 0])


@pytest.fixture(scope="module")
def away_video(tmp_path_factory):
    # two real-photo faces; the first slides out of the picture and is fully gone ~1.2 s, then returns
    d = tmp_path_factory.mktemp("reid")
    return demo_media.make_demo_video(d / "away.mp4", seconds=3.2, faces=2, away=(0.4, 2.6))


def test_a_face_away_for_more_than_a_second_keeps_its_id(away_video):
    df = Predictor(detect_every=5).predict(away_video)
    ok = df[df["success"] == 1]
    assert sorted(ok["face_id"].unique().tolist()) == [0, 1]
    # the returning face is back on the left, with its old id
    last = ok[ok["frame"] == ok["frame"].max()].sort_values("x1")
    assert len(last) == 2 and last["face_id"].tolist()[0] == int(
        ok[ok["frame"] == 0].sort_values("x1")["face_id"].iloc[0]
    )
    # its timeline has two stretches in view with a gap between: drawn, not an error
    from mtaffect.predict.plots import timeline_pngs

    assert sorted(timeline_pngs(df, str(away_video))) == [0, 1]
    # and a thumbnail per face for the report, cut from the video at the face's best detection
    from mtaffect.predict.sources import SourceInfo
    from mtaffect.predict.thumbnails import face_thumbnails

    thumbs = face_thumbnails(SourceInfo(str(away_video), "video"), df, size=64)
    assert sorted(thumbs) == [0, 1] and all(t[:2] == b"\xff\xd8" for t in thumbs.values())
    im = np.asarray(Image.open(io.BytesIO(thumbs[0])))
    assert im.shape == (64, 64, 3) and im.std() > 20  # a picture, not a blank


def test_without_reidentification_the_returning_face_gets_a_new_id(away_video):
    df = Predictor(detect_every=5, reid_memory=0).predict(away_video)
    ok = df[df["success"] == 1]
    assert ok["face_id"].nunique() == 3
