"""A recall model for the service tests, trained, exported and published by the real pipeline.

:func:`train_tiny_recall` trains a small DSSM (seconds on two cores) on the same synthetic logs as
the session's ranking model (harness/trained.py), so the raw item ids it recalls are the ids the
ranking snapshot holds and ``/recommend`` can rank them. :func:`publish` copies the published
version into a test's own registry, optionally broken on purpose by ``mutate``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from mtrank.history import HistorySnapshot
from mtrank.recall_artefact import INDEX_DIR
from mtrank.recall_index import INDEX_FILE
from mtrank.recall_index import ITEM_IDS_FILE as INDEX_IDS_FILE
from mtrank.registry import ModelVersion, Registry
from training.recall.config import RecallTrainConfig, load_recall_config
from training.recall.history import build_history
from training.recall.publish import publish_recall
from training.recall.train import train

REPO = Path(__file__).resolve().parents[2]
SMALL: dict[str, object] = {
    "model.embed_dim": 8,
    "model.output_dim": 16,
    "model.user_units": [32],
    "model.item_units": [32],
    "loss.num_negatives": 64,
    "eval.ks": [10, 50],
    "early_stopping.metric": "recall@10",
    "batch_size": 128,
    "device": "cpu",
}


def tiny_config(data_dir: Path, seed: int = 0, epochs: int = 2) -> RecallTrainConfig:
    """training/configs/recall_dssm.yaml at test size on ``data_dir``."""
    values = {**SMALL, "data.data_dir": str(data_dir), "seed": seed, "epochs": epochs}
    return load_recall_config(REPO / "training" / "configs" / "recall_dssm.yaml", values)


@dataclass(frozen=True)
class RecallWorld:
    """Two recall checkpoints on one data set (other seeds) and the users' histories."""

    data_dir: Path
    checkpoints: tuple[Path, Path]
    history: HistorySnapshot
    history_path: Path

    def publish(
        self,
        root: Path,
        name: str,
        *,
        second: bool = False,
        index: Literal["flat", "hnsw"] = "flat",
        mutate: Callable[[Path], None] | None = None,
        promote: bool = True,
    ) -> ModelVersion:
        """Publish a checkpoint as a new version of ``root/name``; ``mutate(version_dir)`` may
        break it afterwards (the registry never edits a version: a test does it on purpose)."""
        mv = publish_recall(
            self.checkpoints[1 if second else 0], root, name, index, promote=False, parity_rows=8
        )
        if mutate is not None:
            mutate(mv.path)
        return Registry(root).promote(name, mv.version) if promote else mv


def train_recall_world(base: Path, data_dir: Path) -> RecallWorld:
    ckpts = []
    for seed in (0, 1):
        result = train(tiny_config(data_dir, seed), base / f"run{seed}", log=False)
        ckpts.append(result.best_checkpoint)
    hist = build_history(data_dir, max_len=30)
    path = hist.save(base / "history.npz")
    return RecallWorld(data_dir, (ckpts[0], ckpts[1]), hist, path)


def index_vectors(version: Path) -> tuple[np.ndarray, np.ndarray]:
    """(raw ids (count,), vectors (count, D)) stored in a version's index, read by faiss."""
    index = faiss.read_index(str(version / INDEX_DIR / INDEX_FILE))
    ids = np.load(version / INDEX_DIR / INDEX_IDS_FILE)
    storage = faiss.downcast_index(index.storage) if hasattr(index, "storage") else index
    return ids, storage.reconstruct_n(0, storage.ntotal)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
