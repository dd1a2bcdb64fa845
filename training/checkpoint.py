"""Checkpoints: a trained model with the config and feature spec that rebuild it.

A checkpoint is self-contained (nanoGPT's habit): evaluation, export and warm starts read the
model's config and spec from it, never from the YAML file that made it. The trainer adds, as
``extra``, the validation point it holds (epoch, step, metrics, loss weights), the data
fingerprint, and ``base_rates`` / ``output_bias``: each task's rate in the train split and the
output bias it set before the first step (empty when ``init_output_bias`` is off).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mtrank.spec import FeatureSpec
from training.config import TrainConfig
from training.losses import Weighting
from training.models import MultiTaskModel, build_model
from training.reports import to_json

CHECKPOINT_FORMAT = 1
BEST = "best.pt"


def save_checkpoint(
    path: Path,
    model: MultiTaskModel,
    weighting: Weighting,
    cfg: TrainConfig,
    spec: FeatureSpec,
    **extra: Any,
) -> Path:
    """Everything needed to rebuild ``model`` without the config file (written atomically)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_state": model.state_dict(),
        "weighting_state": weighting.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "spec": spec.to_json(),
        **to_json(extra),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: Path | str, map_location: str = "cpu"
) -> tuple[MultiTaskModel, TrainConfig, FeatureSpec, dict[str, Any]]:
    """(model in eval mode, its config, its feature spec, the raw checkpoint dict)."""
    ckpt: dict[str, Any] = torch.load(Path(path), map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an mtrank checkpoint (format {ckpt.get('format')!r})")
    cfg = TrainConfig.model_validate(ckpt["config"])
    spec = FeatureSpec.model_validate_json(ckpt["spec"])
    model = build_model(cfg, spec)
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return model, cfg, spec, ckpt
