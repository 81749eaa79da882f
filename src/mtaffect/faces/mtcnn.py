"""MTCNN face detector (Zhang et al. 2016) with its three nets in plain PyTorch, batched over frames.

Three cascaded nets: P-Net scans an image pyramid for 12x12 face windows, R-Net re-scores and refines
24x24 crops of the survivors, O-Net does the same on 48x48 crops and adds five landmarks. The weights
are the original authors' release as converted by facenet-pytorch (MIT), vendored as
``mtaffect/weights/mtcnn.safetensors`` and read with safetensors only.

This module is the PyTorch engine of the cascade: pyramid, boxes, NMS and crops live once, in numpy,
in :mod:`mtaffect.faces.cascade` (the onnxruntime engine in :mod:`mtaffect.runtime` shares them);
:class:`TorchNets` runs the nets and builds the pyramid with torch's uint8 bilinear kernel, which is
bit-identical to :func:`mtaffect.faces.cascade.resize_bilinear` and several times faster.

The dense layers of R-Net/O-Net expect features flattened in (W, H, C) order (a trace of the Caffe
nets, which were trained on transposed images). For speed on CPU the nets use a strided max-pool and
one matmul for P-Net's two 1x1 heads; under ONNX export they use the plain ops (same numbers), so the
exported graphs are standard. Forward passes are chunked so activations stay cache-sized. On a machine
whose cores are shared, OpenMP's spin-waiting can make multi-threaded torch many times slower: set
``OMP_WAIT_POLICY=PASSIVE`` or ``torch.set_num_threads(1)`` there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mtaffect.faces.cascade import (
    ONET_BYTES,
    PIXEL_MEAN,
    PIXEL_SCALE,
    PNET_BYTES_PER_PIXEL,
    RNET_BYTES,
    Cascade,
    FaceDetections,
    box_iou,
    chunk_items,
    chunks,
    nms,
)

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mtcnn.safetensors"

# ---- the three nets (layer names match the converted state dicts) --------------------------------------


def _face_prob(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """P(face) of a 2-way softmax, as a sigmoid of the logit difference (index 1 is 'face')."""
    return torch.sigmoid(logits.narrow(dim, 1, 1) - logits.narrow(dim, 0, 1)).squeeze(dim)


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    """Flatten (N, C, H, W) features in the (W, H, C) order the dense weights were trained with."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


def _strided(x: torch.Tensor, dim: int, start: int, count: int, stride: int) -> torch.Tensor:
    """View of ``count`` entries of ``x`` along ``dim`` (negative), from ``start`` every ``stride``."""
    return x.narrow(dim, start, (count - 1) * stride + 1)[
        (slice(None),) * (x.ndim + dim) + (slice(None, None, stride),)
    ]


def _pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k / 2 ceil-mode max pooling: the fast strided form, or the plain op while exporting to ONNX."""
    if torch.onnx.is_in_onnx_export():
        return F.max_pool2d(x, k, 2, ceil_mode=True)
    return _max_pool(x, k)


def _max_pool(x: torch.Tensor, k: int, stride: int = 2) -> torch.Tensor:
    """k x k max pooling with ceil mode (as the Caffe nets), from strided maxima, one axis at a time.

    Windows running past the edge just have fewer members, so nothing is padded; several times faster
    than ``F.max_pool2d`` on CPU for these small kernels, and bit-identical.
    """
    cl = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    for dim in (-1, -2):
        n = x.shape[dim]
        n_out = -(-(n - k) // stride) + 1
        counts = [min(n_out, (n - 1 - i) // stride + 1) for i in range(k)]  # members at offset i
        shape = list(x.shape)
        shape[dim] = n_out
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        head = out.narrow(dim, 0, counts[1])
        torch.maximum(
            _strided(x, dim, 0, counts[1], stride), _strided(x, dim, 1, counts[1], stride), out=head
        )
        if counts[1] < n_out:  # the last window holds only offset 0
            out.narrow(dim, counts[1], n_out - counts[1]).copy_(
                _strided(x, dim, counts[1] * stride, n_out - counts[1], stride)
            )
        for i in range(2, k):
            dst = out.narrow(dim, 0, counts[i])
            torch.maximum(dst, _strided(x, dim, i, counts[i], stride), out=dst)
        x = out
    return x


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised -> P(face) (N, h, w) and box offsets (N, 4, h, w)."""
        x = _pool(self.prelu1(self.conv1(x)), 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        if torch.onnx.is_in_onnx_export():  # standard ops, the same numbers
            return _face_prob(self.conv4_1(x)), self.conv4_2(x)
        # The two 1x1 heads as one matmul over pixels: torch sends 1x1 convs with 2-4 outputs to its slow
        # reference kernel on CPU.
        n, c, h, w = x.shape
        weight = torch.cat([self.conv4_1.weight, self.conv4_2.weight]).view(6, c)
        b1, b2 = self.conv4_1.bias, self.conv4_2.bias
        assert b1 is not None and b2 is not None  # built with bias=True
        bias = torch.cat([b1, b2])
        y = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.t()).view(n, h, w, 6)
        return torch.sigmoid(y[..., 1] - y[..., 0]), y[..., 2:].permute(0, 3, 1, 2)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _pool(self.prelu1(self.conv1(x)), 3)
        x = _pool(self.prelu2(self.conv2(x)), 3)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_whc(x)))
        return _face_prob(self.dense5_1(x)), self.dense5_2(x)  # (N,), (N, 4)


class ONet(nn.Module):
    """Output net on 48x48 crops: score, box offsets and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _pool(self.prelu1(self.conv1(x)), 3)
        x = _pool(self.prelu2(self.conv2(x)), 3)
        x = _pool(self.prelu3(self.conv3(x)), 2)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_whc(x)))
        return _face_prob(self.dense6_1(x)), self.dense6_2(x), self.dense6_3(x)  # (N,), (N, 4), (N, 10)


# ---- the engine ----------------------------------------------------------------------------------------


def load_mtcnn_nets(path: str | Path | None = None) -> tuple[PNet, RNet, ONet]:
    """The three nets with weights from a safetensors file (None: the vendored ones), in eval mode."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"MTCNN weights not found: {path}; reinstall mtaffect or pass weights=")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    nets = PNet(), RNet(), ONet()
    for name, net in zip(("pnet", "rnet", "onet"), nets, strict=True):
        sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        expected = net.state_dict()
        missing = sorted(set(expected) - set(sub))
        unexpected = sorted(set(sub) - set(expected))
        wrong = sorted(k for k in set(sub) & set(expected) if sub[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path}: not MTCNN weights for {name} (missing {missing}, unexpected {unexpected}, "
                f"wrong shape {wrong}); regenerate with scripts/convert_mtcnn_weights.py"
            )
        net.load_state_dict(sub)
        net.eval().requires_grad_(False)
    return nets


class TorchNets:
    """The cascade's nets run by PyTorch on ``device`` (see :class:`mtaffect.faces.cascade.CascadeNets`)."""

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None) -> None:
        self.device = torch.device(device)
        self.weights = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        self.p, self.r, self.o = (net.to(self.device) for net in load_mtcnn_nets(self.weights))

    def _chunk(self, bytes_per_item: int) -> int:
        """Items per forward pass: on CPU :func:`~mtaffect.faces.cascade.chunk_items`; accelerators take
        everything in one pass."""
        if self.device.type != "cpu":
            return 1 << 30
        return chunk_items(bytes_per_item)

    def pnet(
        self, frames: np.ndarray, sizes: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per level: resize with torch's uint8 bilinear kernel on CPU (its fast path, bit-identical to
        :func:`~mtaffect.faces.cascade.resize_bilinear`), normalise, P-Net. Accelerators resize floats."""
        # (B, 3, H, W) uint8 with channels-last strides: a free view of the (B, H, W, 3) frames.
        x = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2)
        src = x if x.device.type == "cpu" else x.float()
        for hs, ws in sizes:
            with torch.inference_mode():
                img = F.interpolate(src, size=(hs, ws), mode="bilinear", align_corners=False)
                probs, regs = [], []
                for sl in chunks(len(img), self._chunk(PNET_BYTES_PER_PIXEL * (hs - 2) * (ws - 2))):
                    prob, reg = self.p((img[sl].float() - PIXEL_MEAN).mul_(PIXEL_SCALE))
                    probs.append(prob)
                    regs.append(reg)
                prob, reg = torch.cat(probs), torch.cat(regs)
            yield prob.float().cpu().numpy(), reg.float().cpu().numpy()

    @torch.inference_mode()
    def _run(self, net: nn.Module, crops: np.ndarray, bytes_per_item: int) -> tuple[np.ndarray, ...]:
        """``net``'s outputs over ``crops``, in passes that fit; one array per output."""
        x = torch.from_numpy(crops).to(self.device)  # (K, 3, s, s) view of (K, s, s, 3): channels-last
        outs = [net(x[sl]) for sl in chunks(len(x), self._chunk(bytes_per_item))]
        return tuple(torch.cat(t).float().cpu().numpy() for t in zip(*outs, strict=True))

    def rnet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prob, reg = self._run(self.r, crops, RNET_BYTES)
        return prob, reg

    def onet(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prob, reg, points = self._run(self.o, crops, ONET_BYTES)
        return prob, reg, points


class MTCNN(Cascade):
    """Multi-task cascaded face detector with five landmarks, run by PyTorch; ``detect(images)``.

    ``min_face_size`` (pixels) sets the finest pyramid level: raising it to 40 cuts P-Net work about
    four-fold. ``thresholds`` are the P-, R- and O-Net face probabilities a window must reach.
    ``batch_size`` caps how many same-sized frames share one pass (it bounds memory).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: float = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        weights: str | Path | None = None,
        batch_size: int = 32,
    ) -> None:
        nets = TorchNets(device, weights)
        super().__init__(nets, min_face_size, thresholds, factor, batch_size)
        self.device = nets.device
        self.weights = nets.weights
        self.pnet, self.rnet, self.onet = nets.p, nets.r, nets.o


__all__ = ["DEFAULT_WEIGHTS", "MTCNN", "FaceDetections", "TorchNets", "box_iou", "load_mtcnn_nets", "nms"]
