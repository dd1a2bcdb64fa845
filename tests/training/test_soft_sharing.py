"""Soft parameter sharing (training/models/soft_sharing.py): cross-stitch units and the
L2-constrained task columns."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.training.tiny import TASKS, build, export_parity, fuse, inputs
from training.config import ModelConfig
from training.models.soft_sharing import (
    CrossStitchBottom,
    L2ConstrainedModel,
    pairwise_l2,
    stitch_init,
)

LABELS = {
    "ctr": torch.tensor([1.0, 0.0, 1.0, 0.0]),
    "cvr": torch.tensor([1.0, 0.0, 0.0, 0.0]),
    "cart": torch.tensor([0.0, 0.0, 1.0, 0.0]),
    "collect": torch.tensor([1.0, 0.0, 1.0, 0.0]),
    "stay": torch.tensor([3.0, 0.0, 9.0, 0.0]),
}


def stitch_bottom(**options: object) -> CrossStitchBottom:
    model = build("cross_stitch", cross_stitch=options)
    assert isinstance(model.bottom, CrossStitchBottom)
    return model.bottom


def unstitched(bottom: CrossStitchBottom, sparse: torch.Tensor, dense: torch.Tensor) -> list:
    """The columns with every cross-stitch unit left out."""
    h = bottom.first.forward_shared(bottom.inputs(sparse, dense))  # (B, T, d)
    for layer in bottom.rest:
        h = layer(h)
    return list(h.unbind(1))


def test_cross_stitch_starts_as_the_identity_mix() -> None:
    bottom = stitch_bottom()
    T = len(TASKS)
    assert len(bottom.alphas) == 2  # one unit per layer of bottom_units [8, 6]
    for alpha in bottom.alphas:
        assert torch.equal(alpha.detach(), torch.eye(T))
    sparse, dense = inputs(10)
    with torch.no_grad():
        for got, want in zip(bottom(sparse, dense), unstitched(bottom, sparse, dense), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cross_stitch_units_mix_the_columns() -> None:
    bottom = stitch_bottom()
    T = len(TASKS)
    swap = torch.eye(T)[[1, 0, *range(2, T)]]  # tasks 0 and 1 trade activations
    with torch.no_grad():
        bottom.alphas[0].copy_(torch.eye(T))
        bottom.alphas[1].copy_(swap)
        sparse, dense = inputs(10)
        got, plain = bottom(sparse, dense), unstitched(bottom, sparse, dense)
    torch.testing.assert_close(got[0], plain[1])
    torch.testing.assert_close(got[1], plain[0])
    torch.testing.assert_close(got[2], plain[2])
    # and the units learn: the loss reaches every α
    model = build("cross_stitch")
    losses = model.compute_losses(model(*inputs(4)), LABELS)
    torch.stack(list(losses.values())).sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in model.bottom.alphas)


def test_the_papers_initialisation_splits_each_row() -> None:
    alpha = stitch_init(3, 0.9)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(3))
    assert torch.allclose(alpha.diagonal(), torch.full((3,), 0.9))
    assert torch.allclose(alpha[0, 1], torch.tensor(0.05))
    assert torch.equal(stitch_init(1, 0.9), torch.ones(1, 1))
    assert torch.equal(stitch_bottom(self_weight=0.9).alphas[0].detach(), stitch_init(5, 0.9))


def test_pairwise_l2_is_the_sum_over_task_pairs() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2)  # (T, in, out)
    shares = pairwise_l2(w)  # (T,)
    brute = sum(((w[s] - w[t]) ** 2).sum() for s, t in itertools.combinations(range(4), 2))
    assert float(shares.sum()) == pytest.approx(float(brute), rel=1e-5)
    assert not pairwise_l2(w[:1].expand(4, 3, 2)).any()  # identical columns: no penalty


def test_l2_constrained_loss_adds_each_tasks_share_of_the_penalty() -> None:
    weight = 0.05
    model = build("l2_constrained", l2_constrained={"weight": weight})
    free = build("l2_constrained", l2_constrained={"weight": 0.0})
    assert isinstance(model, L2ConstrainedModel)
    raw = model(*inputs(4))
    got, ref = model.compute_losses(raw, LABELS), free.compute_losses(raw, LABELS)
    cols = model.bottom.columns
    total = sum(
        ((p[s] - p[t]) ** 2).sum()
        for p in [*cols.weights, *cols.biases]
        for s, t in itertools.combinations(range(len(TASKS)), 2)
    )
    added = sum((got[n] - ref[n]).item() for n in model.task_names)
    assert added == pytest.approx(weight * total.item(), rel=1e-4)
    # the penalty pulls the columns together: one step on it alone shrinks their spread
    before = model.penalty().sum().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.penalty().sum().backward()
    opt.step()
    assert model.penalty().sum().item() < before
    # the towers are free: no penalty reaches them
    assert all(p.grad is None for p in model.towers.parameters())


@pytest.mark.parametrize("model_type", ["cross_stitch", "l2_constrained"])
def test_soft_sharing_exports_with_parity_and_fuses(model_type: str, tmp_path: Path) -> None:
    model = build(model_type).eval()
    with torch.no_grad():
        pred = model.predict(*inputs(32, seed=4))
    assert list(pred) == [t.name for t in TASKS]
    diffs = export_parity(model, tmp_path)
    assert max(diffs.values()) <= 1e-5
    assert np.isfinite(fuse(pred)).all()


def test_soft_sharing_config_is_strict() -> None:
    cfg = ModelConfig.model_validate({"type": "cross_stitch"})
    assert cfg.cross_stitch.self_weight == 1.0 and cfg.l2_constrained.weight == 0.01
    with pytest.raises(ValidationError, match="self_weight"):
        ModelConfig.model_validate({"type": "cross_stitch", "cross_stitch": {"self_weight": 1.5}})
    with pytest.raises(ValidationError, match="lambda"):
        ModelConfig.model_validate({"type": "l2_constrained", "l2_constrained": {"lambda": 1}})
