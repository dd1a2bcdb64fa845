"""training/models/delayed.py: the DFM and ES-DFM losses against hand computations, ES-DFM's
weights and stream on toy cases, DFM's correction of censoring, the served graph, and the
config checks that guard all of it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from tests.training.tiny import build, export_parity, inputs
from training.config import (
    ConfigError,
    DelayedFeedbackConfig,
    ModelConfig,
    TaskColumn,
    TaskWeights,
    TrainConfig,
    load_train_config,
    timing_key,
)
from training.models.delayed import (
    DELAY_RATE,
    DELAYED_POSITIVE,
    TRUE_NEGATIVE,
    DelayedFeedback,
    dfm_nll,
    es_dfm_loss,
    es_dfm_stream,
    es_dfm_weights,
    masked_mean,
)
from training.models.layers import Tower

ELAPSED, DELAY = timing_key("cvr", "elapsed"), timing_key("cvr", "delay")
DELAYED_TASKS = [
    TaskColumn(name="ctr", label="click"),
    TaskColumn(name="cvr", label="seen", depends_on="ctr", elapsed="elapsed", delay="delay"),
]
WAIT = 0.25 / 24.0  # es_dfm's default elapsed_hours, in days


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- DFM
def test_dfm_loss_is_the_hand_computed_likelihood_on_clicked_rows() -> None:
    """BASE: the clicked rows' DFM likelihood, by hand; the unclicked row is out of scope."""
    model = build("base", DELAYED_TASKS, delayed_feedback={"method": "dfm"}).double()
    x, z = [0.3, -1.0, 2.0], [0.2, -0.5, 1.0]  # CVR logits, delay-head outputs (log λ)
    outputs = {"ctr": _t(0.0, 0.0, 0.0), "cvr": _t(*x), DELAY_RATE: _t(*z)}
    labels = {
        "ctr": _t(1, 1, 0),
        "cvr": _t(1, 0, 0),
        ELAPSED: _t(2.0, 1.5, 3.0),
        DELAY: _t(0.5, 0.0, 0.0),  # row 0 converted half a day after its click
    }
    loss = model.compute_losses(outputs, labels)["cvr"].item()
    p0, lam0 = sigmoid(x[0]), math.exp(z[0])
    seen = -(math.log(p0) + math.log(lam0) - lam0 * 0.5)  # p λ e^{-λ d}
    p1, lam1 = sigmoid(x[1]), math.exp(z[1])
    not_yet = -math.log(1.0 - p1 + p1 * math.exp(-lam1 * 1.5))  # 1 - p + p e^{-λ e}
    assert loss == pytest.approx((seen + not_yet) / 2, rel=1e-9)
    assert model.loss_rows("cvr", labels) == 2.0


def test_dfm_loss_on_esmm_uses_the_ctcvr_product_on_every_impression() -> None:
    model = build("esmm", DELAYED_TASKS, delayed_feedback={"method": "dfm"}).double()
    a, b, z = [0.5, -0.2], [0.1, 0.4], [0.0, 0.3]
    outputs = {"ctr": _t(*a), "cvr": _t(*b), DELAY_RATE: _t(*z)}
    labels = {"ctr": _t(1, 0), "cvr": _t(1, 0), ELAPSED: _t(4.0, 0.5), DELAY: _t(1.0, 0.0)}
    loss = model.compute_losses(outputs, labels)["cvr"].item()
    p0, p1 = sigmoid(a[0]) * sigmoid(b[0]), sigmoid(a[1]) * sigmoid(b[1])
    lam0, lam1 = math.exp(z[0]), math.exp(z[1])
    seen = -(math.log(p0) + math.log(lam0) - lam0 * 1.0)
    not_yet = -math.log(1.0 - p1 + p1 * math.exp(-lam1 * 0.5))
    assert loss == pytest.approx((seen + not_yet) / 2, rel=1e-7)
    assert model.loss_rows("cvr", labels) == 2.0


def test_dfm_nll_stays_finite_at_extreme_probabilities() -> None:
    log_p, log_1mp = F.logsigmoid(_t(40.0, -40.0)), F.logsigmoid(_t(-40.0, 40.0))
    nll = dfm_nll(log_p, log_1mp, _t(0.0, 0.0), _t(0, 0), _t(1e-6, 50.0), _t(0.0, 0.0))
    assert torch.isfinite(nll).all()
    # p -> 1 with no time elapsed: not having converted yet costs nothing
    assert nll[0].item() == pytest.approx(0.0, abs=1e-5)


def test_dfm_recovers_the_conversion_rate_that_censoring_hides() -> None:
    """Two groups, p = 0.2 / 0.5, mean delays 0.5 / 5 days, clicks 0-4 days old: the naive rate
    of the slow group is ~0.16; maximising DFM's likelihood gives back p and λ."""
    rng = np.random.default_rng(0)
    n = 8_000
    group = np.repeat([0, 1], n)
    p_true, mean_delay = np.array([0.2, 0.5]), np.array([0.5, 5.0])
    converts = rng.random(2 * n) < p_true[group]
    delay = rng.exponential(mean_delay[group])
    elapsed = rng.uniform(0.0, 4.0, 2 * n)
    seen = converts & (delay <= elapsed)
    naive = np.array([seen[group == g].mean() for g in (0, 1)])
    assert naive[1] < 0.2  # censoring hides most of the slow group's conversions
    logits = torch.zeros(2, requires_grad=True)
    log_rate = torch.zeros(2, requires_grad=True)
    g = torch.from_numpy(group)
    y, e = torch.from_numpy(seen.astype(np.float32)), torch.from_numpy(elapsed.astype(np.float32))
    d = torch.from_numpy(np.where(seen, delay, 0.0).astype(np.float32))
    opt = torch.optim.LBFGS([logits, log_rate], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        x = logits[g]
        nll = dfm_nll(F.logsigmoid(x), F.logsigmoid(-x), log_rate[g], y, e, d)
        loss = masked_mean(nll, torch.ones_like(y))
        loss.backward()
        return loss

    opt.step(closure)
    p_hat = torch.sigmoid(logits).detach().numpy()
    np.testing.assert_allclose(p_hat, p_true, atol=0.03)
    np.testing.assert_allclose(1.0 / np.exp(log_rate.detach().numpy()), mean_delay, rtol=0.15)


# ---------------------------------------------------------------- ES-DFM
def test_es_dfm_weights_on_a_toy_case() -> None:
    w_pos, w_neg = es_dfm_weights(_t(0.2, 0.0), _t(0.75, 1.0))
    np.testing.assert_allclose(w_pos.numpy(), [1.2, 1.0])
    np.testing.assert_allclose(w_neg.numpy(), [0.9, 1.0])


def test_es_dfm_weights_make_the_stream_optimum_the_true_rate() -> None:
    """One x with conversion rate p, a share pi of conversions after the wait: the stream's
    positive rate is p / (1 + p pi), and the weighted BCE is stationary exactly at p."""
    p, pi = 0.3, 0.8
    n = 1000
    n_conv, n_late = int(p * n), int(p * pi * n)
    label = torch.zeros(n, dtype=torch.float64)
    label[:n_conv] = 1.0
    delay = torch.zeros(n, dtype=torch.float64)
    delay[:n_late] = 1.0  # after the wait: a fake negative, then the duplicate positive
    elapsed = torch.full((n,), 5.0, dtype=torch.float64)  # every conversion already seen
    p_dp = p * pi
    p_rn = (1 - p) / ((1 - p) + p_dp)  # P(real negative | negative at the wait)
    f64 = torch.float64
    w_pos, w_neg = es_dfm_weights(
        torch.full((n,), p_dp, dtype=f64), torch.full((n,), p_rn, dtype=f64)
    )
    logit = torch.tensor(math.log(p / (1 - p)), dtype=torch.float64, requires_grad=True)
    x = logit.expand(n)
    loss = es_dfm_loss(
        F.logsigmoid(x), F.logsigmoid(-x), label, elapsed, delay, torch.ones(n, dtype=f64), w_pos,
        w_neg, WAIT,
    )  # fmt: skip
    loss.backward()
    assert logit.grad is not None and abs(logit.grad.item()) < 1e-9
    # without the weights the optimum is the stream's rate, p / (1 + p pi): biased down
    ones = torch.ones(n, dtype=torch.float64)
    q = p / (1 + p_dp)
    xq = torch.tensor(math.log(q / (1 - q)), dtype=torch.float64, requires_grad=True)
    unweighted = es_dfm_loss(
        F.logsigmoid(xq.expand(n)), F.logsigmoid(-xq.expand(n)), label, elapsed, delay, ones,
        ones, ones, WAIT,
    )  # fmt: skip
    unweighted.backward()
    assert xq.grad is not None and abs(xq.grad.item()) < 1e-9
    assert q < p - 0.05  # and that rate is far from p: the weights are what moves it


def test_es_dfm_per_row_stream_equals_the_duplicated_stream() -> None:
    """Rows (elapsed, delay, label) against the authors' construction: copy every late
    conversion as an extra positive, drop what has not waited, average the weighted BCE."""
    rows = [  # elapsed, delay, label, in scope
        (2.0, 0.005, 1, 1),  # converted within the wait: one positive entry
        (2.0, 1.0, 1, 1),  # converted after it: a negative entry, then a positive one
        (2.0, 0.0, 0, 1),  # no conversion: one negative entry
        (0.005, 0.0, 0, 1),  # has not waited yet: no entry
        (3.0, 1.0, 1, 0),  # out of scope (not clicked): nothing
    ]
    e, d, y, scope = (_t(*col) for col in zip(*rows, strict=True))
    x = _t(0.4, -0.3, 1.1, 0.2, 0.9)
    w_pos, w_neg = _t(1.1, 1.2, 1.3, 1.4, 1.5), _t(0.9, 0.8, 0.7, 0.6, 0.5)
    got = es_dfm_loss(F.logsigmoid(x), F.logsigmoid(-x), y, e, d, scope, w_pos, w_neg, WAIT)
    entries = [(0, 1), (1, 0), (1, 1), (2, 0)]  # (row, label) of the duplicated stream
    total = sum(
        w_pos[i].item() * -math.log(sigmoid(x[i].item()))
        if lab
        else w_neg[i].item() * -math.log(1 - sigmoid(x[i].item()))
        for i, lab in entries
    )
    assert got.item() == pytest.approx(total / len(entries), rel=1e-9)


def test_es_dfm_stream_window_keeps_the_entries_of_its_days() -> None:
    """stream_days K: a first entry counts if it happened in the last K days, a conversion too."""
    e, d, y = _t(1.0, 5.0, 5.0, 5.0), _t(0.5, 4.5, 0.5, 0.0), _t(1, 1, 1, 0)
    entered, first, dup = es_dfm_stream(y, e, d, WAIT, stream_days=2.0)
    np.testing.assert_array_equal(entered.numpy(), [1, 0, 0, 0])  # only row 0 entered lately
    np.testing.assert_array_equal(first.numpy(), [0, 0, 0, 0])
    np.testing.assert_array_equal(dup.numpy(), [1, 1, 0, 0])  # row 1 converted 0.5 days ago
    entered, _, dup = es_dfm_stream(y, e, d, WAIT)  # no window: every entry
    np.testing.assert_array_equal(entered.numpy(), [1, 1, 1, 1])
    np.testing.assert_array_equal(dup.numpy(), [1, 1, 1, 0])


def test_es_dfm_heads_start_at_the_base_rate_and_never_shape_the_bottom() -> None:
    cfg = {"method": "es_dfm", "complete_after_days": 7.0}
    model = build("base", DELAYED_TASKS, delayed_feedback=cfg)
    model.init_output_bias({"ctr": 0.05, "cvr": 0.1})
    sparse, dense = inputs(16)
    with torch.no_grad():
        out = model(sparse, dense)
    assert model.delayed is not None
    heads = cast(DelayedFeedback, model.delayed).heads
    dp, tn = (cast(Tower, heads[k]) for k in (DELAYED_POSITIVE, TRUE_NEGATIVE))
    assert dp.out.bias.item() == pytest.approx(math.log(0.1 / 0.9))
    assert tn.out.bias.item() == pytest.approx(math.log(0.9 / 0.1))
    assert out[TRUE_NEGATIVE].shape == out[DELAYED_POSITIVE].shape == (16,)
    model.zero_grad()
    out = model(sparse, dense)
    (out[TRUE_NEGATIVE].sum() + out[DELAYED_POSITIVE].sum()).backward()
    assert all(p.grad is None for p in model.bottom.parameters())  # detached: the weight model


# ---------------------------------------------------------------- the served graph
def test_dfm_exports_the_naive_graph_with_parity(tmp_path: Path) -> None:
    dfm = build("base", DELAYED_TASKS, delayed_feedback={"method": "dfm"})
    naive = build("base", DELAYED_TASKS)
    (tmp_path / "dfm").mkdir()
    (tmp_path / "naive").mkdir()
    worst = export_parity(dfm, tmp_path / "dfm")
    assert max(worst.values()) < 1e-5
    export_parity(naive, tmp_path / "naive")
    a = onnx.load(str(tmp_path / "dfm" / "model.onnx")).graph
    b = onnx.load(str(tmp_path / "naive" / "model.onnx")).graph
    assert [o.name for o in a.output] == [o.name for o in b.output] == ["ctr", "cvr", "ctcvr"]
    assert [n.op_type for n in a.node] == [n.op_type for n in b.node]  # no delay head served


# ---------------------------------------------------------------- configuration
def test_config_requires_and_refuses_the_keys_of_each_method() -> None:
    assert DelayedFeedbackConfig().method == "naive"
    with pytest.raises(ValueError, match="window_days: method 'window' needs it"):
        DelayedFeedbackConfig(method="window")
    with pytest.raises(ValueError, match="window_days: method 'window' needs it"):
        DelayedFeedbackConfig(method="dfm", window_days=3.0)
    with pytest.raises(ValueError, match="complete_after_days: method 'es_dfm' needs it"):
        DelayedFeedbackConfig(method="es_dfm")
    with pytest.raises(ValueError, match="stream_days: only method 'es_dfm'"):
        DelayedFeedbackConfig(method="dfm", stream_days=14.0)
    with pytest.raises(ValueError, match="complete_after_days must exceed elapsed_hours"):
        DelayedFeedbackConfig(method="es_dfm", complete_after_days=0.5, elapsed_hours=24.0)
    with pytest.raises(ValueError, match="greater than 0"):
        DelayedFeedbackConfig(method="window", window_days=0.0)
    ok = DelayedFeedbackConfig(method="es_dfm", complete_after_days=14.0, stream_days=14.0)
    assert DelayedFeedbackConfig.model_validate(ok.model_dump()) == ok  # checkpoints round-trip
    with pytest.raises(ValueError, match="needs model.type esmm or base"):
        ModelConfig(type="mmoe", delayed_feedback=DelayedFeedbackConfig(method="dfm"))
    with pytest.raises(ValueError, match="elapsed and delay apply to binary tasks only"):
        TaskColumn(name="stay", label="s", kind="regression", elapsed="e")
    with pytest.raises(ValueError, match="delay needs elapsed"):
        TaskColumn(name="cvr", label="p", delay="d")


def test_a_config_file_error_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        "dataset: {name: d, train: t.csv, sparse: [{name: item}], tasks: [{name: ctr, label: c}]}\n"
        "model: {type: base, delayed_feedback: {method: window}}\n"
    )
    with pytest.raises(ConfigError, match=r"model\.delayed_feedback.*window_days"):
        load_train_config(path)


def test_the_model_refuses_a_child_without_timing_or_with_label_weights() -> None:
    plain = [
        TaskColumn(name="ctr", label="click"),
        TaskColumn(name="cvr", label="p", depends_on="ctr"),
    ]
    with pytest.raises(ConfigError, match="names no elapsed column"):
        build("base", plain, delayed_feedback={"method": "window", "window_days": 1.0})
    no_delay = [DELAYED_TASKS[0], TaskColumn(name="cvr", label="p", depends_on="ctr", elapsed="e")]
    build("base", no_delay, delayed_feedback={"method": "window", "window_days": 1.0})  # enough
    with pytest.raises(ConfigError, match="names no delay column"):
        build("esmm", no_delay, delayed_feedback={"method": "dfm"})
    cfg = TrainConfig.model_validate(
        {
            "dataset": {"name": "d", "train": "t.csv", "sparse": [{"name": "user"}],
                        "tasks": [t.model_dump() for t in DELAYED_TASKS]},
            "model": {"type": "base", "delayed_feedback": {"method": "dfm"}},
        }
    )  # fmt: skip
    from tests.training.tiny import SPEC
    from training.models import MODELS

    weights = {"cvr": TaskWeights(label_weight=3.0)}
    with pytest.raises(ConfigError, match=r"tasks\.cvr\.label_weight"):
        MODELS["base"](cfg.model, SPEC, cfg.dataset.tasks, weights)
