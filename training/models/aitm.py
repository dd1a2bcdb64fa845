"""Adaptive Information Transfer Multi-task (AITM): Xi et al., "Modeling the Sequential Dependence
among Audience Multi-step Conversions with Multi-task Learning in Targeted Display
Advertising", KDD 2021.

A conversion funnel is a chain of steps (impression -> click -> cart -> purchase, set by
``aitm.chain``); step t can only happen after step t-1. Every task has its own tower on shared
embeddings (here ``TaskColumns``: one MLP per task, ``bottom_units``), giving q_t. Along the
chain, the Adaptive Information Transfer (AIT) module lets step t read what step t-1 learnt:

    p_{t-1} = g(z_{t-1})                              transferred info, g = Linear + ReLU
    u in {p_{t-1}, q_t}:  ŵ_u = <h1(u), h2(u)> / sqrt(d),  w = softmax(ŵ) over the two
    z_t = Σ_u w_u h3(u)                               (h1, h2, h3: linear maps d -> d)

with z_1 = q_1. Shapes: p, q, z (B, d) with d = bottom_units[-1]; attention weights (B, 2).
Each task's prediction layer (a ``Tower`` with ``tower_units``; ``[]`` is the paper's single
layer) maps z_t to a logit. Chain tasks are unconditional probabilities ŷ_t = P(step t |
impression), trained with BCE on every impression, plus the behavioural expectation calibrator

    α Σ_{t>1} mean_i max(ŷ_t - ŷ_{t-1}, 0)            (α = ``aitm.calibrator_weight``)

that penalises a step more likely than the step before it; its term for step t is added to task
t's loss (mtrank's one-loss-per-task contract).

Outputs keep mtrank's meaning whatever the model: a task that ``depends_on`` a parent is
P(child | parent), so ``predict`` serves ŷ_child / ŷ_parent (clipped to [0, 1]) for a chain task
whose parent is in the chain, e.g. cvr = ŷ_purchase / ŷ_click; the fusion formula
``ctr * (alpha + cvr)`` then multiplies back to ŷ_purchase. Tasks outside the chain (dwell time,
collect) keep their own column and tower and the base model's loss. The chain tasks' parents
must come earlier in the chain, so the division is always by a modelled probability.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ConfigError, ModelConfig, TaskColumn, TaskWeights
from training.models.base import Bottom, MultiTaskModel, task_loss
from training.models.soft_sharing import TaskColumns


class AIT(nn.Module):
    """One adaptive information transfer: attention over (transferred p, own q) -> z."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1, self.h2, self.h3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d) p_{t-1}, (B, d) q_t -> (B, d) z_t and (B, 2) attention weights on (p, q)."""
        u = torch.stack([p, q], dim=1)  # (B, 2, d)
        score = (self.h1(u) * self.h2(u)).sum(dim=-1) * self.scale  # (B, 2)
        w = torch.softmax(score, dim=1)  # (B, 2)
        z = (w.unsqueeze(-1) * self.h3(u)).sum(dim=1)  # (B, 2, 1) * (B, 2, d) -> (B, d)
        return z, w


def _ancestry(name: str, by_name: Mapping[str, TaskColumn]) -> list[str]:
    """[root, ..., name] following depends_on."""
    path = [name]
    while (parent := by_name[path[0]].depends_on) is not None:
        path.insert(0, parent)
    return path


def resolve_chain(chain: list[str] | None, tasks: Sequence[TaskColumn]) -> list[str]:
    """The configured chain, checked. None: the longest ``depends_on`` path from a root to a
    task, the first in dataset order among equals ([ctr, cvr] for the ecommerce tasks)."""
    by_name = {t.name: t for t in tasks}
    if chain is None:
        paths = [_ancestry(t.name, by_name) for t in tasks if t.depends_on is not None]
        if not paths:
            raise ConfigError("model 'aitm' needs aitm.chain or a task with depends_on")
        chain = max(paths, key=len)  # max keeps the first of equal length
    for k, name in enumerate(chain):
        if name not in by_name:
            raise ConfigError(f"aitm.chain: unknown task {name!r} (tasks: {sorted(by_name)})")
        task = by_name[name]
        if task.kind != "binary":
            raise ConfigError(f"aitm.chain: task {name!r} must be binary")
        if task.depends_on is not None and task.depends_on not in chain[:k]:
            raise ConfigError(
                f"aitm.chain: {name!r} depends_on {task.depends_on!r}, which must come before "
                f"it in the chain {chain}"
            )
    return list(chain)


class AITMModel(MultiTaskModel):
    """Per-task columns, AIT steps along ``aitm.chain``, the calibrator in the chain's losses."""

    def __init__(
        self,
        cfg: ModelConfig,
        spec: FeatureSpec,
        tasks: Sequence[TaskColumn],
        weights: Mapping[str, TaskWeights] | None = None,
    ) -> None:
        chain = resolve_chain(cfg.aitm.chain, tasks)
        super().__init__(cfg, spec, tasks, weights)
        self.chain = chain
        self.chain_index = [self.task_names.index(n) for n in chain]
        d = self.bottom.out_dim
        steps = len(chain) - 1
        self.transfer = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(steps)
        )
        self.ait = nn.ModuleList(AIT(d) for _ in range(steps))
        self.calibrator_weight = cfg.aitm.calibrator_weight

    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return TaskColumns(cfg, spec, n_towers)

    def forward(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        z = self.bottom(sparse, dense)  # T x (B, d): q_t, replaced by z_t along the chain
        for k, (g, ait) in enumerate(zip(self.transfer, self.ait, strict=True)):
            prev, cur = self.chain_index[k], self.chain_index[k + 1]
            z[cur], _ = ait(g(z[prev]), z[cur])  # p_{t-1} (B, d), q_t (B, d) -> z_t (B, d)
        return self.heads(z)

    def compute_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        lw = self.label_weights if label_weights is None else label_weights
        losses = self.task_losses(outputs, labels, lw, skip=self.chain)
        for n in self.chain:  # unconditional: every impression, the label as it is
            losses[n] = task_loss(outputs[n], labels[n], "binary", lw.get(n, 1.0))
        if self.calibrator_weight > 0.0:
            y = self.calibrated({n: outputs[n] for n in self.task_names})  # ŷ_t (B,)
            for parent, child in pairwise(self.chain):
                excess = torch.relu(y[child] - y[parent]).mean()  # child more likely than parent
                losses[child] = losses[child] + self.calibrator_weight * excess
        return {n: losses[n] for n in self.task_names}

    def output_biases(self, base_rates: Mapping[str, float]) -> dict[str, float]:
        """Chain outputs are unconditional: P(t) = P(t | parent) x P(parent) along the chain."""
        rates = dict(base_rates)
        for name in self.chain:  # parents come first in the chain
            parent = self.parents[name]
            if parent is not None:
                rates[name] = base_rates[name] * rates[parent]
        return super().output_biases(rates)

    def loss_rows(self, name: str, labels: Mapping[str, Tensor]) -> float:
        if name in self.chain:
            return float(len(labels[name]))
        return super().loss_rows(name, labels)

    def predict(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        joint = self.calibrated(self(sparse, dense))  # chain tasks: ŷ_t unconditional
        out = dict(joint)
        for name in self.chain:
            parent = self.parents[name]
            if parent is not None:  # served as P(child | parent), like every architecture
                out[name] = (joint[name] / joint[parent].clamp(min=1e-12)).clamp(0.0, 1.0)
        return out
