"""Masked task losses against hand-computed values; empty tasks give 0; task weights reach the gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtaffect.metrics import ccc
from mtaffect.models.losses import (
    LossConfig,
    MTLLoss,
    au_bce_loss,
    au_occurrence_weight,
    au_pos_weight,
    au_wal_loss,
    ccc_torch,
    expr_ce_loss,
    expr_class_weights,
    va_ccc_loss,
)

LN2 = math.log(2.0)


def test_au_bce_uses_only_labelled_entries_and_pos_weight():
    logits = torch.zeros(2, 12, requires_grad=True)
    target = torch.zeros(2, 12)
    target[0, 0] = 1
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = True  # one positive (AU0), two negatives
    pw = torch.ones(12)
    pw[0] = 3.0
    loss = au_bce_loss(logits, target, mask, pw)
    assert loss.item() == pytest.approx((3 * LN2 + LN2 + LN2) / 3, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 5] == 0  # unlabelled entries get no gradient


def test_au_pos_weight_from_training_labels():
    aus = np.full((5, 12), -1)
    aus[:4, 0] = [1, 0, 0, 0]  # 1 positive, 3 negatives, 1 missing
    aus[:, 1] = [0, 0, 0, 0, -1]  # no positive: nothing to rebalance
    w = au_pos_weight(aus)
    assert w[0].item() == pytest.approx(3.0) and w[1].item() == 1.0 and w[2].item() == 1.0


def test_weighted_asymmetric_loss_hand_case():
    logits = torch.zeros(1, 12)
    target = torch.zeros(1, 12)
    target[0, 0] = 1
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, :2] = True
    # positive: -log(0.5); negative: -(p log(1 - p)) = 0.5 ln 2 at p = 0.5
    assert au_wal_loss(logits, target, mask).item() == pytest.approx((LN2 + 0.5 * LN2) / 2, rel=1e-6)
    aus = np.zeros((4, 12))
    aus[:2, 0] = 1  # rate 0.5
    aus[:1, 1] = 1  # rate 0.25
    aus[:, 2:] = -1
    aus[0, 2:] = 1  # rate 1 for the others
    w = au_occurrence_weight(aus).numpy()
    inv = np.array([2.0, 4.0] + [1.0] * 10)
    np.testing.assert_allclose(w, 12 * inv / inv.sum(), rtol=1e-6)


def test_expr_ce_with_class_weights_hand_case():
    logits = torch.zeros(3, 8)
    logits[0, 0] = math.log(7.0)  # p(class 0) = 7 / 14 = 0.5
    target = torch.tensor([0, 1, 0])
    mask = torch.tensor([True, True, False])
    weight = torch.ones(8)
    weight[1] = 3.0
    # (1 * ln 2 + 3 * ln 8) / (1 + 3)
    assert expr_ce_loss(logits, target, mask, weight).item() == pytest.approx(10 * LN2 / 4, rel=1e-6)


def test_expr_class_weights_from_counts():
    w = expr_class_weights(np.array([0, 0, 1, 7, -1, -1])).numpy()
    assert w[0] == pytest.approx(4 / (8 * 2)) and w[1] == pytest.approx(4 / 8) and w[7] == pytest.approx(0.5)
    assert w[3] == 1.0  # absent class


def test_ccc_loss_uses_target_mean_and_population_moments():
    pred = torch.tensor([[1.0, 0.3], [2.0, -0.2], [3.0, 0.9]])
    target = torch.tensor([[2.0, 0.0], [4.0, 0.0], [6.0, 0.0]])
    mask = torch.tensor([[True, False]] * 3)  # arousal unlabelled: adds 0
    # population: vx = 2/3, vy = 8/3, cov = 4/3, (mx - my)^2 = 4 -> CCC = 4/11 (sample moments: 4/9;
    # a target mean taken from the predictions would give 8/14)
    assert va_ccc_loss(pred, target, mask).item() == pytest.approx(1 - 4 / 11, rel=1e-6)
    assert ccc_torch(pred[:, 0], target[:, 0]).item() == pytest.approx(ccc([1, 2, 3], [2, 4, 6]), rel=1e-6)


@pytest.mark.parametrize("kind", ["bce", "wal"])
def test_empty_batches_give_zero_not_nan(kind):
    out = {
        "au": torch.randn(4, 12, requires_grad=True),
        "expr": torch.randn(4, 8, requires_grad=True),
        "va": torch.randn(4, 2, requires_grad=True),
    }
    batch = {
        "au": torch.zeros(4, 12),
        "au_mask": torch.zeros(4, 12, dtype=torch.bool),
        "expr": torch.zeros(4, dtype=torch.long),
        "expr_mask": torch.zeros(4, dtype=torch.bool),
        "va": torch.zeros(4, 2),
        "va_mask": torch.zeros(4, 2, dtype=torch.bool),
    }
    total, parts = MTLLoss(LossConfig(au_loss=kind))(out, batch, ("au", "expr", "va"))
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    total.backward()  # still differentiable
    assert all(torch.isfinite(t.grad).all() and (t.grad == 0).all() for t in out.values())


def _batch(n=6, t=None):
    g = torch.Generator().manual_seed(0)
    shape = (n,) if t is None else (n, t)
    return {
        "au": (torch.rand(*shape, 12, generator=g) > 0.5).float(),
        "au_mask": torch.ones(*shape, 12, dtype=torch.bool),
        "expr": torch.randint(0, 8, shape, generator=g),
        "expr_mask": torch.ones(shape, dtype=torch.bool),
        "va": torch.rand(*shape, 2, generator=g) * 2 - 1,
        "va_mask": torch.ones(*shape, 2, dtype=torch.bool),
    }


def test_task_weights_scale_the_optimised_loss_and_its_gradient():
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    base = {
        "au": torch.randn(6, 12, generator=g),
        "expr": torch.randn(6, 8, generator=g),
        "va": torch.randn(6, 2, generator=g).tanh(),
    }

    def grads(weights):
        out = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        total, parts = MTLLoss(LossConfig(weights=weights))(out, batch, ("au", "expr", "va"))
        total.backward()
        return total, parts, {k: v.grad for k, v in out.items()}

    _, p1, g1 = grads({"au": 1.0, "expr": 1.0, "va": 1.0})
    t2, p2, g2 = grads({"au": 0.0, "expr": 2.0, "va": 1.0})
    assert t2.item() == pytest.approx(2 * p1["expr"].item() + p1["va"].item(), rel=1e-6)
    assert (g2["au"] == 0).all()  # weight 0: no gradient reaches the AU head
    torch.testing.assert_close(g2["expr"], 2 * g1["expr"])
    assert p2["au"].item() == pytest.approx(p1["au"].item())  # logged terms stay unweighted


def test_stage_tasks_select_losses_and_padded_steps_are_ignored():
    batch = _batch(3, 4)
    step = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    out = {"au": torch.randn(3, 4, 12), "expr": torch.randn(3, 4, 8), "va": torch.randn(3, 4, 2).tanh()}
    loss = MTLLoss()
    _, masked = loss(out, {**batch, "step_mask": step}, ("au", "expr", "va"))
    # the same loss on only the real steps, flattened
    real = {k: v[step] for k, v in out.items()}
    flat = {k: v[step] for k, v in batch.items()}
    _, ref = loss(real, flat, ("au", "expr", "va"))
    for k in ("au", "expr", "va"):
        assert masked[k].item() == pytest.approx(ref[k].item(), rel=1e-5)
    total, parts = loss(out, batch, ("expr",))
    assert set(parts) == {"expr"} and total.item() == pytest.approx(parts["expr"].item())
    with pytest.raises(ValueError, match="unknown task"):
        MTLLoss(LossConfig(weights={"valence": 1.0}))


def test_va_weights_choose_the_terms_of_the_va_loss():
    batch = _batch(16)
    out = {"va": torch.randn(16, 2).tanh(), "au": torch.randn(16, 12), "expr": torch.randn(16, 8)}
    both = MTLLoss()(out, batch, ("va",))[1]["va"]
    valence = MTLLoss(LossConfig(va_weights={"valence": 1.0, "arousal": 0.0}))(out, batch, ("va",))[1]["va"]
    m = batch["va_mask"][:, 0]
    assert valence.item() == pytest.approx(1 - ccc_torch(out["va"][m, 0], batch["va"][m, 0]).item(), rel=1e-5)
    assert both.item() > valence.item()
    with pytest.raises(ValueError, match="va_weights"):
        MTLLoss(LossConfig(va_weights={"dominance": 1.0}))
