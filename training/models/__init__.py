"""Model registry: ``build_model(cfg, spec)`` picks the architecture named by ``cfg.model.type``.

One architecture per file; each model owns its loss (``compute_losses``) and its calibrated
outputs (``predict``), so nothing outside this package switches on the model type.
"""

from __future__ import annotations

from mtrank.spec import FeatureSpec
from training.config import TrainConfig
from training.models.base import MultiTaskModel, funnel_pairs
from training.models.esmm import BASEModel, ESMMModel
from training.models.mmoe import MMoEModel
from training.models.mmoe_attention import AttentionMMoEModel
from training.models.omoe import OMoEModel
from training.models.ple import PLEModel
from training.models.shared_bottom import SharedBottomModel
from training.models.single_task import SingleTaskModel

MODELS: dict[str, type[MultiTaskModel]] = {
    "single_task": SingleTaskModel,
    "shared_bottom": SharedBottomModel,
    "omoe": OMoEModel,
    "mmoe": MMoEModel,
    "mmoe_attention": AttentionMMoEModel,
    "ple": PLEModel,
    "esmm": ESMMModel,
    "base": BASEModel,
}


def build_model(cfg: TrainConfig, spec: FeatureSpec) -> MultiTaskModel:
    """The model ``cfg.model.type`` for the dataset's tasks, with their label weights."""
    cls = MODELS[cfg.model.type]
    weights = {t.name: cfg.weights(t.name) for t in cfg.dataset.tasks}
    return cls(cfg.model, spec, cfg.dataset.tasks, weights)


__all__ = ["MODELS", "MultiTaskModel", "build_model", "funnel_pairs"]
