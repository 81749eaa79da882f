"""The numpy MTCNN cascade: its pyramid is torch's bit for bit, mips are exact, and the cascade over numpy
pixels detects exactly what the torch engine (which resizes with torch's kernel) detects."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtaffect.faces.cascade import Cascade, _half, resize_bilinear
from mtaffect.faces.mtcnn import MTCNN, TorchNets

skimage_data = pytest.importorskip("skimage.data")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: torch's uint8 bilinear kernel is the int16 one on these CPUs (elsewhere a float fallback).
_EXACT_KERNEL = platform.machine().lower() in (
    "arm64",
    "aarch64",
) or torch.backends.cpu.get_cpu_capability() in (
    "AVX2",
    "AVX512",
)


@pytest.mark.skipif(not _EXACT_KERNEL, reason="torch uses its float fallback for uint8 resizing here")
def test_resize_bilinear_is_torchs_uint8_kernel_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(5, 300, 2)
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        size = (int(rng.integers(1, 2 * h)), int(rng.integers(1, 2 * w)))  # down- and up-scaling
        want = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=size, mode="bilinear")
        np.testing.assert_array_equal(resize_bilinear(images, size), want.permute(0, 2, 3, 1).numpy())


def test_half_is_the_rounded_2x2_mean():
    x = np.random.default_rng(1).integers(0, 256, (3, 9, 12, 3), dtype=np.uint8)
    blocks = x[:, :8, :12].reshape(3, 4, 2, 6, 2, 3).astype(int).sum((2, 4))
    np.testing.assert_array_equal(_half(x), (blocks + 2) // 4)


class _NumpyPyramid(TorchNets):
    """The torch nets on the pyramid of :func:`resize_bilinear` instead of torch's own resize."""

    def pnet(self, frames, sizes):
        for size in sizes:
            x = resize_bilinear(frames, size).astype(np.float32).transpose(0, 3, 1, 2)
            with torch.inference_mode():
                prob, reg = self.p(torch.from_numpy((x - 127.5) / 128))
            yield prob.numpy(), reg.numpy()


@pytest.mark.skipif(not _EXACT_KERNEL, reason="torch uses its float fallback for uint8 resizing here")
def test_the_torch_engine_sees_the_shared_pyramid():
    img = skimage_data.astronaut()
    frames = [img, np.ascontiguousarray(img[40:400, 60:470])]
    (want, want_crop) = MTCNN().detect(frames)
    got, got_crop = Cascade(_NumpyPyramid()).detect(frames)
    for a, b in ((got, want), (got_crop, want_crop)):
        assert len(a) == len(b) >= 1
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


class _Saturating(TorchNets):
    """The torch nets with O-Net's near-certain probabilities rounded as a float32 sigmoid saturates:
    1.0 (torch), or, for the windows in ``below``, the float just under it (onnxruntime's rounding)."""

    def __init__(self, below: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.below = below

    def onet(self, crops):
        prob, reg, marks = super().onet(crops)
        prob = np.where(prob > 0.99, np.float32(1.0), prob)
        prob[[i for i in self.below if i < len(prob)]] = np.nextafter(np.float32(1), np.float32(0))
        return prob, reg, marks


def test_a_saturated_probability_does_not_decide_which_box_wins():
    """O-Net scores every window on the astronaut's face above 0.99: saturated, each engine rounds them
    its own way (1.0 vs 0.99999994). Ranked on the raw probability, the window rounded down lost to
    another and the face box moved by pixels; ranked on the capped probability both keep the same box."""
    img = skimage_data.astronaut()
    (ref,) = Cascade(_Saturating()).detect(img)
    for below in ((0,), (0, 1), (1, 2)):
        (got,) = Cascade(_Saturating(below)).detect(img)
        assert len(got) == len(ref) == 1
        np.testing.assert_allclose(got.boxes, ref.boxes, atol=1e-4)
        np.testing.assert_allclose(got.landmarks, ref.landmarks, atol=1e-4)
