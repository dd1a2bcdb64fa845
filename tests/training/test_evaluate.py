"""The evaluation report: per-task metrics, funnel metrics, strict JSON, and the two CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput
from training import evaluate as ev
from training import train as tr
from training.checkpoint import load_checkpoint
from training.config import DatasetSpec, ModelConfig, SparseColumn, TaskColumn, TrainConfig
from training.data import Encoded
from training.metrics import auc, calibration, gauc, logloss, rmse
from training.models import build_model
from training.models.base import MultiTaskModel
from training.reports import write_report

TASKS = [
    TaskColumn(name="ctr", label="click"),
    TaskColumn(name="cvr", label="purchase", depends_on="ctr"),
    TaskColumn(name="stay", label="stay", kind="regression"),
]
SPEC = FeatureSpec(
    sparse=[SparseField(name="item", source="item", vocab=[f"i{i}" for i in range(10)])],
    dense=[DenseField(name="price", source="item", mean=0.0, std=1.0, default=0.0)],
    outputs=[TaskOutput(name=t.name, kind=t.kind) for t in TASKS],
)


def data(n: int = 400, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.4).astype(np.float32)
    cf = (rng.random(n) < 0.3).astype(np.float32)
    return Encoded(
        sparse=rng.integers(0, 11, (n, 1)).astype(np.int64),
        dense=rng.normal(size=(n, 1)).astype(np.float32),
        labels={"ctr": click, "cvr": click * cf, "stay": rng.normal(size=n).astype(np.float32)},
        groups=rng.integers(0, 8, n).astype(np.int64),
        truth={"cf_purchase": cf},
    )


def model(kind: str) -> MultiTaskModel:
    ds = DatasetSpec(name="t", train="x.csv", sparse=[SparseColumn(name="item")], tasks=TASKS)
    cfg = TrainConfig(
        dataset=ds,
        model=ModelConfig(type=kind, embed_dim=3, bottom_units=[4], expert_units=[4]),
    )
    torch.manual_seed(0)
    return build_model(cfg, SPEC).eval()


def all_predictions(m: MultiTaskModel, d: Encoded) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = m.predict(torch.from_numpy(d.sparse), torch.from_numpy(d.dense))
    return {k: v.numpy() for k, v in out.items()}


def test_report_per_task_matches_the_metric_functions() -> None:
    d, m = data(), model("mmoe")
    report = ev.evaluate(m, d, TASKS, batch_size=64)  # several batches, concatenated in order
    p = all_predictions(m, d)
    ctr = report["tasks"]["ctr"]
    assert ctr["auc"] == pytest.approx(auc(d.labels["ctr"], p["ctr"]), abs=1e-9)
    assert ctr["logloss"] == pytest.approx(logloss(d.labels["ctr"], p["ctr"]), rel=1e-5)
    assert ctr["gauc"] == pytest.approx(gauc(d.labels["ctr"], p["ctr"], d.groups), abs=1e-9)
    assert ctr["calibration"]["mean_pred"] == pytest.approx(float(p["ctr"].mean()), rel=1e-5)
    assert ctr["calibration"]["mean_label"] == pytest.approx(0.4, abs=0.06)
    assert report["tasks"]["stay"]["rmse"] == pytest.approx(
        rmse(d.labels["stay"], p["stay"]), rel=1e-5
    )
    assert "auc" not in report["tasks"]["stay"]
    with torch.no_grad():
        s, x = torch.from_numpy(d.sparse), torch.from_numpy(d.dense)
        labels = {k: torch.from_numpy(v) for k, v in d.labels.items()}
        losses = m.compute_losses(m(s, x), labels)
    assert report["loss"] == pytest.approx(sum(float(v) for v in losses.values()), rel=1e-4)


def test_funnel_metrics_product_when_the_model_has_no_joint_output() -> None:
    d, m = data(), model("mmoe")
    f = ev.evaluate(m, d, TASKS)["funnels"]["cvr"]
    p = all_predictions(m, d)
    clicked = d.labels["ctr"] == 1
    assert f["parent"] == "ctr"
    assert f["auc_clicked"] == pytest.approx(auc(d.labels["cvr"][clicked], p["cvr"][clicked]))
    truth = np.asarray(d.truth["cf_purchase"], dtype=np.float64)
    assert f["auc_entire_space"] == pytest.approx(auc(truth, p["cvr"]))
    assert f["ece_entire_space"] == pytest.approx(calibration(truth, p["cvr"])["ece"])
    assert f["bias_entire_space"] == pytest.approx(p["cvr"].mean() - truth.mean())
    assert f["ctcvr_source"] == "ctr x cvr"
    assert f["ctcvr_auc"] == pytest.approx(
        auc(d.labels["ctr"] * d.labels["cvr"], p["ctr"] * p["cvr"])
    )


def test_funnel_metrics_use_esmm_joint_output() -> None:
    d, m = data(), model("esmm")
    report = ev.evaluate(m, d, TASKS)
    p = all_predictions(m, d)
    f = report["funnels"]["cvr"]
    assert f["ctcvr_source"] == "ctcvr"
    assert f["ctcvr_auc"] == pytest.approx(auc(d.labels["ctr"] * d.labels["cvr"], p["ctcvr"]))
    flat = report["metrics"]
    assert flat["cvr_ctcvr_auc"] == f["ctcvr_auc"]
    assert {"ctr_auc", "ctr_gauc", "ctr_ece", "cvr_auc_clicked", "stay_rmse", "loss"} <= set(flat)


def test_report_json_is_strict(tmp_path: Path) -> None:
    d = data(50)
    no_clicks = Encoded(d.sparse, d.dense, {**d.labels, "ctr": np.zeros(50, np.float32)}, None, {})
    report = ev.evaluate(model("shared_bottom"), no_clicks, TASKS)
    assert np.isnan(report["tasks"]["ctr"]["auc"])  # one class only
    assert (
        "gauc" not in report["tasks"]["ctr"] and "auc_entire_space" not in report["funnels"]["cvr"]
    )
    path = write_report(report, tmp_path / "r.json")
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert loaded["tasks"]["ctr"]["auc"] is None


def test_train_and_evaluate_clis_end_to_end(tmp_path: Path, ecommerce_dataset: DatasetSpec) -> None:
    cfg = {
        "dataset": ecommerce_dataset.model_dump(mode="json"),
        "model": {"type": "esmm", "embed_dim": 4, "bottom_units": [16], "tower_units": [8]},
        "epochs": 1,
        "batch_size": 1024,
        "max_steps": 4,
        "device": "cpu",
        "early_stopping": {"metric": "cvr_auc", "patience": 1},
        "out_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert tr.main(["--config", str(path), "--set", "lr=3e-3", "--out", str(run)]) == 0
    assert (run / "best.pt").exists()
    _, loaded, _, ckpt = load_checkpoint(run / "best.pt")
    assert loaded.lr == 3e-3 and ckpt["step"] == 4
    out = tmp_path / "report.json"
    assert (
        ev.main(["--checkpoint", str(run / "best.pt"), "--split", "test", "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert report["split"] == "test" and report["model_type"] == "esmm"
    assert set(report["funnels"]) == {"cvr", "cart", "collect"}
    assert report["funnels"]["cvr"]["truth_column"] == "cf_purchase"
    assert report["funnels"]["cvr"]["ctcvr_source"] == "ctcvr"
    assert 0.0 <= report["metrics"]["cvr_auc_entire_space"] <= 1.0
    assert report["rows"] > 0
