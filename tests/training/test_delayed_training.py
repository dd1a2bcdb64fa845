"""Delayed feedback end to end: generated data with delays -> the data pipeline's timing columns
-> a short training run of every method -> evaluation -> ``mtrank export``'s parity gate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from training.checkpoint import load_checkpoint
from training.config import (
    DatasetSpec,
    TaskColumn,
    TrainConfig,
    load_dataset_spec,
    timing_key,
)
from training.data import DataError, prepare
from training.evaluate import evaluate
from training.export import export
from training.synthetic import generate_ecommerce
from training.train import main as train_main
from training.train import train

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"
METHODS = {
    "naive": {"method": "naive"},
    "window": {"method": "window", "window_days": 2.0},
    "dfm": {"method": "dfm"},
    "es_dfm": {"method": "es_dfm", "complete_after_days": 5.0},
    "es_dfm_stream": {"method": "es_dfm", "complete_after_days": 5.0, "stream_days": 10.0},
}
ELAPSED, DELAY = timing_key("cvr", "elapsed"), timing_key("cvr", "delay")


@pytest.fixture(scope="module")
def delayed_dataset(tmp_path_factory: pytest.TempPathFactory) -> DatasetSpec:
    """20k impressions with delays; cvr is the purchase as observed at the end of the log."""
    out = tmp_path_factory.mktemp("delayed")
    generate_ecommerce(out, 20_000, seed=2, conversion_delays=True)
    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    cvr = TaskColumn(
        name="cvr",
        label="purchase_observed",
        depends_on="ctr",
        elapsed="elapsed_days",
        delay="purchase_delay_days",
    )
    return ds.model_copy(
        update={s: str(out / f"{s}.parquet") for s in ("train", "valid", "test")}
        | {"tasks": [ds.task("ctr"), cvr], "truth_columns": ["purchase"]}
    )


def config(ds: DatasetSpec, model_type: str, method: str, out: Path) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "dataset": ds.model_dump(),
            "model": {
                "type": model_type,
                "embed_dim": 4,
                "bottom_units": [16],
                "tower_units": [8],
                "delayed_feedback": METHODS[method],
            },
            "epochs": 1,
            "batch_size": 512,
            "max_steps": 12,
            "device": "cpu",
            "out_dir": str(out),
        }
    )


def test_the_pipeline_carries_the_timing_columns(
    delayed_dataset: DatasetSpec, tmp_path: Path
) -> None:
    data = prepare(delayed_dataset, tmp_path / "cache")
    table = pq.read_table(delayed_dataset.train)
    y = data.train.labels["cvr"]
    np.testing.assert_allclose(
        data.train.labels[ELAPSED], table.column("elapsed_days").to_numpy(), rtol=1e-6
    )
    raw = np.nan_to_num(table.column("purchase_delay_days").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(data.train.labels[DELAY], np.where(y > 0, raw, 0.0), rtol=1e-6)
    assert 0 < y.sum() < table.column("purchase").to_numpy().sum()  # observed ⊆ eventual
    again = prepare(delayed_dataset, tmp_path / "cache")  # the cache reopens them
    np.testing.assert_array_equal(again.valid.labels[DELAY], data.valid.labels[DELAY])  # type: ignore[union-attr]


def test_a_conversion_after_the_cutoff_is_refused(
    delayed_dataset: DatasetSpec, tmp_path: Path
) -> None:
    table = pq.read_table(delayed_dataset.train)
    seen = pc.equal(table.column("purchase_observed"), 1)
    late = pc.if_else(seen, pc.add(table.column("elapsed_days"), 1.0), None)  # after the cut-off
    bad = table.set_column(
        table.column_names.index("purchase_delay_days"), "purchase_delay_days", late
    )
    pq.write_table(bad, tmp_path / "train.parquet")
    ds = delayed_dataset.model_copy(
        update={"train": str(tmp_path / "train.parquet"), "valid": None, "test": None}
    )
    with pytest.raises(DataError, match="delay column 'purchase_delay_days'.*must lie in"):
        prepare(ds, tmp_path / "cache")


@pytest.mark.parametrize(
    ("model_type", "method"),
    [("base", m) for m in METHODS] + [("esmm", "window"), ("esmm", "dfm"), ("esmm", "es_dfm")],
)
def test_each_method_trains_and_evaluates(
    delayed_dataset: DatasetSpec, tmp_path: Path, model_type: str, method: str
) -> None:
    cfg = config(delayed_dataset, model_type, method, tmp_path)
    data = prepare(delayed_dataset, tmp_path / "cache")
    result = train(cfg, tmp_path / "run", data)
    history = result.history.read_text()
    assert "NaN" not in history and "Infinity" not in history
    model, saved, _, _ = load_checkpoint(result.best_checkpoint)
    assert saved.model.delayed_feedback == cfg.model.delayed_feedback
    report = evaluate(model, data.test, cfg.dataset.tasks)  # type: ignore[arg-type]
    assert all(math.isfinite(v) for v in report["losses"].values())
    assert 0.0 < report["tasks"]["cvr"]["auc"] < 1.0
    assert 0.0 < report["funnels"]["cvr"]["auc_clicked"] < 1.0


def test_the_documented_config_validates() -> None:
    """docs/delayed_feedback.md's example, and each alternative in its comments."""
    text = (REPO / "docs" / "delayed_feedback.md").read_text()
    body = text.split("<!-- example: delayed-config -->", 1)[1].split("```yaml", 1)[1]
    data = yaml.safe_load(body.split("```", 1)[0])
    assert TrainConfig.model_validate(data).model.delayed_feedback.method == "dfm"
    for line in body.split("```", 1)[0].splitlines():
        if line.strip().startswith("# {method"):
            data["model"]["delayed_feedback"] = yaml.safe_load(line.strip()[2:])
            TrainConfig.model_validate(data)


def test_mtrank_train_and_export_a_dfm_model(delayed_dataset: DatasetSpec, tmp_path: Path) -> None:
    """The command line end to end; the export's parity gate passes and serves p only."""
    body = config(delayed_dataset, "base", "dfm", tmp_path).model_dump(mode="json")
    path = tmp_path / "dfm.yaml"
    path.write_text(yaml.safe_dump(body))
    assert train_main(["--config", str(path), "--out", str(tmp_path / "run")]) == 0
    mv = export(tmp_path / "run" / "best.pt", "delayed", root=tmp_path / "models")
    meta = mv.metadata()
    assert [o["name"] for o in meta["outputs"]] == ["ctr", "cvr", "ctcvr"]
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
    assert meta["training_config"]["model"]["delayed_feedback"]["method"] == "dfm"
