"""Model registry: ``build_model(cfg, spec)`` picks the architecture named by ``cfg.model.type``.

The list of model types is ``training.config.MODEL_TYPES`` (name -> "module:Class" in this
package), declared once, where the config validates ``model.type`` without importing torch or
this package. ``MODELS`` resolves it to the classes. One architecture per file; each model owns
its loss (``compute_losses``) and its calibrated outputs (``predict``), so nothing outside this
package switches on the model type.
"""

from __future__ import annotations

from importlib import import_module

from mtrank.spec import FeatureSpec
from training.config import MODEL_TYPES, TrainConfig
from training.models.base import MultiTaskModel, funnel_pairs


def _resolve(path: str) -> type[MultiTaskModel]:
    module, name = path.split(":")
    cls = getattr(import_module(f"{__name__}.{module}"), name)
    if not (isinstance(cls, type) and issubclass(cls, MultiTaskModel)):
        raise TypeError(f"MODEL_TYPES entry {path!r} is not a MultiTaskModel")
    return cls


MODELS: dict[str, type[MultiTaskModel]] = {t: _resolve(p) for t, p in MODEL_TYPES.items()}


def build_model(cfg: TrainConfig, spec: FeatureSpec) -> MultiTaskModel:
    """The model ``cfg.model.type`` for the dataset's tasks, with their label weights."""
    cls = MODELS[cfg.model.type]
    weights = {t.name: cfg.weights(t.name) for t in cfg.dataset.tasks}
    return cls(cfg.model, spec, cfg.dataset.tasks, weights)


__all__ = ["MODELS", "MultiTaskModel", "build_model", "funnel_pairs"]
