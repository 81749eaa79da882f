"""The onnxruntime engine runs without torch: in a subprocess where torch cannot be imported, it detects,
aligns and predicts a synthetic face exactly as the PyTorch pipeline does, importing nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from model_helpers import torch_path
from no_torch import BLOCK_TORCH

pytest.importorskip("onnxscript")

from mtaffect.data.synth_faces import FaceIdentity, render_face
from mtaffect.faces import MTCNN
from mtaffect.faces.align import align_faces_fast
from mtaffect.features.decode import resize_array
from mtaffect.models.default import DefaultAffectModel

#: What the runtime must not pull in (a minimal install has none of them).
HEAVY = {
    "torch",
    "lightning",
    "pandas",
    "pyarrow",
    "matplotlib",
    "transformers",
    "onnx",
    "onnxscript",
    "safetensors",
    "typer",
    "rich",
    "yaml",
    "scipy",
    "skimage",
    "av",
}

SCRIPT = BLOCK_TORCH + textwrap.dedent(
    """
    import json
    import numpy as np
    from mtaffect.data.synth_faces import FaceIdentity, render_face
    from mtaffect.runtime import load

    rng = np.random.default_rng(3)
    canvas = np.full((240, 320, 3), 90, np.uint8)
    canvas[60:172, 100:212] = render_face(rng.uniform(0, 0.5, 12), FaceIdentity.sample(rng, size=112), rng)
    rt = load(sys.argv[1], precision="float32", threads=1)
    found, probs = rt.analyse(canvas)
    print(json.dumps({
        "boxes": found.boxes.tolist(), "landmarks": found.landmarks.tolist(),
        "expr": probs.expr_probs.tolist(), "au": probs.au_probs.tolist(), "va": probs.va.tolist(),
        "modules": sorted({m.split(".")[0] for m in sys.modules}),
    }))
    """
)


@pytest.mark.usefixtures("torch_one_thread")
def test_runtime_detects_and_predicts_without_torch(default_export, tmp_path):
    folder, _ = default_export
    script = tmp_path / "no_torch.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not HEAVY & set(got["modules"]), HEAVY & set(got["modules"])

    # The same image through the PyTorch pipeline.
    rng = np.random.default_rng(3)
    canvas = np.full((240, 320, 3), 90, np.uint8)
    canvas[60:172, 100:212] = render_face(rng.uniform(0, 0.5, 12), FaceIdentity.sample(rng, size=112), rng)
    (det,) = MTCNN().detect(canvas)
    assert len(det) == 1 == len(got["boxes"])
    np.testing.assert_allclose(got["boxes"], det.boxes, atol=1e-3)
    np.testing.assert_allclose(got["landmarks"], det.landmarks, atol=1e-3)
    faces = np.stack([resize_array(f, 64, "L") for f in align_faces_fast(canvas, det.landmarks)])
    want, _ = torch_path(DefaultAffectModel(), faces)
    np.testing.assert_allclose(got["expr"], want.expr_probs, atol=1e-4)
    np.testing.assert_allclose(got["au"], want.au_probs, atol=1e-4)
    np.testing.assert_allclose(got["va"], want.va, atol=1e-4)


def test_a_missing_execution_provider_is_a_clear_error(default_export):
    from mtaffect.runtime import Runtime

    folder, _ = default_export
    with pytest.raises(ValueError, match="no NoSuchExecutionProvider"):
        Runtime(folder, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Runtime(folder, threads=0)
