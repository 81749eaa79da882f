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


def test_a_face_away_for_more_than_a_second_keeps_its_id(away_video, away_torch_table):
    df = away_torch_table  # Predictor(detect_every=5) on the video (conftest)
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


# ---- late re-identification: one id per person in every kind of output ---------------------------------

#: A face is seen (frames 0-14), gone longer than the tracker's position memory (15-54), then returns
#: tinted for a few frames (too unlike to be re-identified at once: a new, young track) and plain again;
#: the young track's mean appearance then matches the remembered face: merged (its id 1 -> 0).
RETURN_AT, TINTED = 55, 6


def _returning_face_clip(n: int = 80, width: int = 320, height: int = 240) -> np.ndarray:
    bg = demo_media.background(width, height)
    patch, alpha = demo_media.face_patch(False)
    tinted = np.clip(patch * np.array([0.5, 0.8, 1.0], np.float32), 0, 255).astype(np.uint8)
    out = []
    for i in range(n):
        c = bg.copy()
        if i < 15 or i >= RETURN_AT:
            p = tinted if RETURN_AT <= i < RETURN_AT + TINTED else patch
            demo_media._paste(c, p, alpha, width / 2 + i % 7, height / 2, 150)
        out.append(c)
    return np.stack(out)


@pytest.fixture(scope="module")
def returning_clip() -> np.ndarray:
    return _returning_face_clip()


def test_a_late_merge_relabels_rows_already_handed_out(returning_clip):
    p = Predictor(chunk_frames=4)
    batches = list(p.stream_source(p.open(returning_clip, fps=25)))
    early = [b for b in batches if 1 in b.rows.build(p.au_thresholds)["face_id"].tolist()]
    assert early, "the returning face first gets a new id (the scenario this test needs)"
    assert batches[-1].resume.aliases == {1: 0} and batches[-1].resume.next_id >= 2
    ok = p.predict(returning_clip, fps=25).query("success == 1")
    assert ok["face_id"].unique().tolist() == [0] and len(ok) == 15 + 80 - RETURN_AT


def test_a_resumed_job_relabels_the_rows_of_its_partial_file(returning_clip, tmp_path, monkeypatch):
    """Rows written to the partial file under the young id before the merge (and before the job was
    interrupted) carry the merged id in the final table: the same table as Predictor.predict."""
    import json

    import pandas as pd

    import mtaffect.predict.job as job
    from mtaffect.predict.outputs import read_table

    monkeypatch.setattr(job, "COMMIT_SECONDS", 0.0)  # every chunk committed: the interruption point is known
    p = Predictor(chunk_frames=4)
    reference = p.predict(returning_clip, fps=25)
    seen = []

    def interrupt(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 64:  # frames 0-59 committed (the merge among them), 60-63 lost
            raise KeyboardInterrupt

    target = tmp_path / "clip.csv"
    with pytest.raises(KeyboardInterrupt):
        job.predict_to_file(p, returning_clip, target, fps=25, progress=interrupt)
    part = job.partial_dir(target)
    written = pd.read_csv(part / job.ROWS_FILE)
    assert 1 in written["face_id"].tolist() and written["frame"].max() == 59  # the young id, on disk
    assert json.loads((part / job.JOB_FILE).read_text())["current"]["resume"]["aliases"] == {"1": 0}
    job.predict_to_file(p, returning_clip, target, fps=25)
    pd.testing.assert_frame_equal(
        read_table(target), reference, check_exact=False, atol=1e-6, check_dtype=False
    )


def test_temporal_windows_follow_the_person_across_a_late_merge(returning_clip, tmp_path):
    """The young track's pending rows continue the remembered face's windows: the returning face gets
    the windows (and numbers) of a clip that starts when it returns, under its one id."""
    from model_helpers import lstm_checkpoint

    ckpt = lstm_checkpoint(tmp_path / "lstm", window=8)
    p = Predictor(model=ckpt, chunk_frames=4)
    got = p.predict(returning_clip, fps=25).query("success == 1")
    assert got["face_id"].unique().tolist() == [0] and got["frame"].is_unique
    back = p.predict(returning_clip[RETURN_AT:], fps=25).query("success == 1")
    cols = [c for c in got.columns if c.endswith("_p")] + ["valence", "arousal"]
    np.testing.assert_allclose(got[got.frame >= RETURN_AT][cols].to_numpy(), back[cols].to_numpy(), atol=1e-5)
