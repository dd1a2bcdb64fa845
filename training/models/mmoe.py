"""Multi-gate Mixture-of-Experts (MMoE): Ma et al., "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", KDD 2018.

n shared experts read the input; each task k has its own softmax gate g_k(x) over the experts and
its tower reads sum_i g_k(x)_i * e_i(x). Tasks that disagree learn to use different experts,
which lets MMoE cope with weakly related tasks better than a shared bottom. The experts run as
one batched matmul per layer (layers.Experts).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ModelConfig
from training.models.base import Bottom, MultiTaskModel
from training.models.layers import Experts, InputLayer, mix


class MMoEBottom(Bottom):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        self.inputs = InputLayer(spec, cfg.embed_dim)
        self.experts = Experts(cfg.n_experts, self.inputs.out_dim, cfg.expert_units, cfg.dropout)
        self.gates = nn.ModuleList(
            nn.Linear(self.inputs.out_dim, cfg.n_experts) for _ in range(n_towers)
        )
        self.out_dim = self.experts.out_dim

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        x = self.inputs(sparse, dense)  # (B, F)
        e = self.experts.forward_shared(x)  # (B, n, d)
        return [mix(gate(x), e) for gate in self.gates]  # T x (B, d)

    def gate_weights(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """Each task's mixture over the experts, (T, B, n): what tower k's input weighs."""
        x = self.inputs(sparse, dense)  # (B, F)
        return torch.stack([torch.softmax(gate(x), dim=-1) for gate in self.gates])  # (T, B, n)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.inputs.parameters()
        yield from self.experts.parameters()


class MMoEModel(MultiTaskModel):
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return MMoEBottom(cfg, spec, n_towers)
