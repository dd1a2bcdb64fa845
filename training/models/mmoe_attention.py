"""MMoE with attention gates: each task mixes the experts by attending over their outputs.

A variant of MMoE (Ma et al., KDD 2018) in which a task's gate is not a function of the input
alone: each task k owns a learned context vector q_k used as the attention query, the experts'
outputs (projected by a shared key map K) are the keys and values,

    a_k = softmax_i(<K e_i(x), q_k> / sqrt(d)),   h_k = sum_i a_k,i e_i(x),

so the mixture weights depend on what the experts actually produced for this example rather than
on a linear map of the raw input. This is the project's own variant (attention with a learned
per-task query, as in additive/dot-product attention pooling), not a published architecture.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ModelConfig
from training.models.base import Bottom, MultiTaskModel
from training.models.layers import Experts, InputLayer


class AttentionMoEBottom(Bottom):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        self.inputs = InputLayer(spec, cfg.embed_dim)
        self.experts = Experts(cfg.n_experts, self.inputs.out_dim, cfg.expert_units, cfg.dropout)
        d = self.experts.out_dim
        self.key = nn.Linear(d, d, bias=False)
        self.queries = nn.Parameter(torch.randn(n_towers, d) / math.sqrt(d))  # (T, d)
        self.scale = 1.0 / math.sqrt(d)
        self.out_dim = d

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        x = self.inputs(sparse, dense)  # (B, F)
        e = self.experts.forward_shared(x)  # (B, n, d)
        k = self.key(e)  # (B, n, d)
        scores = torch.einsum("bnd,td->btn", k, self.queries) * self.scale  # (B, T, n)
        attn = torch.softmax(scores, dim=-1)  # (B, T, n)
        h = torch.einsum("btn,bnd->btd", attn, e)  # (B, T, d)
        return list(h.unbind(dim=1))  # T x (B, d)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.inputs.parameters()
        yield from self.experts.parameters()
        yield from self.key.parameters()


class AttentionMMoEModel(MultiTaskModel):
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return AttentionMoEBottom(cfg, spec, n_towers)
