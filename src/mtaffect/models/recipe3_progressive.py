"""Recipe 3: progressive learning (Liu et al.; ABAW7 first place), in two variants.

``variant: frozen`` (the default; the cheap version, one model over one frozen feature): stage 1 trains
one small model per task (AU, EXPR, VA) on the shared backbone features, each on its own task. Stage 2
freezes them and trains the joint model: the Feature Fusion Module sums the projected backbone feature
with the task-specific features of ``fusion_tasks`` (any subset), then Linear-ReLU-Dropout(0.3)-Linear,
an optional Temporal Convergence Module over windows of consecutive frames (``temporal``: none,
transformer, lstm, tcn), and per-task heads (VA with tanh).

Which path ``forward`` returns follows the stage contract of :class:`~mtaffect.models.base.Stage`:
while the joint part is frozen and a task model trains (stage 1), the outputs are the task models'
own predictions (so each task model learns from its own loss, and validation scores the stage-1
models); otherwise (stage 2, inference, a fresh model) they come from the joint model.

``variant: published`` is the *enhanced model* of the published method: its task features are not
learned here but read as inputs ``features@<task>`` (each task model's fine-tuned backbone features,
exported into a store; :mod:`mtaffect.train.pipeline` builds the whole method). The backbone feature
(the backbone in the loop, fine-tuned again) is summed with the task features of ``fusion_tasks``
(a Linear maps a task feature to the backbone's size only where they differ), then
Linear-ReLU-Dropout(``dropout``)-Linear, LeakyReLU(0.1), the optional temporal module (LSTM hidden =
``dim``, 2 layers; transformer 2 layers x 4 heads; TCN) and the heads (AU 12, EXPR 8, VA tanh). One
stage trains everything; ``trainer.tasks`` chooses the losses. With ``fusion_tasks: []`` it is a task
model's head (the backbone feature alone through the same layers).

``peer: true`` (published variant only; ``configs/progressive_published.yaml`` sets it) builds the
layers exactly as the peer's code (YenanLiu/ABAW7th ``models/combine_fea_model.py``) does: a task model
(``fusion_tasks: []``) is linear heads on the backbone feature (no fusion MLP); LeakyReLU(0.1) only in
front of a temporal module; the LSTM a bare 2-layer ``nn.LSTM`` (hidden = ``dim``, no residual, no
dropout). Without it (the default, so checkpoints saved before it load unchanged) the layers are as
above. ``windowed: true`` makes the training loop feed windows of ``data.window`` frames even without a
temporal module (the peer's EXPR model: batches of 8 windows of 5 frames, each frame scored alone).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mtaffect.models.base import TASKS, MTLModel, Stage
from mtaffect.models.blocks import (
    TEMPORAL_KINDS,
    PlainLSTM,
    create_temporal,
    flatten_leading,
    require_input,
    unflatten_leading,
)
from mtaffect.models.registry import register_model
from mtaffect.schema import NUM_AUS, NUM_EXPR

TASK_OUT: dict[str, int] = {"au": NUM_AUS, "expr": NUM_EXPR, "va": 2}
VARIANTS: tuple[str, ...] = ("frozen", "published")


def _head(task: str, dim: int) -> nn.Module:
    linear = nn.Linear(dim, TASK_OUT[task])
    return nn.Sequential(linear, nn.Tanh()) if task == "va" else linear


class TaskModel(nn.Module):
    """Stage-1 single-task model: an MLP encoder (its output is the task-specific feature) + a head.

    Without ``head`` (non-progressive ablation: everything trained jointly) only the encoder exists,
    so no parameter is left without a gradient.
    """

    def __init__(self, task: str, in_dim: int, dim: int, dropout: float, head: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.ReLU()
        )
        self.head = _head(task, dim) if head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feat = self.encoder(x)
        return feat, self.head(feat) if self.head is not None else None


def _task_tuple(tasks: Sequence[str] | str) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or len(set(tasks)) != len(tasks):
        raise ValueError(f"fusion_tasks must be distinct names among {TASKS}, got {list(tasks)}")
    return tuple(t for t in TASKS if t in tasks)  # canonical order


@register_model("progressive")
class ProgressiveMTL(MTLModel):
    """Task models -> feature fusion -> optional temporal module -> per-task heads."""

    recipe = "progressive"
    inputs: tuple[str, ...] = ("features",)

    def __init__(
        self,
        feature_dim: int,
        num_logits: int = 0,
        token_shape: Sequence[int] | None = None,
        fusion_tasks: Sequence[str] = TASKS,
        temporal: str = "none",
        dim: int = 256,
        task_dim: int = 256,
        dropout: float = 0.3,
        task_dropout: float = 0.1,
        temporal_kwargs: Mapping | None = None,
        progressive: bool = True,
        variant: str = "frozen",
        input_dims: Mapping[str, int] | None = None,
        peer: bool = False,
        windowed: bool = False,
    ) -> None:
        super().__init__()
        if temporal not in TEMPORAL_KINDS:
            raise ValueError(f"temporal must be one of {TEMPORAL_KINDS}, got {temporal!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if (peer or windowed) and variant != "published":
            raise ValueError("peer and windowed apply to variant published (the enhanced and task models)")
        self.variant, self.peer, self.windowed = variant, bool(peer), bool(windowed)
        self.feature_dim, self.num_logits = int(feature_dim), int(num_logits)
        self.token_shape = tuple(token_shape) if token_shape is not None else None
        self.fusion_tasks = _task_tuple(fusion_tasks)
        self.temporal_kind = temporal
        self.temporal = temporal != "none" or self.windowed  # the training loop reads this to build windows
        self.dim, self.task_dim, self.dropout, self.task_dropout = dim, task_dim, dropout, task_dropout
        self.temporal_kwargs = dict(temporal_kwargs or {})
        self.progressive = progressive
        defaults = {"transformer": {"layers": 2, "heads": 4}, "lstm": {"layers": 2}}.get(temporal, {})
        if variant == "published":
            self._build_published(dict(input_dims or {}), defaults)
            return
        self.input_dims: dict[str, int] = {}
        for t in self.fusion_tasks:  # attributes task_au, task_expr, task_va: what stage 1 names
            self.add_module(f"task_{t}", TaskModel(t, self.feature_dim, task_dim, task_dropout, progressive))
        # Feature Fusion Module: projected backbone feature + projected task features, then an MLP
        self.proj = nn.ModuleDict({"features": nn.Linear(self.feature_dim, dim)})
        for t in self.fusion_tasks:
            self.proj[t] = nn.Linear(task_dim, dim) if task_dim != dim else nn.Identity()
        self.fusion: nn.Module = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.temporal_net = create_temporal(temporal, dim, **{**defaults, **self.temporal_kwargs})
        self.heads = nn.ModuleDict({t: _head(t, dim) for t in TASKS})

    def _build_published(self, input_dims: dict[str, int], temporal_defaults: dict) -> None:
        """The enhanced model: backbone feature + exported task features -> fusion -> temporal -> heads."""
        names = [f"features@{t}" for t in self.fusion_tasks]
        missing = [n for n in names if n not in input_dims]
        if missing:
            raise ValueError(
                f"variant published fuses {names} but has no size for {missing}: give the stores "
                "exported from those task models (--features au=STORE ...; the pipeline does it)"
            )
        self.input_dims = {n: int(input_dims[n]) for n in names}
        self.inputs = ("features", *names)
        d = self.feature_dim
        self.proj = nn.ModuleDict(
            {
                t: nn.Identity()
                if self.input_dims[f"features@{t}"] == d
                else nn.Linear(self.input_dims[f"features@{t}"], d)
                for t in self.fusion_tasks
            }
        )
        if self.peer:
            self._build_peer(temporal_defaults)
            return
        self.fusion = nn.Sequential(
            nn.Linear(d, self.dim),
            nn.ReLU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.dim, self.dim),
            nn.LeakyReLU(0.1),
        )
        self.temporal_net = create_temporal(
            self.temporal_kind, self.dim, **{**temporal_defaults, **self.temporal_kwargs}
        )
        self.heads = nn.ModuleDict({t: _head(t, self.dim) for t in TASKS})

    def _build_peer(self, temporal_defaults: dict) -> None:
        """The peer's layers (see the module docstring): fusion MLP only over fused task features, the
        activation only before a temporal module, a bare LSTM, linear heads (VA with tanh)."""
        d = self.feature_dim
        if self.fusion_tasks:
            self.fusion = nn.Sequential(
                nn.Linear(d, self.dim), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.dim, self.dim)
            )
            width = self.dim
        else:  # a task model: the heads read the backbone feature
            self.fusion = nn.Identity()
            width = d
        kind = self.temporal_kind
        self.act = nn.LeakyReLU(0.1) if kind != "none" else nn.Identity()
        kw = {**temporal_defaults, **self.temporal_kwargs}
        if kind == "lstm":
            self.temporal_net = PlainLSTM(width, layers=int(kw.get("layers", 2)), hidden=kw.get("hidden"))
            width = self.temporal_net.hidden
        else:
            self.temporal_net = create_temporal(kind, width, **kw)
        self.heads = nn.ModuleDict({t: _head(t, width) for t in TASKS})

    def config(self) -> dict:
        out = {
            "feature_dim": self.feature_dim,
            "num_logits": self.num_logits,
            "token_shape": list(self.token_shape) if self.token_shape is not None else None,
            "fusion_tasks": list(self.fusion_tasks),
            "temporal": self.temporal_kind,
            "dim": self.dim,
            "task_dim": self.task_dim,
            "dropout": self.dropout,
            "task_dropout": self.task_dropout,
            "temporal_kwargs": dict(self.temporal_kwargs),
            "progressive": self.progressive,
        }
        if self.variant != "frozen":  # checkpoints of the frozen variant read as before
            out.update(variant=self.variant, input_dims=dict(self.input_dims))
            out.update({k: True for k in ("peer", "windowed") if getattr(self, k)})  # older: as before
        return out

    def stages(self) -> list[Stage]:
        joint_modules = ("proj", "fusion", "temporal_net", "heads")
        if not self.progressive or self.variant == "published":
            return [Stage("joint")]
        stage1 = [Stage(f"task_{t}", tasks=(t,), train_modules=(f"task_{t}",)) for t in self.fusion_tasks]
        return [*stage1, Stage("joint", tasks=TASKS, train_modules=joint_modules)]

    def in_stage1(self) -> bool:
        """True while the joint part is frozen and a task model trains (stage 1 of the contract)."""
        if self.variant == "published":
            return False
        joint_frozen = not any(
            p.requires_grad for m in (self.proj, self.fusion, self.heads) for p in m.parameters()
        )
        task_trains = any(p.requires_grad for m in self.task_models().values() for p in m.parameters())
        return joint_frozen and task_trains

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = require_input(batch, "features", self.recipe, (self.feature_dim,))
        single_step = self.temporal and x.ndim == 2  # (N, D) rows: windows of one frame
        if single_step:
            x = x.unsqueeze(1)
        flat, lead = flatten_leading(x, 1)
        if self.variant == "published":  # the backbone feature + the exported task features
            fused = self._fuse_published(batch, flat, single_step)
        else:
            task_out = {t: m(flat) for t, m in self.task_models().items()}
            if self.progressive and self.in_stage1():
                out = {t: task_out[t][1] if t in task_out else self._zeros(flat, t) for t in TASKS}
                return _unflatten(out, lead, single_step)
            fused = self.proj["features"](flat)
            for t, (feat, _) in task_out.items():
                fused = fused + self.proj[t](feat)
        h = unflatten_leading(self.fusion(fused), lead)
        if self.peer:
            h = self.act(h)
        if self.temporal:
            h = self.temporal_net(h)
        h, _ = flatten_leading(h, 1)
        return _unflatten({t: head(h) for t, head in self.heads.items()}, lead, single_step)

    def _fuse_published(
        self, batch: Mapping[str, torch.Tensor], flat: torch.Tensor, single_step: bool
    ) -> torch.Tensor:
        fused = flat
        for t in self.fusion_tasks:
            name = f"features@{t}"
            f = require_input(batch, name, self.recipe, (self.input_dims[name],))
            if single_step:
                f = f.unsqueeze(1)
            fused = fused + self.proj[t](flatten_leading(f, 1)[0])
        return fused

    def task_models(self) -> dict[str, TaskModel]:
        """The stage-1 model of each fused task, by task name (none in the published variant)."""
        if self.variant == "published":
            return {}
        return {t: getattr(self, f"task_{t}") for t in self.fusion_tasks}

    @staticmethod
    def _zeros(like: torch.Tensor, task: str) -> torch.Tensor:
        """Neutral output for a task with no stage-1 model (only seen while another task trains)."""
        return like.new_zeros(like.shape[0], TASK_OUT[task])


def _unflatten(out: dict[str, torch.Tensor], lead: tuple, single_step: bool) -> dict[str, torch.Tensor]:
    """Per-row outputs back to the input's leading shape (single-step windows without their time axis)."""
    out = {t: unflatten_leading(v, lead) for t, v in out.items()}
    return {t: v.squeeze(1) for t, v in out.items()} if single_step else out


def search_space(temporal: Sequence[str] = TEMPORAL_KINDS, min_tasks: int = 1) -> list[dict]:
    """Config overrides for ``mtaffect search``: every fusion task subset x every temporal module.

    The published strategy search compared task combinations in the fusion module and temporal
    modules; each entry is a dict of constructor overrides, e.g. ``{"fusion_tasks": ["au", "va"],
    "temporal": "lstm"}``.
    """
    for kind in temporal:
        if kind not in TEMPORAL_KINDS:
            raise ValueError(f"unknown temporal module {kind!r}; choose among {TEMPORAL_KINDS}")
    subsets = [
        list(c) for r in range(max(min_tasks, 0), len(TASKS) + 1) for c in itertools.combinations(TASKS, r)
    ]
    return [{"fusion_tasks": s, "temporal": k} for s in subsets for k in temporal]
