"""One-gate Mixture-of-Experts (OMoE), the baseline of Ma et al., "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018.

n experts read the shared input; ONE softmax gate mixes them, and every task's tower reads the
same mixture. MMoE differs only in giving each task its own gate.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ModelConfig
from training.models.base import Bottom, MultiTaskModel
from training.models.layers import Experts, InputLayer, mix


class OMoEBottom(Bottom):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        self.n_towers = n_towers
        self.inputs = InputLayer(spec, cfg.embed_dim)
        self.experts = Experts(cfg.n_experts, self.inputs.out_dim, cfg.expert_units, cfg.dropout)
        self.gate = nn.Linear(self.inputs.out_dim, cfg.n_experts)
        self.out_dim = self.experts.out_dim

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        x = self.inputs(sparse, dense)  # (B, F)
        e = self.experts.forward_shared(x)  # (B, n, d)
        h = mix(self.gate(x), e)  # (B, d)
        return [h] * self.n_towers

    def gate_weights(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """Each task's mixture over the experts, (T, B, n): the one gate's, for every task."""
        w = torch.softmax(self.gate(self.inputs(sparse, dense)), dim=-1)  # (B, n)
        return w.expand(self.n_towers, *w.shape)  # (T, B, n)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()


class OMoEModel(MultiTaskModel):
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return OMoEBottom(cfg, spec, n_towers)
