"""InputSource: float16 batches from the memory-mapped store, a rank's share only, worker pickling;
and one training run reading that way gives the in-memory run's result."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from store_helpers import write_store_by_hand
from test_train import cfg, dataset  # noqa: F401  (fixture)

from mtaffect.features.reader import FailedImagesError, InputSource, check_valid
from mtaffect.features.store import FeatureStore


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    names = [f"v/{i:05d}.jpg" for i in range(1, 41)]
    feats = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float16)
    valid = np.ones(40, dtype=bool)
    valid[7] = False
    write_store_by_hand(tmp_path / "s", names, feats, logits=feats[:, :3] * 2, valid=valid)
    return FeatureStore.open(tmp_path / "s")


def test_memory_mapped_batches_are_float16_in_request_order(store):
    rows = np.arange(40)[::-1].copy()
    src = InputSource(store, rows, ("features", "logits"), in_memory=False)
    pos = np.array([[3, 1, 1], [0, 39, 2]])
    got = src.get(pos)
    assert got["features"].dtype == torch.float16 and got["features"].shape == (2, 3, 6)
    want = store._arrays["features"][rows[pos]]
    assert np.array_equal(got["features"].numpy(), want)  # no float32 copy, exact values
    ram = InputSource(store, rows, ("features",), in_memory=True)
    assert ram.get(pos)["features"].dtype == torch.float32
    assert torch.equal(ram.get(pos)["features"], got["features"].float())


def test_a_share_holds_only_its_rows_and_pickles_as_the_store_path(store):
    src = InputSource(store, np.arange(40), ("features",), in_memory=True, keep=np.arange(0, 40, 2))
    assert len(src.held_rows) == 20 and src.get(np.array([4, 6]))["features"].shape == (2, 6)
    with pytest.raises(IndexError, match="not in this source's share"):
        src.get(np.array([3]))
    mapped = InputSource(store, np.arange(40), ("features",), in_memory=False)
    blob = pickle.dumps(mapped)
    assert len(blob) < 4096  # the path, not the arrays
    again = pickle.loads(blob)
    assert torch.equal(again.get(np.array([5]))["features"], mapped.get(np.array([5]))["features"])


def test_failed_images_are_counted_and_named(store):
    names = store.images[:10]
    with pytest.raises(FailedImagesError, match=r"1 of 10 images failed extraction .*v/00008.jpg") as err:
        check_valid(store, store.rows(names), names)
    assert err.value.images == ["v/00008.jpg"]
    assert check_valid(store, store.rows(names), names, allow_missing=True).tolist() == [True] * 7 + [
        False,
        True,
        True,
    ]


@pytest.mark.slow
def test_training_from_the_memory_mapped_store_in_workers_matches_the_main_process(dataset, tmp_path):  # noqa: F811
    from mtaffect.train.fit import fit

    path, train, val = dataset

    def run(**data):
        return fit(cfg(trainer={"epochs": 2}, data=data), path, train, val, log=None)

    workers, main, ram = run(in_memory=False, workers=1), run(in_memory=False, workers=0), run()
    assert workers.rows["in_memory"] is False and ram.rows["in_memory"] is True
    assert workers.P == main.P  # prefetching in a worker process changes nothing
    assert abs(workers.P - ram.P) < 0.05  # same data; memory-mapped batches are read in row order
