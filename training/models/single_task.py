"""Single-task baseline: one independent DNN per task, nothing shared.

Each task has its own embedding table and MLP (``bottom_units``), so the model is exactly T
separate models trained side by side: the yardstick the multi-task architectures must beat.
It has no shared parameters, so MGDA / PE-LTR have nothing to balance and refuse it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ModelConfig
from training.models.base import Bottom, MultiTaskModel
from training.models.layers import MLP, InputLayer


class SeparateBottoms(Bottom):
    """One (input layer, MLP) pair per tower."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        inputs = [InputLayer(spec, cfg.embed_dim) for _ in range(n_towers)]
        mlps = [MLP(inp.out_dim, cfg.bottom_units, cfg.dropout) for inp in inputs]
        self.inputs = nn.ModuleList(inputs)
        self.mlps = nn.ModuleList(mlps)
        self.out_dim = mlps[0].out_dim

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        return [
            mlp(inp(sparse, dense))  # (B, d)
            for inp, mlp in zip(self.inputs, self.mlps, strict=True)
        ]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())


class SingleTaskModel(MultiTaskModel):
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return SeparateBottoms(cfg, spec, n_towers)
