"""Loss weighting strategies against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput
from training.config import (
    ConfigError,
    DatasetSpec,
    ModelConfig,
    SparseColumn,
    TaskColumn,
    TaskWeights,
    TrainConfig,
    WeightingConfig,
)
from training.losses import (
    MGDAWeighting,
    StaticWeighting,
    UncertaintyWeighting,
    build_weighting,
    min_norm_weights,
    pe_ltr_weights,
    project_simplex,
    uncertainty_total,
)
from training.models import build_model
from training.models.base import MultiTaskModel, task_loss

TASKS = [
    TaskColumn(name="ctr", label="click"),
    TaskColumn(name="like", label="like"),
    TaskColumn(name="stay", label="stay", kind="regression"),
]
SPEC = FeatureSpec(
    sparse=[SparseField(name="item", source="item", vocab=[f"i{i}" for i in range(5)])],
    dense=[DenseField(name="price", source="item", mean=0.0, std=1.0, default=0.0)],
    outputs=[TaskOutput(name=t.name, kind=t.kind) for t in TASKS],
)


def config(model: str = "shared_bottom", **update: object) -> TrainConfig:
    ds = DatasetSpec(name="t", train="x.csv", sparse=[SparseColumn(name="item")], tasks=TASKS)
    small = ModelConfig(type=model, embed_dim=3, bottom_units=[4], tower_units=[], expert_units=[4])
    return TrainConfig(dataset=ds, model=small, **update)


def tiny_model(model: str = "shared_bottom") -> tuple[MultiTaskModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    m = build_model(config(model), SPEC)
    sparse = torch.tensor([[0], [1], [2], [3], [4], [5]])
    dense = torch.linspace(-1, 1, 6).unsqueeze(1)
    labels = {
        "ctr": torch.tensor([1.0, 0, 1, 0, 0, 1]),
        "like": torch.tensor([0.0, 0, 1, 1, 0, 0]),
        "stay": torch.linspace(0, 2, 6),
    }
    return m, m.compute_losses(m(sparse, dense), labels)


def grads(model: MultiTaskModel) -> list[torch.Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]


# ---------------------------------------------------------------- per-task losses
def test_weighted_bce_matches_hand_value() -> None:
    logit, y = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    # row 1: -3 * log(0.5); row 2: -log(1 - sigmoid(2))
    expected = (3 * math.log(2) + math.log(1 + math.exp(2))) / 2
    assert float(task_loss(logit, y, "binary", 3.0)) == pytest.approx(expected, rel=1e-6)
    mse = task_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), "regression")
    assert float(mse) == pytest.approx(2.5)


# ---------------------------------------------------------------- static
def test_static_backward_is_the_weighted_sum() -> None:
    model, losses = tiny_model()
    w = StaticWeighting(model.task_kinds, {"ctr": 2.0, "like": 0.5, "stay": 0.0})
    used = w.backward(losses, model)
    assert used == {"ctr": 2.0, "like": 0.5, "stay": 0.0}
    got = grads(model)
    model.zero_grad()
    model2, losses2 = tiny_model()
    torch.autograd.backward(2.0 * losses2["ctr"] + 0.5 * losses2["like"])
    for a, b in zip(got, grads(model2), strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- uncertainty
def test_uncertainty_total_hand_values() -> None:
    L = [torch.tensor(0.5), torch.tensor(2.0)]
    s = torch.tensor([0.0, 1.0])
    total, w = uncertainty_total(L, s, regression=[False, True])
    # binary: exp(-0) * 0.5 + 0/2 ; regression: 0.5 * exp(-1) * 2 + 1/2
    assert float(total) == pytest.approx(0.5 + math.exp(-1) + 0.5, rel=1e-6)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.5 * math.exp(-1)]))


def test_uncertainty_gradient_on_log_variance() -> None:
    model, losses = tiny_model()
    weighting = UncertaintyWeighting(model.task_kinds)
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.2, -0.1, 0.4]))
    used = weighting.backward(losses, model)
    s = weighting.log_vars.detach()
    c = torch.tensor([1.0, 1.0, 0.5])
    L = torch.stack([losses[n].detach() for n in model.task_names])
    # d/ds [c exp(-s) L + s/2] = -c exp(-s) L + 1/2
    assert weighting.log_vars.grad is not None
    torch.testing.assert_close(weighting.log_vars.grad, -c * torch.exp(-s) * L + 0.5)
    assert used["stay"] == pytest.approx(0.5 * math.exp(-0.4), rel=1e-6)
    assert used["ctr"] == pytest.approx(math.exp(-0.2), rel=1e-6)


# ---------------------------------------------------------------- min-norm solvers
def test_two_task_min_norm_closed_form() -> None:
    g = np.array([[2.0, 0.0], [0.0, 1.0]])
    # min |a g1 + (1-a) g2|^2 = 4a^2 + (1-a)^2  ->  a = 1/5
    np.testing.assert_allclose(min_norm_weights(g @ g.T), [0.2, 0.8])
    same = np.array([[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(min_norm_weights(same @ same.T).sum(), 1.0)
    # g2 = 2 g1: the shorter vector alone is the min-norm point
    np.testing.assert_allclose(min_norm_weights(np.array([[1.0, 2.0], [2.0, 4.0]])), [1.0, 0.0])


@pytest.mark.parametrize("seed", range(4))
def test_frank_wolfe_beats_a_grid_on_three_tasks(seed: int) -> None:
    G = np.random.default_rng(seed).normal(size=(3, 4))
    M = G @ G.T
    w = min_norm_weights(M)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    grid = np.linspace(0, 1, 201)
    best = min(
        float(v @ M @ v)
        for a, b in itertools.product(grid, grid)
        if a + b <= 1
        for v in [np.array([a, b, 1 - a - b])]
    )
    assert float(w @ M @ w) <= best + 1e-9


def test_project_simplex() -> None:
    np.testing.assert_allclose(project_simplex(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_simplex(np.array([-0.1, 0.5]), 0.4), [0.0, 0.4])
    np.testing.assert_allclose(project_simplex(np.array([2.0, 0.0, 0.0])), [1.0, 0.0, 0.0])


def test_pe_ltr_hand_example_and_bounds() -> None:
    g = np.array([[2.0, 0.0], [0.0, 1.0]])
    # unconstrained optimum (0.2, 0.8) violates w1 >= 0.3: relaxed u = (-0.1, 0.5) -> (0, 0.4)
    np.testing.assert_allclose(pe_ltr_weights(g @ g.T, np.array([0.3, 0.3])), [0.3, 0.7])
    np.testing.assert_allclose(pe_ltr_weights(g @ g.T, np.zeros(2)), [0.2, 0.8])
    rng = np.random.default_rng(1)
    for _ in range(20):
        G = rng.normal(size=(4, 3))
        c = rng.dirichlet(np.ones(4)) * rng.uniform(0, 0.9)
        w = pe_ltr_weights(G @ G.T, c)
        assert w.sum() == pytest.approx(1.0)
        assert (w >= c - 1e-12).all()


def test_mgda_backward_uses_the_min_norm_weights() -> None:
    model, losses = tiny_model()
    shared = model.shared_parameters()
    per_task = [
        torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(losses[n], shared, retain_graph=True)]
        )
        for n in model.task_names
    ]
    G = torch.stack(per_task).double()
    expected = min_norm_weights((G @ G.T).numpy())
    used = MGDAWeighting(model.task_kinds).backward(losses, model)
    np.testing.assert_allclose([used[n] for n in model.task_names], expected, rtol=1e-9)
    assert sum(used.values()) == pytest.approx(1.0)
    direction = torch.cat([p.grad.reshape(-1) for p in shared]).double()  # type: ignore[union-attr]
    torch.testing.assert_close(direction, torch.from_numpy(expected) @ G)


def test_build_weighting_and_its_config_errors() -> None:
    kinds = {"ctr": "binary", "like": "binary", "stay": "regression"}
    cfg = config(tasks={"ctr": TaskWeights(loss_weight=3.0)})
    static = build_weighting(cfg, kinds)
    assert isinstance(static, StaticWeighting) and static.weights["ctr"] == 3.0
    with pytest.raises(ConfigError, match="unknown"):
        build_weighting(
            config(weighting=WeightingConfig(type="pe_ltr", lower_bounds={"x": 0.1})), kinds
        )
    with pytest.raises(ConfigError, match="sum"):
        build_weighting(
            config(
                weighting=WeightingConfig(type="pe_ltr", lower_bounds={"ctr": 0.6, "like": 0.6})
            ),
            kinds,
        )
    model, losses = tiny_model("single_task")  # nothing shared: MGDA has nothing to balance
    with pytest.raises(ConfigError, match="shared parameters"):
        MGDAWeighting(model.task_kinds).backward(losses, model)
