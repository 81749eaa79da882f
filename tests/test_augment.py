"""Training augmentation: the published presets, per-op overrides, seeding, one transform per window."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("kornia")

from mtaffect.train.images.augment import Augmenter, AugmentError, batch_seed, resolve_ops


def test_presets_are_the_published_lists():
    li = dict(resolve_ops("li2024"))
    assert list(li) == ["color_jitter", "hflip"]
    assert li["color_jitter"] == {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}
    assert li["hflip"] == {"p": 0.5}
    liu = dict(resolve_ops("liu2024"))
    assert list(liu) == ["hflip", "resized_crop", "rotation", "color_jitter", "affine"]
    assert liu["resized_crop"]["scale"] == [0.8, 1.0] and liu["rotation"] == {"degrees": 10.0, "p": 1.0}
    assert liu["color_jitter"] == {
        "brightness": 0.2,
        "contrast": 0.2,
        "saturation": 0.2,
        "hue": 0.1,
        "p": 1.0,
    }
    assert liu["affine"] == {"degrees": 10.0, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "p": 1.0}
    assert resolve_ops("none") == []


def test_overrides_change_add_and_remove_ops_and_bad_ones_are_named():
    ops = dict(
        resolve_ops("li2024", {"color_jitter": {"brightness": 0.1}, "hflip": False, "rotation": {"p": 0.5}})
    )
    assert ops["color_jitter"]["brightness"] == 0.1 and ops["color_jitter"]["hue"] == 0.1
    assert "hflip" not in ops and ops["rotation"] == {"degrees": 10.0, "p": 0.5}
    with pytest.raises(AugmentError, match="unknown op 'blur'"):
        resolve_ops("none", {"blur": {}})
    with pytest.raises(AugmentError, match=r"color_jitter: unknown parameter\(s\) \['gamma'\]"):
        resolve_ops("none", {"color_jitter": {"gamma": 1}})
    with pytest.raises(AugmentError, match=r"hflip.p must be in \[0, 1\]"):
        resolve_ops("none", {"hflip": {"p": 2}})
    with pytest.raises(AugmentError, match="preset 'strong' is unknown"):
        resolve_ops("strong")


def _windows(b: int = 6, t: int = 4, c: int = 3, s: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 1, c, s, s, generator=g).expand(b, t, c, s, s).contiguous()


def test_reproducible_under_the_seed_and_one_transform_per_window():
    aug = Augmenter(resolve_ops("liu2024"), size=24, channels=3)
    x = _windows()
    a, b, c = aug(x, seed=7), aug(x, seed=7), aug(x, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(123)  # the global random state plays no part
    assert torch.equal(aug(x, seed=7), a)
    # identical frames stay identical within each window; windows differ from their input
    assert torch.equal(a, a[:, :1].expand_as(a)) and not torch.equal(a, x)
    rows = aug(x[:, 0], seed=7)  # rows are windows of one frame
    assert rows.shape == x[:, 0].shape
    assert batch_seed(0, 1, 2, 0, 5) != batch_seed(0, 1, 2, 1, 5)  # ranks draw different transforms


def test_none_is_the_identity_and_greyscale_jitter_works():
    x = _windows(c=1)
    assert torch.equal(Augmenter(resolve_ops("none"), 24, 1)(x, seed=0), x)
    grey = Augmenter(resolve_ops("li2024"), 24, 1)(x, seed=0)  # saturation/hue are dropped for 1 channel
    assert grey.shape == x.shape and float(grey.min()) >= 0 and float(grey.max()) <= 1
