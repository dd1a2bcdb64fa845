"""Shared fixtures for the recall tests: one small generated data set, read-only.

The session-scoped folder holds 20k synthetic impressions (about 1,100 clicks): enough for the
pipeline and a short training run, small enough for a few seconds on two shared cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.recall.config import RecallTrainConfig, load_recall_config
from training.recall.data import RecallData, prepare
from training.synthetic import generate_ecommerce

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "training" / "configs"


@pytest.fixture(scope="session")
def recall_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recall_ecommerce")
    generate_ecommerce(out, 20_000, 3)
    return out


def small_config(data_dir: Path, name: str = "dssm", **overrides: object) -> RecallTrainConfig:
    """training/configs/recall_<name>.yaml on ``data_dir``, small sizes, CPU."""
    base: dict[str, object] = {
        "data.data_dir": str(data_dir),
        "model.embed_dim": 8,
        "model.output_dim": 16,
        "model.user_units": [32],
        "model.item_units": [32],
        "model.text_embed_dim": 8,
        "model.text_channels": 16,
        "loss.num_negatives": 64,
        "epochs": 2,
        "batch_size": 128,
        "device": "cpu",
    }
    if name == "youtube_dnn":
        base.pop("model.item_units")
        base.pop("model.text_embed_dim")
        base.pop("model.text_channels")
    return load_recall_config(CONFIGS / f"recall_{name}.yaml", base | overrides)


@pytest.fixture(scope="session")
def recall_data(recall_dir: Path) -> RecallData:
    return prepare(small_config(recall_dir, "cnn_dssm"))
