"""Soft parameter sharing: one network per task, coupled softly. The two baselines the MMoE paper
(Ma et al., KDD 2018) compares against:

- ``cross_stitch``: Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task
  Learning", CVPR 2016. After every layer a cross-stitch unit replaces each task's activations
  by a learned linear combination of all tasks' activations, x̃_s = Σ_t α_st x_t, one T x T
  matrix α per layer (the paper's per-layer unit; it also has a per-channel variant). α starts
  as the identity (``cross_stitch.self_weight: 1``): the columns begin independent and learn how
  much to share. The paper's own initialisation (α_S = 0.9 on the diagonal, the rest shared) is
  ``self_weight: 0.9``; the rows of α start summing to 1 either way.
- ``l2_constrained``: Duong, Cohn, Bird & Cook, "Low Resource Dependency Parsing: Cross-lingual
  Parameter Sharing in a Neural Network Parser", ACL 2015. Separate task networks whose
  corresponding layers are pulled together by λ Σ_{s<t} ‖W_s - W_t‖² (the paper's two-network
  penalty summed over task pairs), over every weight and bias of the columns. The towers, the
  task-specific heads, are not penalised.

Both start from one shared input layer (embeddings) and put the per-task columns (``bottom_units``)
above it, as every architecture here shares its input layer: the papers' columns start from the
raw input, which for id features would mean one embedding table per task. The columns run as
one batched matmul per layer (layers.Experts with one "expert" per task).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ConfigError, ModelConfig, TaskColumn, TaskWeights
from training.models.base import Bottom, MultiTaskModel
from training.models.layers import Experts, InputLayer


class TaskColumns(Bottom):
    """A shared input layer, then one independent MLP (``bottom_units``) per tower."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        if not cfg.bottom_units:
            raise ConfigError(f"model {cfg.type!r} needs per-task columns: bottom_units is empty")
        self.inputs = InputLayer(spec, cfg.embed_dim)
        self.columns = Experts(n_towers, self.inputs.out_dim, cfg.bottom_units, cfg.dropout)
        self.out_dim = self.columns.out_dim

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        h = self.columns.forward_shared(self.inputs(sparse, dense))  # (B, T, d)
        return list(h.unbind(1))  # T x (B, d)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.inputs.parameters()


def stitch_init(n: int, self_weight: float) -> Tensor:
    """(n, n) α: ``self_weight`` on the diagonal, the rest of each row shared equally."""
    if n == 1:
        return torch.ones(1, 1)
    off = (1.0 - self_weight) / (n - 1)
    return torch.full((n, n), off) + (self_weight - off) * torch.eye(n)  # rows sum to 1


class CrossStitchBottom(Bottom):
    """Input layer, then per layer: T columns (one batched matmul), then a cross-stitch unit."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        if not cfg.bottom_units:
            raise ConfigError("model 'cross_stitch' needs per-task columns: bottom_units is empty")
        self.inputs = InputLayer(spec, cfg.embed_dim)
        first, *rest = cfg.bottom_units
        # one layer of T columns each (one batched matmul); the first reads the shared input
        self.first = Experts(n_towers, self.inputs.out_dim, [first], cfg.dropout)
        self.rest = nn.ModuleList(
            Experts(n_towers, d_in, [d_out], cfg.dropout)
            for d_in, d_out in zip(cfg.bottom_units, rest, strict=False)
        )
        self.alphas = nn.ParameterList(
            nn.Parameter(stitch_init(n_towers, cfg.cross_stitch.self_weight))  # (T, T)
            for _ in cfg.bottom_units
        )
        self.out_dim = cfg.bottom_units[-1]

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        h = self.first.forward_shared(self.inputs(sparse, dense))  # (B, F) -> (B, T, d_1)
        h = torch.matmul(self.alphas[0], h)  # (T, T) @ (B, T, d): row s = Σ_t α_st column t
        for layer, alpha in zip(self.rest, self.alphas[1:], strict=True):
            h = torch.matmul(alpha, layer(h))  # (B, T, d_i) -> (B, T, d_i+1), stitched
        return list(h.unbind(1))  # T x (B, d)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        # through the α every column reaches every task's loss
        return self.parameters()


class CrossStitchModel(MultiTaskModel):
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return CrossStitchBottom(cfg, spec, n_towers)


def pairwise_l2(stacked: Tensor) -> Tensor:
    """Each task's share of Σ_{s<t} ‖W_s - W_t‖²: (T, ...) one slice per task -> (T,).

    Σ_{s<t} ‖W_s - W_t‖² = T Σ_t ‖W_t - W̄‖², so task t's share is T ‖W_t - W̄‖².
    """
    n = stacked.shape[0]
    dev = stacked - stacked.mean(dim=0, keepdim=True)  # (T, ...)
    return n * dev.pow(2).reshape(n, -1).sum(dim=1)  # (T,)


class L2ConstrainedModel(MultiTaskModel):
    """Separate task columns; each task's loss carries λ x its share of the pairwise penalty."""

    bottom: TaskColumns

    def __init__(
        self,
        cfg: ModelConfig,
        spec: FeatureSpec,
        tasks: Sequence[TaskColumn],
        weights: Mapping[str, TaskWeights] | None = None,
    ) -> None:
        super().__init__(cfg, spec, tasks, weights)
        self.l2_weight = cfg.l2_constrained.weight

    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return TaskColumns(cfg, spec, n_towers)

    def penalty(self) -> Tensor:
        """(T,) λ x each task's share of Σ_layers Σ_{s<t} ‖W_s - W_t‖² (weights and biases)."""
        cols = self.bottom.columns
        params = [*cols.weights, *cols.biases]  # (T, in, out) and (T, out) per layer
        return self.l2_weight * torch.stack([pairwise_l2(p) for p in params]).sum(dim=0)

    def compute_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        losses = super().compute_losses(outputs, labels, label_weights)
        if self.l2_weight == 0.0:
            return losses
        shares = self.penalty()  # (T,)
        return {n: losses[n] + shares[k] for k, n in enumerate(self.task_names)}
