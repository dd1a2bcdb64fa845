"""What every multi-task ranking model is: a bottom, one tower per task, and its own loss.

A model is built from the architecture config, the feature contract and the dataset's tasks. Its
``forward`` returns raw outputs (logits for binary tasks, values for regression), its
``compute_losses`` one scalar per task, and its ``predict`` the calibrated outputs that the
exported graph serves. The trainer only ever calls these, so it never switches on model type.

Conditional tasks: a task that ``depends_on`` a parent (cvr on ctr, cart on ctr) is trained on the
rows where the parent label is positive, so its output is P(child | parent) for every architecture
— the meaning the fusion formula multiplies (``ctr * (alpha + cvr)``). This is the classic
click-space CVR model (ESMM's BASE); ESMM replaces it for its funnel by the entire-space product.

Regression targets declared ``transform: log1p`` (dwell seconds) are fitted in log space and
``predict`` returns them in the label's units again.

Label-weight calibration: training a binary task with positives weighted by w moves the optimal
logit from log-odds(p) to log-odds(p) + log w (the weighted likelihood is maximised at odds
w * p / (1 - p)). ``predict`` subtracts log w again so the exported probabilities stay calibrated.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrank.spec import FeatureSpec, TaskOutput
from training.config import ConfigError, ModelConfig, TaskColumn, TaskWeights
from training.models.layers import Tower


class Bottom(nn.Module, ABC):
    """Maps the model inputs to one representation per tower (the part that architectures vary).

    Subclasses set ``out_dim`` (the width of each representation) and say which of their
    parameters every task shares (what MGDA / PE-LTR balance gradients over).
    """

    out_dim: int

    @abstractmethod
    def forward(self, sparse: Tensor, dense: Tensor) -> list[Tensor]:
        """(B, S) int64 ids, (B, D) float32 values -> one (B, out_dim) tensor per tower."""

    @abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters on the path of every task's loss."""


def funnel_pairs(tasks: Sequence[TaskColumn]) -> list[tuple[TaskColumn, TaskColumn]]:
    """(parent, child) for each task that ``depends_on`` another (cvr depends on ctr)."""
    by_name = {t.name: t for t in tasks}
    return [(by_name[t.depends_on], t) for t in tasks if t.depends_on is not None]


class MultiTaskModel(nn.Module, ABC):
    """Base of every architecture.

    Args:
        cfg: architecture and sizes.
        spec: the feature contract (column order, vocabulary sizes).
        tasks: the dataset's tasks, in output order.
        weights: per-task weights by name; only ``label_weight`` matters here (loss weights are
            the weighting strategy's business). Missing tasks get the defaults.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        spec: FeatureSpec,
        tasks: Sequence[TaskColumn],
        weights: Mapping[str, TaskWeights] | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ConfigError("a model needs at least one task")
        weights = weights or {}
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.task_kinds = {t.name: t.kind for t in tasks}
        self.parents = {t.name: t.depends_on for t in tasks}
        self.log_targets = {t.name for t in tasks if t.transform == "log1p"}
        self.label_weights = {
            t.name: weights.get(t.name, TaskWeights()).label_weight for t in tasks
        }
        for t in tasks:
            if t.kind != "binary" and self.label_weights[t.name] != 1.0:
                raise ConfigError(f"tasks.{t.name}.label_weight applies to binary tasks only")
        self.bottom = self.build_bottom(cfg, spec, len(tasks))
        self.towers = nn.ModuleList(
            Tower(self.bottom.out_dim, cfg.tower_units, cfg.dropout) for _ in tasks
        )

    @abstractmethod
    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        """The architecture: a :class:`Bottom` producing ``n_towers`` representations."""

    # ------------------------------------------------------------------ outputs
    @property
    def output_names(self) -> list[str]:
        """Names of ``predict``'s outputs, in the exported graph's output order."""
        return list(self.task_names)

    @property
    def outputs(self) -> list[TaskOutput]:
        """``output_names`` with their kinds, as the feature spec records them."""
        return [
            TaskOutput(name=n, kind=self.task_kinds.get(n, "binary")) for n in self.output_names
        ]

    @property
    def joint_outputs(self) -> dict[str, tuple[str, str]]:
        """Outputs that are a funnel's joint probability: name -> (parent, child). None here."""
        return {}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.shared_parameters())

    # ------------------------------------------------------------------ initial outputs
    def output_layers(self) -> dict[str, nn.Linear]:
        """The last linear unit of each task's raw output, by task name.

        ``init_output_bias`` sets their biases. A model whose task outputs do not come from
        ``self.towers`` overrides this (and ``output_biases`` if its outputs mean something
        other than the base model's).
        """
        towers = cast(list[Tower], list(self.towers))
        return {n: tower.out for n, tower in zip(self.task_names, towers, strict=True)}

    def output_biases(self, base_rates: Mapping[str, float]) -> dict[str, float]:
        """The bias at which each untrained output predicts its task's base rate.

        ``base_rates`` are the data's rates in the tasks' own meaning (data.label_base_rates):
        binary P(task) or, for a conditional task, P(task | parent); regression the mean target
        in its fitted space. Binary: log-odds(p) + log(label_weight), the weighted optimum that
        ``calibrated`` shifts back to p. Regression: the mean itself. Models whose raw outputs
        mean something else (an unconditional chain step, a funnel product) override this.
        """
        out: dict[str, float] = {}
        for name in self.task_names:
            rate = base_rates[name]
            if self.task_kinds[name] == "binary":
                out[name] = logit(rate) + math.log(self.label_weights[name])
            else:
                out[name] = rate
        return out

    @torch.no_grad()
    def init_output_bias(self, base_rates: Mapping[str, float]) -> dict[str, float]:
        """Set every output layer's bias from the base rates; return the biases set.

        A tower starting at p = 0.5 spends its first updates pushing every output down, and a
        conditional task does so only on parent-positive rows, which teaches the shared layers
        to score likely clicks low (docs/benchmarks.md, "Training from step one").
        """
        biases = self.output_biases(base_rates)
        for name, layer in self.output_layers().items():
            if layer.bias is None:
                raise ValueError(f"output layer of {name!r} has no bias to initialise")
            layer.bias.fill_(biases[name])
        return biases

    # ------------------------------------------------------------------ compute
    def forward(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        return self.heads(self.bottom(sparse, dense))

    def heads(self, reps: Sequence[Tensor]) -> dict[str, Tensor]:
        """Each task's tower on its representation: T x (B, d) -> {task: (B,) raw output}."""
        return {
            name: tower(h)  # (B,)
            for name, tower, h in zip(self.task_names, self.towers, reps, strict=True)
        }

    def compute_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        """One scalar per task: positive-weighted BCE on logits (binary) or MSE (regression).

        A conditional task's loss covers only the rows where its parent's label is positive.
        ``label_weights`` defaults to the weights the model was built with; passing others makes
        ``predict``'s calibration wrong, so do that only to inspect a loss.
        """
        return self.task_losses(outputs, labels, label_weights)

    def task_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
        skip: Collection[str] = (),
    ) -> dict[str, Tensor]:
        """The ordinary loss of every task not in ``skip`` (a model with its own loss for some
        tasks computes those itself and takes the rest from here)."""
        lw = self.label_weights if label_weights is None else label_weights
        return {
            n: self.task_loss_of(n, outputs, labels, lw) for n in self.task_names if n not in skip
        }

    def task_loss_of(
        self,
        name: str,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        lw: Mapping[str, float],
    ) -> Tensor:
        """The ordinary loss of one task (masked to its parent's positives when conditional)."""
        parent = self.parents[name]
        mask = None if parent is None else labels[parent]  # (B,) 1 where the parent happened
        kind, weight, label = self.task_kinds[name], lw.get(name, 1.0), labels[name]
        if name in self.log_targets:
            label = torch.log1p(label.clamp(min=0.0))  # (B,) fit in log space
        return task_loss(outputs[name], label, kind, weight, mask)

    def loss_rows(self, name: str, labels: Mapping[str, Tensor]) -> float:
        """How many rows ``name``'s loss averages over (to combine batch means exactly)."""
        parent = self.parents[name]
        if parent is None:
            return float(len(labels[name]))
        return float(labels[parent].sum())

    def calibrated(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Raw outputs -> probabilities with the label-weight shift removed, or values."""
        out: dict[str, Tensor] = {}
        for name in self.task_names:
            y = outputs[name]  # (B,)
            if self.task_kinds[name] == "binary":
                shift = math.log(self.label_weights[name])
                y = torch.sigmoid(y - shift) if shift != 0.0 else torch.sigmoid(y)  # (B,)
            elif name in self.log_targets:
                # (B,) back to the label units; ONNX has no expm1
                y = (torch.exp(y) - 1.0).clamp(min=0.0)
            out[name] = y
        return out

    def predict(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        """The exported outputs: calibrated probabilities (binary) and values (regression)."""
        return self.calibrated(self(sparse, dense))


RATE_EPS = 1e-6  # base rates are clipped to [eps, 1 - eps]: a task without positives stays finite


def logit(p: float) -> float:
    """log(p / (1 - p)) with p clipped to [RATE_EPS, 1 - RATE_EPS]."""
    p = min(max(p, RATE_EPS), 1.0 - RATE_EPS)
    return math.log(p / (1.0 - p))


def task_loss(
    pred: Tensor,
    label: Tensor,
    kind: str,
    label_weight: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean loss of one task: BCE-with-logits with positives weighing ``label_weight``, or MSE.

    With ``mask`` (B,) of 0/1, the mean runs over the masked rows only (0 when there are none).
    """
    if mask is not None:
        label = torch.where(mask > 0, label, 0.0)  # (B,) rows outside the mask: any finite value
    if kind == "binary":
        pos = None
        if label_weight != 1.0:
            pos = torch.tensor(label_weight, dtype=pred.dtype, device=pred.device)
        nll = F.binary_cross_entropy_with_logits(pred, label, pos_weight=pos, reduction="none")
    else:
        nll = (pred - label) ** 2  # (B,)
    if mask is None:
        return nll.mean()
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def probability_bce(log_p: Tensor, log_1mp: Tensor, label: Tensor, label_weight: float) -> Tensor:
    """Mean BCE from log p and log(1 - p), for probabilities that are not one sigmoid (ESMM)."""
    nll = -(label_weight * label * log_p + (1.0 - label) * log_1mp)  # (B,)
    return nll.mean()
