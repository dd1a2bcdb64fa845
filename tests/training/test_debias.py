"""CVR without selection bias: ESCM²-IPS/DR on ESMM, IPS/DR-JL on BASE (models/debias.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.training.tiny import SPEC, build, config, export_parity, fuse, inputs
from training.config import ConfigError, ModelConfig, TaskWeights
from training.models import build_model
from training.models.debias import IMPUTED, DebiasedFunnel, ips_weights

DEBIASED = ("escm2_ips", "escm2_dr", "ips", "dr_jl")
CLICK = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
BUY = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # impression space: 0 without a click
LABELS = {
    "ctr": CLICK,
    "cvr": BUY,
    "cart": torch.zeros(6),
    "collect": CLICK,
    "stay": torch.ones(6),
}


def debiased(model_type: str) -> DebiasedFunnel:
    model = build(model_type)
    assert isinstance(model, DebiasedFunnel)
    return model


def raw_outputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    out = {
        "ctr": torch.tensor([0.3, -2.0, -4.0, 1.0, -1.0, -3.5]),  # pCTR 0.57 .. 0.018
        "cvr": torch.tensor([-0.5, 0.8, -1.5, 0.2, -2.0, 1.1]),
        "cart": torch.zeros(6),
        "collect": torch.zeros(6),
        "stay": torch.zeros(6),
        IMPUTED: torch.tensor([0.4, -1.0, -0.2, 0.9, 2.0, -0.7]),
    }
    return {k: v.clone().requires_grad_(requires_grad) for k, v in out.items()}


def by_hand_weights(clip: float) -> torch.Tensor:
    return CLICK / torch.sigmoid(raw_outputs()["ctr"]).clamp(min=clip)  # (B,)


def errors() -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(raw_outputs()["cvr"], BUY, reduction="none")


def test_ips_weights_are_one_over_clipped_pctr_on_clicked_rows_and_zero_elsewhere() -> None:
    click = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    ctr = torch.tensor([0.5, 0.5, 0.01, 0.2, 0.001], requires_grad=True)
    w = ips_weights(click, ctr, clip=0.05)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 20.0, 5.0, 0.0]))
    assert not w.requires_grad  # the propensity carries no gradient


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_escm2_ips_loss_is_esmm_plus_the_weighted_ips_risk(weight: float) -> None:
    esmm = build("esmm")
    escm2 = build("escm2_ips", debias={"weight": weight, "clip": 0.1})
    with torch.no_grad():
        ref = esmm.compute_losses(raw_outputs(), LABELS)
        got = escm2.compute_losses(raw_outputs(), LABELS)
    risk = (by_hand_weights(0.1) * errors()).mean()  # over all six impressions
    assert float(got["cvr"]) == pytest.approx(float(ref["cvr"] + weight * risk), rel=1e-6)
    for name in ("ctr", "cart", "collect", "stay"):
        assert float(got[name]) == pytest.approx(float(ref[name]), rel=1e-6)


def test_ips_on_base_replaces_the_clicked_only_cvr_loss() -> None:
    base, ips = build("base"), build("ips", debias={"clip": 0.1})
    with torch.no_grad():
        ref, got = (
            base.compute_losses(raw_outputs(), LABELS),
            ips.compute_losses(raw_outputs(), LABELS),
        )
    risk = (by_hand_weights(0.1) * errors()).mean()
    assert float(got["cvr"]) == pytest.approx(float(risk), rel=1e-6)
    assert float(got["ctr"]) == pytest.approx(float(ref["ctr"]), rel=1e-6)
    assert ips.loss_rows("cvr", LABELS) == 6.0  # a mean over every impression
    # the unweighted clicked-only mean (BASE) differs: the weights matter
    assert float(ref["cvr"]) != pytest.approx(float(risk), rel=1e-3)


@pytest.mark.parametrize("model_type", DEBIASED)
def test_the_propensity_carries_no_gradient_into_the_ctr_tower(model_type: str) -> None:
    model = debiased(model_type)
    raw = raw_outputs(requires_grad=True)
    risk = model.counterfactual_risk(raw, LABELS)
    (grad,) = torch.autograd.grad(risk, [raw["ctr"]], allow_unused=True)
    assert grad is None or not grad.any()


def test_dr_jl_risk_and_imputation_loss_by_hand() -> None:
    model = build("dr_jl", debias={"clip": 0.1, "imputation_weight": 0.7})
    with torch.no_grad():
        got = model.compute_losses(raw_outputs(), LABELS)["cvr"]
    raw, w, e = raw_outputs(), by_hand_weights(0.1), errors()
    x, r_tilde = raw["cvr"], torch.sigmoid(raw[IMPUTED])
    e_hat = -(r_tilde * F.logsigmoid(x) + (1 - r_tilde) * F.logsigmoid(-x))  # BCE(r̃, r̂)
    risk = (e_hat + w * (e - e_hat)).mean()
    imputation = (w * (e - e_hat) ** 2).mean()
    assert float(got) == pytest.approx(float(risk + 0.7 * imputation), rel=1e-5)


@pytest.mark.parametrize("model_type", ["escm2_dr", "dr_jl"])
def test_dr_imputation_is_computed_on_every_impression(model_type: str) -> None:
    model = build(model_type)
    unclicked = 4  # CLICK[4] == 0
    raw = raw_outputs()
    moved = {**raw, IMPUTED: raw[IMPUTED].clone()}
    moved[IMPUTED][unclicked] += 1.0
    with torch.no_grad():
        before = model.compute_losses(raw, LABELS)["cvr"]
        after = model.compute_losses(moved, LABELS)["cvr"]
    assert float(before) != pytest.approx(float(after), rel=1e-6)
    # and the CVR prediction of an unclicked impression gets a gradient (under IPS it does not)
    for kind, reaches in ((model_type, True), ("ips", False)):
        r = raw_outputs(requires_grad=True)
        loss = debiased(kind).counterfactual_risk(r, LABELS)
        (g,) = torch.autograd.grad(loss, [r["cvr"]])
        assert bool(g[unclicked] != 0) is reaches, kind


def test_dr_joint_learning_splits_the_gradients() -> None:
    """Prediction step: r̃ fixed; imputation step: r̂ fixed; one loss, stop-gradients."""
    grads = {}
    for weight in (0.0, 1.0):
        model = build("dr_jl", debias={"imputation_weight": weight})
        raw = raw_outputs(requires_grad=True)
        loss = model.compute_losses(raw, LABELS)["cvr"]
        g_cvr, g_imp = torch.autograd.grad(loss, [raw["cvr"], raw[IMPUTED]], allow_unused=True)
        grads[weight] = (g_cvr, g_imp)
    # the DR risk alone does not train the imputer ...
    assert grads[0.0][1] is None or not grads[0.0][1].any()
    # ... the imputation loss does, and it leaves the CVR tower's gradient as it was
    assert grads[1.0][1] is not None and grads[1.0][1].abs().sum() > 0
    torch.testing.assert_close(grads[0.0][0], grads[1.0][0])


@pytest.mark.parametrize("model_type", DEBIASED)
def test_debiased_models_serve_the_funnel_outputs_export_with_parity_and_fuse(
    model_type: str, tmp_path: Path
) -> None:
    model = build(model_type).eval()
    raw = model(*inputs(9))
    assert (IMPUTED in raw) is (model_type in ("escm2_dr", "dr_jl"))
    with torch.no_grad():
        pred = model.predict(*inputs(64, seed=3))
    assert model.output_names == ["ctr", "cvr", "cart", "collect", "stay", "ctcvr"]
    assert list(pred) == model.output_names  # the internal imputation output is not served
    assert torch.equal(pred["ctcvr"], pred["ctr"] * pred["cvr"])
    assert model.joint_outputs == {"ctcvr": ("ctr", "cvr")}
    diffs = export_parity(model, tmp_path)
    assert set(diffs) == set(model.output_names) and max(diffs.values()) <= 1e-5
    scores = fuse(pred)
    assert scores.shape == (64,) and np.isfinite(scores).all()


@pytest.mark.parametrize("model_type", DEBIASED)
def test_label_weights_on_the_funnel_are_refused(model_type: str) -> None:
    for task in ("ctr", "cvr"):
        cfg = config(model_type).model_copy(update={"tasks": {task: TaskWeights(label_weight=2.0)}})
        with pytest.raises(ConfigError, match=f"tasks.{task}.label_weight"):
            build_model(cfg, SPEC)
    cfg = config(model_type).model_copy(update={"tasks": {"cart": TaskWeights(label_weight=2.0)}})
    build_model(cfg, SPEC)  # other tasks keep their label weights


def test_debias_config_is_strict() -> None:
    cfg = ModelConfig.model_validate({"type": "escm2_dr"})
    assert (cfg.debias.clip, cfg.debias.weight, cfg.debias.imputation_weight) == (0.02, 1.0, 1.0)
    with pytest.raises(ValidationError, match="clipp"):
        ModelConfig.model_validate({"type": "ips", "debias": {"clipp": 0.1}})
    for bad in ({"clip": 0.0}, {"clip": 1.5}, {"weight": -1.0}, {"imputation_weight": -0.1}):
        with pytest.raises(ValidationError):
            ModelConfig.model_validate({"type": "ips", "debias": bad})


def test_the_pseudo_label_starts_at_the_base_cvr() -> None:
    model = debiased("dr_jl")
    rates = {"ctr": 0.05, "cvr": 0.06, "cart": 0.1, "collect": 0.15, "stay": 3.0}
    biases = model.init_output_bias(rates)
    imputation = model.risk.imputation
    assert imputation is not None
    assert imputation.out.bias.item() == pytest.approx(biases["cvr"])
    assert biases["cvr"] == pytest.approx(np.log(0.06 / 0.94))
