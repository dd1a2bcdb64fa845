"""Shared-Bottom: hard parameter sharing (Caruana, "Multitask Learning", Machine Learning 1997).

All tasks read one representation computed by a shared MLP; only the towers are task-specific.
The simplest multi-task baseline, and the bottom that ESMM uses by default.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ModelConfig
from training.models.base import Bottom, MultiTaskModel
from training.models.layers import MLP, InputLayer


class SharedBottom(Bottom):
    """Input layer -> MLP(bottom_units); the same (B, d) tensor goes to every tower."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        self.n_towers = n_towers
        self.inputs = InputLayer(spec, cfg.embed_dim)
        self.mlp = MLP(self.inputs.out_dim, cfg.bottom_units, cfg.dropout)
        self.out_dim = self.mlp.out_dim

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        h = self.mlp(self.inputs(sparse, dense))  # (B, d)
        return [h] * self.n_towers

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()


class SharedBottomModel(MultiTaskModel):
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return SharedBottom(cfg, spec, n_towers)
