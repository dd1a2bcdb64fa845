"""AITM (training/models/aitm.py): the transfer's shapes and direction, the calibrator, the chain's
losses on every impression, and outputs that keep mtrank's conditional meaning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.training.tiny import TASKS, build, export_parity, fuse, inputs
from training.config import ConfigError, ModelConfig, TaskColumn
from training.models.aitm import AIT, AITMModel, resolve_chain

CHAIN = ["ctr", "cart", "cvr"]  # impression -> click -> cart -> purchase
TASKS_NAMES = [t.name for t in TASKS]


def aitm(**options: object) -> AITMModel:
    model = build("aitm", aitm={"chain": CHAIN, **options})
    assert isinstance(model, AITMModel)
    return model


def test_ait_has_the_documented_shapes() -> None:
    torch.manual_seed(0)
    ait = AIT(6)
    p, q = torch.randn(5, 6), torch.randn(5, 6)  # p_{t-1}, q_t: (B, d)
    z, w = ait(p, q)
    assert z.shape == (5, 6) and w.shape == (5, 2)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(5))
    # z is the attention-weighted sum of h3 over (p, q), scores <h1(u), h2(u)> / sqrt(d)
    u = torch.stack([p, q], dim=1)  # (B, 2, d)
    score = (ait.h1(u) * ait.h2(u)).sum(-1) / 6**0.5
    torch.testing.assert_close(w, torch.softmax(score, dim=1))
    torch.testing.assert_close(z, w[:, :1] * ait.h3(p) + w[:, 1:] * ait.h3(q))
    model = aitm()
    assert model.bottom.out_dim == 6  # d = bottom_units[-1]
    transferred = model.transfer[0](torch.randn(5, 6))  # p_t = g(z_t)
    assert transferred.shape == (5, 6) and (transferred >= 0).all()
    assert len(model.ait) == len(CHAIN) - 1


def test_information_flows_down_the_chain_only() -> None:
    model = aitm()
    out = model(*inputs(16))
    weights = model.bottom.columns.weights[0]  # (T, in, out): task k's first layer is [k]
    index = {n: k for k, n in enumerate(model.task_names)}

    def reaches(output: str, column: str) -> bool:
        (g,) = torch.autograd.grad(out[output].sum(), [weights], retain_graph=True)
        return bool(g[index[column]].abs().sum() > 0)

    assert reaches("cvr", "ctr") and reaches("cvr", "cart") and reaches("cart", "ctr")
    assert not reaches("ctr", "cart") and not reaches("cart", "cvr")
    assert not reaches("collect", "ctr")  # off the chain: its own column only
    assert not reaches("ctr", "collect")


def test_calibrator_penalises_a_child_more_likely_than_its_parent() -> None:
    alpha = 0.6
    with_cal, without = aitm(calibrator_weight=alpha), aitm(calibrator_weight=0.0)
    raw = {n: torch.zeros(4) for n in ("collect", "stay")}
    raw["ctr"] = torch.tensor([0.0, 0.0, -1.0, 2.0])
    raw["cart"] = torch.tensor([1.0, -1.0, 0.0, 0.0])  # above ctr on rows 0 and 2
    raw["cvr"] = torch.tensor([-3.0, -3.0, -3.0, 1.0])  # above cart on row 3
    labels = {n: torch.zeros(4) for n in TASKS_NAMES}
    got, ref = with_cal.compute_losses(raw, labels), without.compute_losses(raw, labels)
    s = {n: torch.sigmoid(v) for n, v in raw.items()}
    cart_excess = torch.relu(s["cart"] - s["ctr"]).mean()
    cvr_excess = torch.relu(s["cvr"] - s["cart"]).mean()
    assert float(got["cart"] - ref["cart"]) == pytest.approx(alpha * float(cart_excess), rel=1e-5)
    assert float(got["cvr"] - ref["cvr"]) == pytest.approx(alpha * float(cvr_excess), rel=1e-5)
    assert float(got["ctr"]) == float(ref["ctr"])  # the chain's root has no parent
    # a chain that respects the funnel costs nothing
    ordered = {**raw, "cart": raw["ctr"] - 1.0, "cvr": raw["ctr"] - 2.0}
    a, b = with_cal.compute_losses(ordered, labels), without.compute_losses(ordered, labels)
    assert all(float(a[n]) == float(b[n]) for n in a)


def test_chain_tasks_learn_on_every_impression_others_stay_conditional() -> None:
    model = aitm(calibrator_weight=0.0)
    with torch.no_grad():
        raw = model(*inputs(16))
    click = torch.tensor([1.0, 0.0] * 8)
    buy = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    labels = {"ctr": click, "cvr": buy, "cart": buy, "collect": buy, "stay": torch.zeros(16)}
    flipped = torch.where(click > 0, buy, 1.0 - buy)  # change only rows without a click
    before = model.compute_losses(raw, labels)
    after = {n: model.compute_losses(raw, {**labels, n: flipped})[n] for n in ("cvr", "collect")}
    assert float(after["cvr"]) != float(before["cvr"])  # chain step: unconditional
    assert float(after["collect"]) == float(before["collect"])  # off the chain: P(. | click)
    assert model.loss_rows("cvr", labels) == 16.0
    assert model.loss_rows("collect", labels) == float(click.sum())


def test_outputs_keep_the_conditional_meaning_export_with_parity_and_fuse(tmp_path: Path) -> None:
    model = aitm().eval()
    sparse, dense = inputs(64, seed=2)
    with torch.no_grad():
        joint = model.calibrated(model(sparse, dense))  # unconditional chain probabilities
        pred = model.predict(sparse, dense)
    assert model.output_names == TASKS_NAMES and list(pred) == TASKS_NAMES
    expected_cvr = (joint["cvr"] / joint["ctr"]).clamp(0.0, 1.0)  # P(purchase | click)
    torch.testing.assert_close(pred["cvr"], expected_cvr)
    torch.testing.assert_close(pred["cart"], (joint["cart"] / joint["ctr"]).clamp(0.0, 1.0))
    torch.testing.assert_close(pred["ctr"], joint["ctr"])
    unclipped = expected_cvr < 1.0
    torch.testing.assert_close(  # the fusion's ctr * cvr is the purchase probability again
        (pred["ctr"] * pred["cvr"])[unclipped], joint["cvr"][unclipped]
    )
    diffs = export_parity(model, tmp_path)
    assert set(diffs) == set(TASKS_NAMES) and max(diffs.values()) <= 1e-5
    assert np.isfinite(fuse(pred)).all()


def test_chain_resolution() -> None:
    assert resolve_chain(None, TASKS) == ["ctr", "cvr"]  # the first dependent task's path
    assert resolve_chain(CHAIN, TASKS) == CHAIN
    deep = [
        TaskColumn(name="ctr", label="click"),
        TaskColumn(name="cart", label="cart", depends_on="ctr"),
        TaskColumn(name="buy", label="buy", depends_on="cart"),
    ]
    assert resolve_chain(None, deep) == ["ctr", "cart", "buy"]
    with pytest.raises(ConfigError, match="unknown task 'like'"):
        resolve_chain(["ctr", "like"], TASKS)
    with pytest.raises(ConfigError, match="'stay' must be binary"):
        resolve_chain(["ctr", "stay"], TASKS)
    with pytest.raises(ConfigError, match="must come before"):
        resolve_chain(["cvr", "ctr"], TASKS)
    flat = [TaskColumn(name="ctr", label="click"), TaskColumn(name="like", label="like")]
    with pytest.raises(ConfigError, match="aitm.chain or a task with depends_on"):
        resolve_chain(None, flat)
    with pytest.raises(ValidationError, match="at least two distinct tasks"):
        ModelConfig.model_validate({"type": "aitm", "aitm": {"chain": ["ctr", "ctr"]}})
    with pytest.raises(ValidationError, match="calibrator"):
        ModelConfig.model_validate({"type": "aitm", "aitm": {"calibrator": 1.0}})


def test_output_bias_starts_each_chain_step_at_its_unconditional_rate() -> None:
    model = aitm()
    rates = {"ctr": 0.05, "cvr": 0.06, "cart": 0.1, "collect": 0.15, "stay": 3.0}
    model.init_output_bias(rates)  # rates in the tasks' own (conditional) meaning
    with torch.no_grad():
        for layer in model.output_layers().values():
            layer.weight.zero_()  # outputs = sigmoid(bias)
        pred = model.predict(*inputs(8))
    for name in ("ctr", "cvr", "cart", "collect"):  # served as P(task | click) again
        torch.testing.assert_close(pred[name], torch.full((8,), rates[name]))
