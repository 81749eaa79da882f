"""The feature store reader: the documented on-disk format, O(batch) reads, clear errors."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from store_helpers import set_meta, write_store_by_hand

from mtaffect.features.store import FeatureStore, MissingImagesError, StoreError, partial_path


def make_store(path: Path, names: list[str], dim: int = 64, logits: int = 0, seed: int = 0) -> np.ndarray:
    """A store written by hand from the documented format (every 7th image failed); returns its features."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(len(names), dim)).astype(np.float16)
    valid = np.ones(len(names), dtype=bool)
    valid[::7] = False
    feats[~valid] = 0
    lg = rng.normal(size=(len(names), logits)).astype(np.float16) if logits else None
    write_store_by_hand(path, names, feats, logits=lg, valid=valid, reason="missing file")
    return feats


def names_of(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [f"v{int(v)}/{i:05d}.jpg" for i, v in enumerate(rng.integers(0, 50, n))]  # not sorted


def test_open_maps_arrays_and_reads_only_the_requested_rows(tmp_path):
    names = names_of(40_000)
    feats = make_store(tmp_path / "s", names)  # 5 MB of float16 features
    store = FeatureStore.open(tmp_path / "s")
    assert all(isinstance(a, np.memmap) for a in store._arrays.values())  # nothing loaded on open
    assert len(store) == 40_000 and store.feature_dim == 64 and store.num_logits == 0
    rows = np.random.default_rng(2).choice(len(names), 256, replace=False)
    tracemalloc.start()
    out = store.features(rows)
    valid = store.valid(rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * out.nbytes  # a batch, not the store (5 MB)
    assert out.dtype == np.float32 and type(out) is np.ndarray
    np.testing.assert_array_equal(out, feats[rows].astype(np.float32))
    np.testing.assert_array_equal(valid, rows % 7 != 0)
    np.testing.assert_array_equal(store.features(slice(10, 20)), feats[10:20].astype(np.float32))


def test_rows_by_name_and_missing_names(tmp_path):
    names = names_of(500)
    make_store(tmp_path / "s", names)
    store = FeatureStore.open(tmp_path / "s")
    pick = [names[17], names[3], names[499], names[0]]
    assert store.rows(pick).tolist() == [17, 3, 499, 0]
    assert store.rows([]).tolist() == []
    with pytest.raises(StoreError, match=r"2 of 3 images are not in .*zz/00001.jpg"):
        store.rows([names[1], "zz/00001.jpg", "zzz/00002.jpg"])


def test_check_compatible_names_both_backbones(tmp_path):
    make_store(tmp_path / "s", names_of(10))
    store = FeatureStore.open(tmp_path / "s")
    store.check_compatible("abc123")
    with pytest.raises(StoreError, match=r"'hand-made'.*abc123.*'dinov2-small'.*fff999"):
        store.check_compatible("fff999", name="dinov2-small")


def test_missing_arrays_and_failures(tmp_path):
    names = names_of(20)
    make_store(tmp_path / "s", names, logits=7)
    store = FeatureStore.open(tmp_path / "s")
    assert store.logits([0, 1]).shape == (2, 7) and not store.has_tokens
    with pytest.raises(StoreError, match="--tokens"):
        store.tokens([0])
    assert [img for img, _ in store.failures()] == names[::7] and store.num_failed == 3
    with pytest.raises(StoreError, match="out of range"):
        store.features([20])


def test_open_explains_what_is_wrong(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "nope")
    partial_path(tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="rerun the same extract command"):
        FeatureStore.open(tmp_path / "half")
    (tmp_path / "other").mkdir()
    with pytest.raises(StoreError, match=r"not a feature store \(no meta.json\)"):
        FeatureStore.open(tmp_path / "other")
    make_store(tmp_path / "s", names_of(10))
    meta = set_meta(tmp_path / "s", format_version=99)
    with pytest.raises(StoreError, match="upgrade mtaffect"):
        FeatureStore.open(tmp_path / "s")
    set_meta(tmp_path / "s", **meta)
    np.save(tmp_path / "s" / "features.npy", np.zeros((9, 64), np.float16))
    with pytest.raises(StoreError, match="damaged"):
        FeatureStore.open(tmp_path / "s")


def test_missing_images_error_is_a_key_error_listing_all(tmp_path):
    make_store(tmp_path / "s", names_of(5))
    with pytest.raises(KeyError) as info:
        FeatureStore.open(tmp_path / "s").rows(["x/00001.jpg", "y/00002.jpg"])
    assert isinstance(info.value, MissingImagesError) and info.value.missing == ["x/00001.jpg", "y/00002.jpg"]
    assert str(info.value).startswith("2 of 2 images")


def test_a_reordered_image_list_is_refused_on_open(tmp_path):
    """Rows are bound to names by images_sha256: an edited images.txt would mislabel every row."""
    import hashlib

    store = tmp_path / "s"
    make_store(store, names_of(10))
    text = (store / "images.txt").read_bytes()
    set_meta(store, images_sha256=hashlib.sha256(text).hexdigest())
    assert len(FeatureStore.open(store)) == 10
    lines = text.decode().splitlines()
    (store / "images.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(StoreError, match=r"images.txt does not match the images_sha256 .* wrong names"):
        FeatureStore.open(store)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arrays": {"features": [10, 64], "valid": [10], "evil": [1]}}, "arrays must map"),
        ({"arrays": {"features": [10, 64]}}, "arrays must map"),
        ({"arrays": {"features": "10x64", "valid": [10]}}, "arrays must map"),
        ({"counts": {"images": "ten", "failed": 0}}, "counts must hold"),
        ({"fingerprint": ["abc"]}, "fingerprint must be a str"),
        ({"format_version": [1]}, "format_version must be a positive integer"),
        ({"images_sha256": 12}, "images_sha256 must be a hex string"),
    ],
)
def test_damaged_meta_fields_are_named(tmp_path, changes, message):
    store = tmp_path / "s"
    make_store(store, names_of(10))
    set_meta(store, **changes)
    with pytest.raises(StoreError, match=rf"meta.json: {message}"):
        FeatureStore.open(store)
