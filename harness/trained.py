"""A real end-to-end world: synthetic logs -> train -> export -> snapshot.

Everything the service needs comes out of the training pipeline itself (no hand-built graphs), so
the integration tests and the benchmarks that use it exercise the real contract between the two
halves. Sizes are tiny so the whole chain runs in seconds on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrank.registry import ModelVersion, Registry
from mtrank.snapshot import Snapshot
from mtrank.spec import FeatureSpec
from training.config import TrainConfig, load_train_config
from training.data import PreparedData, prepare
from training.export import export
from training.features import build_snapshot, read_table
from training.synthetic import generate_ecommerce
from training.train import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
TINY_MODEL: dict[str, Any] = {
    "model.embed_dim": 8,
    "model.n_experts": 2,
    "model.expert_units": [32, 16],
    "model.bottom_units": [32, 16],
    "model.tower_units": [16],
    "model.ple_levels": 1,
    "epochs": 2,
    "batch_size": 512,
    "lr": 0.003,
    "early_stopping.metric": "valid_loss",
}


@dataclass
class TrainedWorld:
    """A model trained and exported by the real pipeline, with the data it came from."""

    data_dir: Path  # synthetic logs: {train,valid,test}.parquet, users/items.parquet
    root: Path  # the model registry
    cfg: TrainConfig
    data: PreparedData
    checkpoint: Path
    model: ModelVersion
    spec: FeatureSpec
    snapshot: Snapshot
    snapshot_path: Path


def ecommerce_config(
    data_dir: Path, model_type: str = "mmoe", out_dir: Path | None = None, **overrides: Any
) -> TrainConfig:
    """training/configs/ecommerce_<…>.yaml at test size, reading ``data_dir``."""
    splits = {f"dataset.{s}": str(data_dir / f"{s}.parquet") for s in ("train", "valid", "test")}
    values = {**TINY_MODEL, **splits, "model.type": model_type, **overrides}
    if out_dir is not None:
        values["out_dir"] = str(out_dir)
    return load_train_config(CONFIGS / "ecommerce_mmoe.yaml", values)


def build_trained_world(
    base: Path,
    impressions: int = 20_000,
    seed: int = 11,
    model_type: str = "mmoe",
    name: str = "ecommerce",
) -> TrainedWorld:
    data_dir = base / "data"
    generate_ecommerce(data_dir, impressions, seed)
    cfg = ecommerce_config(data_dir, model_type, out_dir=base / "runs")
    data = prepare(cfg.dataset, base / "cache")
    result = train(cfg, base / "runs", data)
    root = base / "models"
    mv = export(result.best_checkpoint, name, root)
    spec = FeatureSpec.load(mv.path)
    snap = build_snapshot(spec, read_table(data_dir / "users.parquet"),
                          read_table(data_dir / "items.parquet"))  # fmt: skip
    snap_path = snap.save(Registry(root).snapshot_dir(name) / f"{snap.version}.npz")
    return TrainedWorld(
        data_dir, root, cfg, data, result.best_checkpoint, mv, spec, snap, snap_path
    )
