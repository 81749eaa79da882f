"""Temporal smoothing: within a video only, symmetric, in frame units, causal when asked."""

from __future__ import annotations

import numpy as np
import pytest

from mtaffect.data.predictions import PredictionTable
from mtaffect.post.smoothing import Kernel, SmoothingError, make_plan, smooth, smooth_values
from mtaffect.schema import AU_PROB_COLUMNS, EXPR_PROB_COLUMNS, NUM_AUS, NUM_EXPR

ALL = {"va": Kernel("gaussian", 2.0), "expr": Kernel("box", 3.0), "au": Kernel("gaussian", 1.5)}


def table(videos, frames, valence, *, extra=True, seed=0) -> PredictionTable:
    rng = np.random.default_rng(seed)
    n = len(frames)
    images = [f"{v}/{f:05d}.jpg" for v, f in zip(videos, frames, strict=True)]
    cols = {"video": list(videos), "frame": list(frames)} if extra else {}
    return PredictionTable.from_arrays(
        images,
        np.asarray(valence, dtype=float),
        rng.uniform(-1, 1, n),
        rng.dirichlet(np.ones(NUM_EXPR), n),
        rng.random((n, NUM_AUS)),
        **cols,
    )


def brute_force(frames, groups, values, kernel: Kernel) -> np.ndarray:
    """Direct definition: weighted mean over the rows of the same group, weights at frame distances."""
    out = np.empty_like(values)
    for i in range(len(values)):
        d = frames[i] - frames
        w = kernel.weights(d) * (groups == groups[i])
        if kernel.causal:
            w = w * (d >= 0)
        out[i] = (w @ values) / w.sum()
    return out


@pytest.mark.parametrize(
    "kernel",
    [Kernel("gaussian", 2.5), Kernel("box", 4), Kernel("gaussian", 3, causal=True), Kernel("box", 2, True)],
)
def test_matches_the_direct_definition_on_shuffled_sparse_rows(kernel: Kernel):
    rng = np.random.default_rng(1)
    frames = np.concatenate([np.cumsum(rng.integers(1, 9, 40)), np.cumsum(rng.integers(1, 9, 30))])
    groups = np.r_[np.zeros(40, int), np.ones(30, int)]
    perm = rng.permutation(70)
    t = table([f"v{g}" for g in groups[perm]], frames[perm], rng.normal(size=70))
    got = smooth(t, {"va": kernel}).valence
    want = brute_force(frames[perm].astype(float), groups[perm], t.valence[:, None], kernel)[:, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_never_crosses_a_video_boundary():
    # video a is all 0, video b all 1, with overlapping frame numbers: nothing may leak across
    frames = list(range(1, 11)) * 2
    t = table(["a"] * 10 + ["b"] * 10, frames, [0.0] * 10 + [1.0] * 10)
    out = smooth(t, {"va": Kernel("box", 50)}).valence
    assert (out[:10] == 0).all() and (out[10:] == 1).all()


def test_symmetric_impulse_response():
    frames = np.arange(0, 41)
    x = np.zeros(41)
    x[20] = 1.0
    for kernel in (Kernel("gaussian", 3.0), Kernel("box", 5)):
        out = smooth(table(["v"] * 41, frames, x), {"va": kernel}).valence
        np.testing.assert_allclose(out[20 - 10 : 20], out[21:31][::-1], rtol=0, atol=1e-15)
        assert out[19] > 0 and out[21] > 0  # both neighbours contribute (none dropped on one side)


def test_respects_frame_gaps():
    # row of interest at frame 10; one neighbour 1 frame away (value 1), one 5 frames away (value -1)
    t = table(["v"] * 3, [9, 10, 15], [1.0, 0.0, -1.0])
    out = smooth(t, {"va": Kernel("gaussian", 3.0)}).valence
    assert out[1] > 0  # the nearer neighbour weighs more
    w1, w5 = np.exp(-0.5 * (1 / 3) ** 2), np.exp(-0.5 * (5 / 3) ** 2)
    assert out[1] == pytest.approx((w1 - w5) / (1 + w1 + w5), abs=1e-12)
    # a box of half-width 3 sees the frame-9 row but not the frame-15 one, whatever the row order
    out = smooth(t, {"va": Kernel("box", 3)}).valence
    assert out[1] == pytest.approx(0.5)


def test_constant_sequence_unchanged():
    t = table(["v"] * 30, np.cumsum(np.arange(1, 31) % 7 + 1), np.full(30, 0.3))
    frame = t.frame.copy()
    for c in [*EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS]:
        frame[c] = 0.125
    out = smooth(PredictionTable(frame), ALL)
    assert (out.valence == 0.3).all()
    assert (out.expr_probs == 0.125).all() and (out.au_probs == 0.125).all()


def test_causal_uses_only_the_past():
    x = np.zeros(20)
    x[10] = 1.0
    out = smooth(table(["v"] * 20, np.arange(20), x), {"va": Kernel("gaussian", 3.0, causal=True)}).valence
    assert (out[:10] == 0).all()  # a future spike never moves earlier rows
    assert out[10] < 1 and out[11] > 0
    # and changing the future does not change the present
    y = x.copy()
    y[15:] = 5.0
    out2 = smooth(table(["v"] * 20, np.arange(20), y), {"va": Kernel("gaussian", 3.0, causal=True)}).valence
    np.testing.assert_array_equal(out[:15], out2[:15])


def test_rows_keep_their_order_probabilities_stay_valid_and_names_derived():
    rng = np.random.default_rng(3)
    frames = rng.permutation(60) * 2 + 1
    t = table(["vid/left"] * 60, frames, rng.normal(size=60), extra=False)  # video/frame from image
    out = smooth(t, ALL)
    assert (out.images == t.images).all()
    np.testing.assert_allclose(out.expr_probs.sum(axis=1), 1.0, atol=1e-12)
    assert out.au_probs.min() >= 0 and out.au_probs.max() <= 1
    assert not np.allclose(out.valence, t.valence)
    assert out is not t and np.array_equal(t.valence, t.frame["valence"].to_numpy())  # input untouched


def test_face_tracks_group_by_several_columns():
    n = 20
    t = table(["clip"] * n, np.repeat(np.arange(10), 2), np.tile([0.0, 1.0], 10))
    frame = t.frame.assign(file="clip.mp4", face_id=np.tile([0, 1], 10))
    out = smooth(PredictionTable(frame), {"va": Kernel("gaussian", 4)}, group_by=("file", "face_id"))
    np.testing.assert_array_equal(out.valence, np.tile([0.0, 1.0], 10))  # two faces never mixed
    mixed = smooth(PredictionTable(frame), {"va": Kernel("gaussian", 4)}, group_by=("file",))
    assert 0 < mixed.valence[0] < 1


def test_identity_and_errors():
    t = table(["v"] * 5, range(5), np.arange(5.0))
    assert np.array_equal(smooth(t, {"va": Kernel()}).valence, t.valence)
    assert np.array_equal(smooth(t, {"va": Kernel("gaussian", 0)}).valence, t.valence)
    with pytest.raises(SmoothingError, match="kind"):
        Kernel("median", 3)
    with pytest.raises(SmoothingError, match="width"):
        Kernel("box", -1)
    with pytest.raises(SmoothingError, match="unknown task"):
        smooth(t, {"valence": Kernel("box", 1)})
    bad = PredictionTable.from_arrays(
        ["noframe.jpg"], [0.0], [0.0], np.full((1, 8), 0.125), np.zeros((1, 12))
    )
    with pytest.raises(SmoothingError, match="video"):
        smooth(bad, {"va": Kernel("box", 1)})
    huge = PredictionTable.from_arrays(  # a frame number past int64 was pyarrow's ArrowInvalid
        ["v/99999999999999999999999.jpg"], [0.0], [0.0], np.full((1, 8), 0.125), np.zeros((1, 12))
    )
    with pytest.raises(SmoothingError, match="video"):
        smooth(huge, {"va": Kernel("box", 1)})
    with pytest.raises(SmoothingError, match=r"no column 'file' to group by"):
        smooth(t, {"va": Kernel("box", 1)}, group_by=("file", "face_id"))


def test_plan_reused_for_many_kernels_is_fast_path_equivalent():
    rng = np.random.default_rng(5)
    t = table(["a"] * 50, np.cumsum(rng.integers(1, 5, 50)), rng.normal(size=50))
    plan = make_plan(t)
    for k in (Kernel("box", 2), Kernel("gaussian", 4)):
        np.testing.assert_array_equal(smooth_values(plan, t.valence, k), smooth(t, {"va": k}).valence)


def test_causal_rows_of_the_same_frame_see_each_other():
    # two faces' rows merged into one group at the same frame are both "now": order must not matter
    t = table(["v"] * 3, [5, 5, 6], [0.0, 1.0, 0.5])
    out = smooth(t, {"va": Kernel("box", 2, causal=True)}).valence
    assert out[0] == pytest.approx(0.5) and out[1] == pytest.approx(0.5)
    assert out[2] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kernel",
    [Kernel("box", 3, unit="rows"), Kernel("gaussian", 2, unit="rows"), Kernel("box", 2, True, unit="rows")],
)
def test_row_units_take_the_annotated_rows_within_reach_weighted_by_frame_distance(kernel: Kernel):
    """The published rule: +-reach annotated rows of the same video, box or Gaussian in frame distance."""
    rng = np.random.default_rng(2)
    frames = np.concatenate([np.cumsum(rng.integers(1, 9, 30)), np.cumsum(rng.integers(1, 9, 25))])
    groups = np.r_[np.zeros(30, int), np.ones(25, int)]
    rank = np.r_[np.arange(30), np.arange(25)]  # position of each row within its video, by frame
    perm = rng.permutation(55)
    t = table([f"v{g}" for g in groups[perm]], frames[perm], rng.normal(size=55))
    got = smooth(t, {"va": kernel}).valence
    f, g, r, x = frames[perm].astype(float), groups[perm], rank[perm], t.valence
    want = np.empty(55)
    for i in range(55):
        d = f[i] - f
        w = kernel.weights(d) * (g == g[i]) * (np.abs(r - r[i]) <= kernel.reach)
        if kernel.causal:
            w = w * (d >= 0)
        want[i] = (w @ x) / w.sum()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    dense = table(["v"] * 40, np.arange(40), rng.normal(size=40))  # consecutive frames: units agree
    frames_kernel = Kernel(kernel.kind, kernel.width, kernel.causal)
    np.testing.assert_allclose(
        smooth(dense, {"va": kernel}).valence, smooth(dense, {"va": frames_kernel}).valence
    )
    assert "rows" in str(kernel) and Kernel(**kernel.to_dict()) == kernel


def test_tune_default_grid_spans_the_published_windows():
    from mtaffect.post.tune import SearchSpace

    spans = [k.span for k in SearchSpace().kernels() if not k.is_identity]
    assert min(spans) <= 5 and 380 <= max(spans) <= 401  # published choices: about 50-400 frames
    assert sum(50 <= s <= 400 for s in spans) >= 10
    assert {k.unit for k in SearchSpace(units=("frames", "rows")).kernels()} == {"frames", "rows"}
