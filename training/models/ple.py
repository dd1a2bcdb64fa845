"""Progressive Layered Extraction (PLE): Tang et al., "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020.

PLE stacks Customized Gate Control (CGC) levels. Each level has ``ple_specific_experts`` experts
per task and ``ple_shared_experts`` shared experts. Task k's gate, fed with task k's input, mixes
its own experts and the shared ones; a shared gate, fed with the shared input, mixes all experts
and becomes the next level's shared input. Separating task-specific from shared experts is what
protects tasks from the "seesaw" of negative transfer; stacking levels lets the sharing become
progressively more task-specific. The last level has no shared gate: only the task outputs
continue, to the towers.

All task-specific experts of a level run as one batched matmul, the shared ones as another.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ModelConfig
from training.models.base import Bottom, MultiTaskModel
from training.models.layers import Experts, InputLayer, mix


class CGCLevel(nn.Module):
    """One extraction level: T task inputs + 1 shared input -> T task outputs (+ shared output).

    Args:
        n_tasks: T.
        in_dim: width of every input.
        units: expert MLP sizes.
        n_specific: experts per task (ks).
        n_shared: shared experts (s).
        last: no shared gate (its output would have no reader).
    """

    source: Tensor

    def __init__(
        self,
        n_tasks: int,
        in_dim: int,
        units: list[int],
        n_specific: int,
        n_shared: int,
        last: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.T, self.ks, self.s = n_tasks, n_specific, n_shared
        self.specific = Experts(n_tasks * n_specific, in_dim, units, dropout)
        self.shared = Experts(n_shared, in_dim, units, dropout)
        self.task_gates = nn.ModuleList(
            nn.Linear(in_dim, n_specific + n_shared) for _ in range(n_tasks)
        )
        self.shared_gate = None if last else nn.Linear(in_dim, n_tasks * n_specific + n_shared)
        # expert j of the specific block reads task j // ks's input: one gather builds the inputs
        self.register_buffer(
            "source", torch.arange(n_tasks).repeat_interleave(n_specific), persistent=False
        )  # (T*ks,)
        self.out_dim = self.specific.out_dim

    def forward(self, task_in: Tensor, shared_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """task_in (B, T, F), shared_in (B, F) -> task_out (B, T, d), shared_out (B, d) | None."""
        spec_x = torch.index_select(task_in, 1, self.source)  # (B, T*ks, F)
        e_spec = self.specific(spec_x)  # (B, T*ks, d)
        e_shared = self.shared.forward_shared(shared_in)  # (B, s, d)
        B, d = e_spec.shape[0], e_spec.shape[2]
        per_task = e_spec.reshape(B, self.T, self.ks, d)  # (B, T, ks, d)
        outs = []
        for k, gate in enumerate(self.task_gates):
            pool = torch.cat([per_task[:, k], e_shared], dim=1)  # (B, ks+s, d)
            outs.append(mix(gate(task_in[:, k]), pool))  # (B, d)
        task_out = torch.stack(outs, dim=1)  # (B, T, d)
        if self.shared_gate is None:
            return task_out, None
        everything = torch.cat([e_spec, e_shared], dim=1)  # (B, T*ks+s, d)
        return task_out, mix(self.shared_gate(shared_in), everything)  # (B, d)


class PLEBottom(Bottom):
    """``ple_levels`` CGC levels; level 1 feeds the same input to every task and the shared part."""

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> None:
        super().__init__()
        self.n_towers = n_towers
        self.inputs = InputLayer(spec, cfg.embed_dim)
        levels: list[CGCLevel] = []
        d = self.inputs.out_dim
        for i in range(cfg.ple_levels):
            level = CGCLevel(
                n_towers,
                d,
                cfg.expert_units,
                cfg.ple_specific_experts,
                cfg.ple_shared_experts,
                last=i == cfg.ple_levels - 1,
                dropout=cfg.dropout,
            )
            levels.append(level)
            d = level.out_dim
        self.levels = nn.ModuleList(levels)
        self._typed_levels = levels  # the same modules, for typed access
        self.out_dim = d

    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        x = self.inputs(sparse, dense)  # (B, F)
        task_in = x.unsqueeze(1).expand(-1, self.n_towers, -1)  # (B, T, F)
        shared_in = x  # (B, F)
        for level in self.levels:
            task_in, next_shared = level(task_in, shared_in)  # (B, T, d), (B, d) | None
            if next_shared is not None:  # None only after the last level
                shared_in = next_shared
        return list(task_in.unbind(dim=1))  # T x (B, d)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.inputs.parameters()
        for level in self._typed_levels:
            yield from level.shared.parameters()
            if level.shared_gate is not None:
                yield from level.shared_gate.parameters()


class PLEModel(MultiTaskModel):
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return PLEBottom(cfg, spec, n_towers)
