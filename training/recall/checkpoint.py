"""Recall checkpoints: the model with the config, the recall spec and the catalog that rebuild it.

Self-contained (nanoGPT's habit, as training/checkpoint.py): evaluation and export read the
config, the spec and the catalog's encoded features from the file, never from the YAML or the
data folder, so an export embeds exactly the items the model was validated on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrank.recall_spec import RecallSpec
from training.recall.config import RecallTrainConfig
from training.recall.data import Catalog
from training.recall.models import RecallModel, build_recall_model
from training.reports import to_json

RECALL_CHECKPOINT_FORMAT = 1
BEST = "best.pt"
_CATALOG = ("item_ids", "sparse", "dense", "title", "title_len", "clicks")


def save_recall_checkpoint(
    path: Path,
    model: RecallModel,
    cfg: RecallTrainConfig,
    spec: RecallSpec,
    catalog: Catalog,
    **extra: Any,
) -> Path:
    """Write atomically (temp file, then rename); ``extra``: epoch, step, metrics, ..."""
    state = {
        "format": RECALL_CHECKPOINT_FORMAT,
        "kind": "recall",
        "model_state": model.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "spec": spec.to_json(),
        "catalog": {
            k: torch.from_numpy(np.ascontiguousarray(getattr(catalog, k))) for k in _CATALOG
        },
        **to_json(extra),
    }
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_recall_checkpoint(
    path: Path | str, map_location: str = "cpu"
) -> tuple[RecallModel, RecallTrainConfig, RecallSpec, Catalog, dict[str, Any]]:
    """(model in eval mode, config, spec, catalog, the raw checkpoint dict)."""
    ckpt: dict[str, Any] = torch.load(Path(path), map_location=map_location, weights_only=True)
    if ckpt.get("format") != RECALL_CHECKPOINT_FORMAT or ckpt.get("kind") != "recall":
        raise ValueError(f"{path}: not an mtrank recall checkpoint")
    cfg = RecallTrainConfig.model_validate(ckpt["config"])
    spec = RecallSpec.model_validate_json(ckpt["spec"])
    model = build_recall_model(cfg.model, spec)
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    catalog = Catalog(**{k: ckpt["catalog"][k].numpy() for k in _CATALOG})
    return model, cfg, spec, catalog, ckpt
