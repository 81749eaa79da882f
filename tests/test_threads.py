"""The predictor sets torch's thread count for its own calls only, and gives the caller's value back."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mtaffect.predict.threads import resolve_threads, streaming_threads, torch_threads


def test_auto_is_every_core_but_one_and_bad_values_say_what_to_pass():
    assert resolve_threads("auto") == streaming_threads() == max(1, (os.cpu_count() or 1) - 1)
    assert resolve_threads(3) == 3 and resolve_threads(None) is None
    for bad in (0, -2, "many", 1.5, True):
        with pytest.raises(ValueError, match="num_threads"):
            resolve_threads(bad)


def test_torch_threads_restores_the_callers_setting_even_on_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError), torch_threads(target):
        assert torch.get_num_threads() == target
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_predictor_uses_its_threads_while_it_runs_only():
    pytest.importorskip("skimage")
    from mtaffect.predict import demo_media
    from mtaffect.predict.pipeline import Predictor

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    p = Predictor(num_threads=want)
    seen = []
    run = p._process_chunk

    def spy(*args):
        seen.append(torch.get_num_threads())
        return run(*args)

    p._process_chunk = spy
    df = p.predict(np.stack(list(demo_media.frames(2, faces=1))))
    assert (df["success"] == 1).sum() == 2
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == before  # the caller's setting is back
    assert Predictor(num_threads=None).num_threads is None
