"""Output-bias initialisation: every model's untrained outputs start at the base rates."""

from __future__ import annotations

import math

import pytest
import torch

from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput
from training.config import ModelConfig, TaskColumn, TaskWeights
from training.models import MODELS
from training.models.base import MultiTaskModel

TASKS = [
    TaskColumn(name="ctr", label="click"),
    TaskColumn(name="cvr", label="purchase", depends_on="ctr"),
    TaskColumn(name="stay", label="stay", kind="regression", transform="log1p"),
]
# what label_base_rates would measure: P(click), P(purchase | click), mean log1p(seconds)
RATES = {"ctr": 0.05, "cvr": 0.08, "stay": 0.3}
SPEC = FeatureSpec(
    sparse=[SparseField(name="item", source="item", vocab=[f"i{i}" for i in range(9)])],
    dense=[DenseField(name="price", source="item", mean=0.0, std=1.0, default=0.0)],
    outputs=[TaskOutput(name=t.name, kind=t.kind) for t in TASKS],
)
SMALL = {"embed_dim": 4, "bottom_units": [8], "expert_units": [8], "n_experts": 2}


def build(kind: str, weights: dict[str, TaskWeights] | None = None) -> MultiTaskModel:
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"type": kind, **SMALL, "tower_units": [4]})
    return MODELS[kind](cfg, SPEC, TASKS, weights)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_bias_equals_base_rate_log_odds_and_regression_mean() -> None:
    model = build("shared_bottom")
    biases = model.init_output_bias(RATES)
    layers = model.output_layers()
    assert abs(layers["ctr"].bias.item() - logit(0.05)) < 1e-6
    assert abs(layers["cvr"].bias.item() - logit(0.08)) < 1e-6  # the conditional rate
    assert abs(layers["stay"].bias.item() - 0.3) < 1e-6  # the mean in log1p space
    assert biases == pytest.approx({"ctr": logit(0.05), "cvr": logit(0.08), "stay": 0.3})


def test_a_rate_of_zero_or_one_stays_finite() -> None:
    model = build("shared_bottom")
    biases = model.init_output_bias({"ctr": 0.0, "cvr": 1.0, "stay": 0.0})
    assert all(math.isfinite(b) for b in biases.values())
    assert biases["ctr"] < -13 and biases["cvr"] > 13


def _predict_with_flat_towers(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """Zero each output layer's weights, so every output is its bias alone."""
    with torch.no_grad():
        for layer in model.output_layers().values():
            layer.weight.zero_()
    model.eval()
    sparse = torch.tensor([[1], [4], [0], [12]])  # (4, 1); 12 is out of range -> OOV
    dense = torch.tensor([[0.3], [-1.0], [2.0], [0.0]])  # (4, 1)
    with torch.no_grad():
        return model.predict(sparse, dense)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_model_starts_at_the_base_rates(kind: str) -> None:
    """Whatever a model's raw outputs mean, its served outputs start at the data's rates."""
    model = build(kind)
    model.init_output_bias(RATES)
    out = _predict_with_flat_towers(model)
    assert torch.allclose(out["ctr"], torch.tensor(0.05), atol=1e-6)
    assert torch.allclose(out["cvr"], torch.tensor(0.08), atol=1e-6)  # P(purchase | click)
    assert torch.allclose(out["stay"], torch.tensor(math.expm1(0.3)), atol=1e-5)  # seconds
    for joint, (parent, child) in model.joint_outputs.items():
        want = RATES[parent] * RATES[child]
        assert torch.allclose(out[joint], torch.tensor(want), atol=1e-6), joint


@pytest.mark.parametrize("kind", ["shared_bottom", "esmm", "base"])
def test_label_weights_shift_the_bias_but_not_the_served_rate(kind: str) -> None:
    weights = {"ctr": TaskWeights(label_weight=4.0), "cvr": TaskWeights(label_weight=3.0)}
    model = build(kind, weights)
    biases = model.init_output_bias(RATES)
    assert abs(biases["ctr"] - (logit(0.05) + math.log(4.0))) < 1e-6  # the weighted optimum
    out = _predict_with_flat_towers(model)
    assert torch.allclose(out["ctr"], torch.tensor(0.05), atol=1e-6)
    assert torch.allclose(out["cvr"], torch.tensor(0.08), atol=1e-6)
