"""Shared fixtures for the training tests: small, real data written once per session.

``ecommerce_dir`` / ``ecommerce_dataset`` are session-scoped for speed: treat the files as
read-only (copy them to ``tmp_path`` before changing anything).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import DatasetSpec, load_dataset_spec
from training.synthetic import generate_ecommerce

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = REPO / "training" / "configs"
ECOMMERCE_IMPRESSIONS = 20_000
ECOMMERCE_SEED = 7


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only public data sets (../shared/data beside the repository)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def ecommerce_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20k synthetic impressions (seed 7): {train,valid,test}.parquet, users/items, meta.json."""
    out = tmp_path_factory.mktemp("ecommerce")
    generate_ecommerce(out, ECOMMERCE_IMPRESSIONS, ECOMMERCE_SEED)
    return out


@pytest.fixture(scope="session")
def ecommerce_dataset(ecommerce_dir: Path) -> DatasetSpec:
    """training/configs/ecommerce.dataset.yaml pointed at ``ecommerce_dir``."""
    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    return ds.model_copy(
        update={s: str(ecommerce_dir / f"{s}.parquet") for s in ("train", "valid", "test")}
    )
