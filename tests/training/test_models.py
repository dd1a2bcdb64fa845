"""Every architecture: shapes, funnel semantics, label-weight calibration, clean ONNX export."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.training.tiny import spec_for
from training.config import (
    ConfigError,
    DatasetSpec,
    ModelConfig,
    SparseColumn,
    TaskColumn,
    TaskWeights,
    TrainConfig,
)
from training.models import MODELS, build_model
from training.models.base import MultiTaskModel, funnel_pairs

TASKS = [
    TaskColumn(name="ctr", label="click"),
    TaskColumn(name="cvr", label="purchase", depends_on="ctr"),
    TaskColumn(name="cart", label="cart", depends_on="ctr"),
    TaskColumn(name="stay", label="stay", kind="regression"),
]
SPEC = spec_for(TASKS)
SMALL = {
    "embed_dim": 4,
    "bottom_units": [8],
    "expert_units": [8, 6],
    "tower_units": [4],
    "n_experts": 3,
    "ple_levels": 2,
    "ple_specific_experts": 1,
    "ple_shared_experts": 2,
}


def config(model_type: str, tasks: list[TaskColumn] | None = None, **model: Any) -> TrainConfig:
    ds = DatasetSpec(
        name="tiny",
        train="unused.csv",
        sparse=[SparseColumn(name="user"), SparseColumn(name="item")],
        tasks=TASKS if tasks is None else tasks,
    )
    arch = ModelConfig.model_validate({**SMALL, **model, "type": model_type})
    return TrainConfig(dataset=ds, model=arch)


def inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([f.vocab_size for f in SPEC.sparse])
    sparse = (torch.rand(rows, 2, generator=g) * sizes).long()  # (R, 2)
    sparse[: rows // 4] = 0  # out-of-vocabulary rows
    dense = torch.randn(rows, 2, generator=g)  # (R, 2)
    return sparse, dense


def build(model_type: str, **model: Any) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_model(config(model_type, **model), SPEC)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_forward_and_predict_shapes(model_type: str) -> None:
    model = build(model_type)
    sparse, dense = inputs(7)
    raw = model(sparse, dense)
    # one raw output per task, in task order; a model may add internal ones after them (DR's
    # imputation tower)
    assert list(raw)[:4] == ["ctr", "cvr", "cart", "stay"]
    assert all(v.shape == (7,) for v in raw.values())
    pred = model.predict(sparse, dense)
    assert list(pred) == model.output_names
    for name, v in pred.items():
        assert v.shape == (7,) and torch.isfinite(v).all()
        if name != "stay":
            assert ((v >= 0) & (v <= 1)).all(), name
    joint = list(model.joint_outputs)
    assert joint in ([], ["ctcvr"]) and (model_type not in ("esmm", "base") or joint)
    assert model.output_names == ["ctr", "cvr", "cart", "stay", *joint]
    labels = {"ctr": torch.ones(7), "cvr": torch.zeros(7), "cart": torch.ones(7)}
    losses = model.compute_losses(raw, {**labels, "stay": torch.randn(7)})
    assert list(losses) == model.task_names
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("bottom", ["shared_bottom", "mmoe", "ple"])
def test_esmm_ctcvr_is_exactly_ctr_times_cvr(bottom: str) -> None:
    for w in (1.0, 3.0):
        cfg = config("esmm", esmm_bottom=bottom).model_copy(
            update={"tasks": {"ctr": TaskWeights(label_weight=w), "cvr": TaskWeights()}}
        )
        torch.manual_seed(0)
        model = build_model(cfg, SPEC)
        out = model.predict(*inputs(32))
        assert torch.equal(out["ctcvr"], out["ctr"] * out["cvr"])
        assert model.joint_outputs == {"ctcvr": ("ctr", "cvr")}


def test_esmm_loss_is_ctr_bce_plus_ctcvr_bce_on_all_rows() -> None:
    model = build("esmm")
    raw = {
        "ctr": torch.tensor([0.5, -1.0, 2.0]),
        "cvr": torch.tensor([-0.3, 0.7, 1.5]),
        "cart": torch.zeros(3),
        "stay": torch.zeros(3),
    }
    click, buy = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
    labels = {"ctr": click, "cvr": buy, "cart": click, "stay": torch.ones(3)}
    with torch.no_grad():
        losses = model.compute_losses(raw, labels)
    p = torch.sigmoid(raw["ctr"]) * torch.sigmoid(raw["cvr"])  # pCTCVR
    expected = -(click * buy * p.log() + (1 - click * buy) * (1 - p).log()).mean()
    assert float(losses["cvr"]) == pytest.approx(float(expected), rel=1e-5)
    ctr_bce = -(
        click * torch.sigmoid(raw["ctr"]).log() + (1 - click) * torch.sigmoid(-raw["ctr"]).log()
    )
    assert float(losses["ctr"]) == pytest.approx(float(ctr_bce.mean()), rel=1e-5)
    assert float(losses["stay"]) == pytest.approx(1.0)  # ordinary MSE for the other tasks


@pytest.mark.parametrize(
    ("model_type", "task"),
    [("base", "cvr"), ("esmm", "cart")]
    + [(m, t) for m in ("single_task", "shared_bottom", "mmoe", "ple") for t in ("cvr", "cart")],
)
def test_conditional_task_loss_ignores_rows_without_the_parent(model_type: str, task: str) -> None:
    # A task that depends_on a parent is P(child | parent) in every architecture (ESMM's own
    # funnel child excepted): its loss only sees rows where the parent happened.
    model = build(model_type)
    with torch.no_grad():
        raw = model(*inputs(16))
    click = torch.tensor([1.0, 0.0] * 8)
    buy = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    labels = {"ctr": click, "cvr": buy, "cart": buy, "stay": torch.zeros(16)}
    before = model.compute_losses(raw, labels)[task]
    flipped = torch.where(click > 0, buy, 1.0 - buy)  # change every non-clicked label
    after = model.compute_losses(raw, {**labels, task: flipped})[task]
    assert float(before) == float(after)
    changed = torch.where(click > 0, 1.0 - buy, buy)  # change a clicked label: it counts
    assert float(model.compute_losses(raw, {**labels, task: changed})[task]) != float(before)
    # and the masked loss is the mean BCE over the clicked rows only
    m = click > 0
    ref = torch.nn.functional.binary_cross_entropy_with_logits(raw[task][m], buy[m])
    assert float(before) == pytest.approx(float(ref), rel=1e-6)


def test_funnel_models_refuse_data_without_funnel() -> None:
    flat = [TaskColumn(name="ctr", label="click"), TaskColumn(name="like", label="like")]
    for kind in ("esmm", "base"):
        with pytest.raises(ConfigError, match="depends_on"):
            build_model(config(kind, tasks=flat), SPEC)
    assert funnel_pairs(TASKS)[0][1].name == "cvr"


def test_label_weight_on_regression_is_refused() -> None:
    cfg = config("mmoe").model_copy(update={"tasks": {"stay": TaskWeights(label_weight=2.0)}})
    with pytest.raises(ConfigError, match="stay"):
        build_model(cfg, SPEC)


def test_out_of_range_ids_fall_back_to_the_oov_row() -> None:
    model = build("mmoe").eval()
    sparse, dense = inputs(4)
    oov = model.predict(torch.zeros_like(sparse), dense)
    wild = model.predict(torch.full_like(sparse, 10_000), dense)
    neg = model.predict(torch.full_like(sparse, -3), dense)
    for name in model.output_names:
        assert torch.equal(oov[name], wild[name]) and torch.equal(oov[name], neg[name])


def _fit(
    model: MultiTaskModel,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    labels: dict[str, torch.Tensor],
    steps: int,
) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        losses = model.compute_losses(model(sparse, dense), labels)
        torch.autograd.backward(torch.stack(list(losses.values())).sum())
        opt.step()


def test_label_weight_correction_restores_the_base_rate() -> None:
    """Positives weighted 5x: raw sigmoid is inflated; predict() removes the log(5) shift."""
    tasks = [TaskColumn(name="ctr", label="click")]
    cfg = config("shared_bottom", tasks=tasks).model_copy(
        update={"tasks": {"ctr": TaskWeights(label_weight=5.0)}}
    )
    torch.manual_seed(0)
    model = build_model(cfg, SPEC)
    sparse, dense = inputs(2000, seed=1)
    click = (torch.rand(2000, generator=torch.Generator().manual_seed(2)) < 0.1).float()
    _fit(model, sparse, dense, {"ctr": click}, steps=150)
    model.eval()
    with torch.no_grad():
        calibrated = float(model.predict(sparse, dense)["ctr"].mean())
        uncorrected = float(torch.sigmoid(model(sparse, dense)["ctr"]).mean())
    rate = float(click.mean())
    assert abs(calibrated - rate) < 0.02
    assert uncorrected > rate + 0.15  # ~ 5 * 0.1 / (5 * 0.1 + 0.9) = 0.36


def test_esmm_label_weight_correction_on_the_product() -> None:
    """A label weight on cvr weights CTCVR positives; predict() fixes the product's odds."""
    cfg = config("esmm", tasks=TASKS[:2]).model_copy(
        update={
            "tasks": {"ctr": TaskWeights(label_weight=2.0), "cvr": TaskWeights(label_weight=4.0)}
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg, SPEC)
    sparse, dense = inputs(3000, seed=3)
    g = torch.Generator().manual_seed(4)
    click = (torch.rand(3000, generator=g) < 0.3).float()
    buy = click * (torch.rand(3000, generator=g) < 0.2).float()  # ctcvr ~ 0.06
    _fit(model, sparse, dense, {"ctr": click, "cvr": buy}, steps=200)
    model.eval()
    with torch.no_grad():
        out = model.predict(sparse, dense)
        raw = model(sparse, dense)
    assert float(out["ctr"].mean()) == pytest.approx(float(click.mean()), abs=0.02)
    assert float(out["ctcvr"].mean()) == pytest.approx(float(buy.mean()), abs=0.01)
    naive = torch.sigmoid(raw["ctr"]) * torch.sigmoid(raw["cvr"])
    assert float(naive.mean()) > float(buy.mean()) + 0.08


def _onnx_outputs(
    model: MultiTaskModel, sparse: torch.Tensor, dense: torch.Tensor
) -> list[np.ndarray]:
    class Predictor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, s: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model.predict(s, d)
            return tuple(out[n] for n in self.model.output_names)

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            Predictor().eval(),
            (sparse[:4], dense[:4]),
            buf,  # type: ignore[arg-type]
            input_names=["sparse_ids", "dense_values"],
            output_names=model.output_names,
            dynamic_axes={"sparse_ids": {0: "batch"}, "dense_values": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {"sparse_ids": sparse.numpy(), "dense_values": dense.numpy()}
    result: list[np.ndarray] = session.run(None, feeds)
    return result


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_onnx_export_reproduces_predict(model_type: str) -> None:
    cfg = config(model_type)
    if model_type == "esmm":  # exercise the weighted-product path of predict() too
        cfg = cfg.model_copy(update={"tasks": {"cvr": TaskWeights(label_weight=3.0)}})
    torch.manual_seed(0)
    model = build_model(cfg, SPEC).eval()
    sparse, dense = inputs(64, seed=5)
    assert (sparse == 0).any()
    with torch.no_grad():
        expected = model.predict(sparse, dense)
    got = _onnx_outputs(model, sparse, dense)
    assert len(got) == len(model.output_names)
    for name, arr in zip(model.output_names, got, strict=True):
        assert arr.shape == (64,)
        np.testing.assert_allclose(arr, expected[name].numpy(), atol=1e-5, err_msg=name)


def test_log1p_regression_target_is_fitted_in_log_space_and_served_in_units() -> None:
    tasks = [
        *TASKS[:3],
        TaskColumn(name="stay", label="stay", kind="regression", transform="log1p"),
    ]
    model = build_model(config("mmoe", tasks=tasks), SPEC).eval()
    raw = {n: torch.zeros(4) for n in ("ctr", "cvr", "cart")} | {
        "stay": torch.log1p(torch.tensor([0.0, 1.0, 9.0, 99.0]))
    }
    labels = {n: torch.zeros(4) for n in ("ctr", "cvr", "cart")} | {
        "stay": torch.tensor([0.0, 1.0, 9.0, 99.0])
    }
    # a prediction equal to log1p(label) has zero loss ...
    assert float(model.compute_losses(raw, labels)["stay"]) == pytest.approx(0.0, abs=1e-10)
    # ... and predict() returns seconds again
    out = model.calibrated(raw)
    np.testing.assert_allclose(out["stay"].numpy(), [0.0, 1.0, 9.0, 99.0], rtol=1e-5)
    with pytest.raises(ValueError, match="regression tasks only"):
        TaskColumn(name="ctr", label="click", transform="log1p")


def test_experts_shared_input_path_equals_the_per_expert_path() -> None:
    from training.models.layers import Experts

    torch.manual_seed(0)
    experts = Experts(n=4, in_dim=12, units=[16, 8]).eval()
    x = torch.randn(5, 12)  # (B, in)
    per_expert = experts(x.unsqueeze(1).expand(-1, 4, -1))  # (B, n, d)
    shared = experts.forward_shared(x)  # (B, n, d)
    torch.testing.assert_close(shared, per_expert, rtol=1e-6, atol=1e-6)
    # and each expert is an independent MLP: expert 2 by hand
    h = torch.relu(x @ experts.weights[0][2] + experts.biases[0][2])
    h = torch.relu(h @ experts.weights[1][2] + experts.biases[1][2])
    torch.testing.assert_close(shared[:, 2], h, rtol=1e-6, atol=1e-6)


def test_model_types_are_declared_once_and_checked_when_a_config_loads(tmp_path: Path) -> None:
    from training.config import MODEL_TYPES, load_train_config

    assert list(MODELS) == list(MODEL_TYPES)  # every entry resolves to a MultiTaskModel
    path = tmp_path / "bad.yaml"
    path.write_text(
        "dataset: {name: t, train: x.csv, sparse: [{name: user}], tasks: [{name: ctr, label: y}]}\n"
        "model: {type: mmoe_v2}\n"
    )
    with pytest.raises(ConfigError, match=r"unknown model type 'mmoe_v2'; known types: .*escm2_dr"):
        load_train_config(path)
    # the check needs neither torch nor training.models: a fresh interpreter proves it
    code = (
        "import sys; from training.config import ModelConfig; "
        "ModelConfig.model_validate({'type': 'aitm'}); "
        "assert 'torch' not in sys.modules and 'training.models' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
