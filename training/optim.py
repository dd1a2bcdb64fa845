"""How parameters are updated: the optimisers, the learning-rate schedule and the embedding penalty.

Id embeddings are most of a ranking model's parameters and see very uneven data: a popular item's
row is in every batch, a rare user's in a handful. Three settings of ``TrainConfig`` act on that:

- ``embedding_optimizer``: the tables may get their own optimiser and learning rate. ``adam`` is a
  second dense Adam; ``sparse_adam`` (lazy Adam: moments of the rows in the batch only) and
  ``adagrad`` (per-coordinate rates that shrink as a row's squared gradients accumulate, the
  classic CTR choice) switch the tables to sparse gradients, so a row is touched only when its id
  is in the batch and its moments never drift while it is absent.
- ``embedding_regularization: {type: frequency}``: DIN's mini-batch aware regularisation (Zhou et
  al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018, section 4.3). L2 on
  whole tables would cost a pass over every row each step; instead the distinct rows j of the
  batch are penalised with (lambda / 2) ||e_j||^2 / n_j, n_j being the row's count in the train
  split, whose gradient lambda e_j / n_j is the paper's update. Over an epoch a row is penalised
  about once per batch it appears in, so rare ids, which memorise fastest, are pulled hardest.
- ``lr_schedule``: a factor on every optimiser's rate, linear warm-up then linear or cosine decay
  to ``min_lr_ratio`` at the last planned step (``lr_factor``, pure, tested at given steps).

And one acts on what is kept: ``weight_averaging: {decay: d}`` validates, checkpoints and exports
an exponential moving average of the weights instead of the last iterate (Polyak averaging).
Adam moves every output by about the learning rate per step whatever the gradient's size, so with
a rare label (CVR learns from the ~5% clicked rows of a batch) the last iterate's mean prediction
wanders from step to step; the average keeps the direction and drops the wander.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from training.config import ConfigError, LRSchedule, TrainConfig
from training.models.base import MultiTaskModel
from training.models.layers import InputLayer


def embedding_layers(model: nn.Module) -> list[InputLayer]:
    """Every input layer (embedding table) of ``model``; single_task has one per task."""
    return [m for m in model.modules() if isinstance(m, InputLayer)]


# ---------------------------------------------------------------- learning rate
def lr_factor(step: int, schedule: LRSchedule, total_steps: int) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based) of a run
    planned for ``total_steps`` steps: (step + 1) / warmup during warm-up, then 1 decaying
    (linear or cosine) to ``min_lr_ratio`` at step ``total_steps - 1``."""
    warm = schedule.warmup_steps
    if step < warm:
        return (step + 1) / warm
    if schedule.decay == "none":
        return 1.0
    progress = min((step - warm) / max(total_steps - 1 - warm, 1), 1.0)
    low = schedule.min_lr_ratio
    if schedule.decay == "linear":
        return low + (1.0 - low) * (1.0 - progress)
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: Sequence[torch.optim.Optimizer], factor: float) -> None:
    """Every parameter group's rate = its base rate (``initial_lr``) x ``factor``."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor


# ---------------------------------------------------------------- optimisers
def build_optimizers(
    cfg: TrainConfig, model: MultiTaskModel, extra: Sequence[nn.Parameter] = ()
) -> list[torch.optim.Optimizer]:
    """The optimisers of ``model`` and ``extra`` (learned loss weights): Adam over everything, or
    Adam over everything but the embedding tables plus ``embedding_optimizer`` over them.

    Call before wrapping the model in DistributedDataParallel: a sparse optimiser switches the
    tables to sparse gradients, which DDP must know when it is built.
    """
    everything = [*model.parameters(), *extra]
    kind = cfg.embedding_optimizer.type
    if kind == "same":
        opts: list[torch.optim.Optimizer] = [
            torch.optim.Adam(everything, lr=cfg.lr, weight_decay=cfg.weight_decay)
        ]
    else:
        tables = [layer.table for layer in embedding_layers(model)]
        if not tables:
            raise ConfigError(f"embedding_optimizer.type {kind!r}: the model has no embeddings")
        table_ids = {id(t.weight) for t in tables}
        rest = [p for p in everything if id(p) not in table_ids]
        weights = [t.weight for t in tables]
        lr = cfg.embedding_optimizer.lr or cfg.lr
        emb: torch.optim.Optimizer
        if kind == "adam":
            emb = torch.optim.Adam(weights, lr=lr)
        else:
            for t in tables:
                t.sparse = True  # backward yields only the batch's rows
            if kind == "sparse_adam":
                emb = torch.optim.SparseAdam(weights, lr=lr)
            else:
                emb = torch.optim.Adagrad(weights, lr=lr)
        opts = [torch.optim.Adam(rest, lr=cfg.lr, weight_decay=cfg.weight_decay), emb]
    for opt in opts:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return opts


def step(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Step every optimiser. Sparse ones build COO tensors from autograd's own row indices, so
    torch's invariant checks are off, explicitly (torch warns when that is left implicit)."""
    with torch.sparse.check_sparse_tensor_invariants(enable=False):  # type: ignore[no-untyped-call]
        for opt in optimizers:
            opt.step()


# ---------------------------------------------------------------- embedding penalty
class FrequencyRegularizer:
    """DIN's mini-batch aware L2: (weight / 2) sum over distinct batch rows j of ||e_j||^2 / n_j.

    Args:
        layers: the embedding tables penalised (every ``InputLayer`` of the model).
        counts: (R,) train-split count of every table row, R = the table's rows (the same layout
            in every layer: they share the feature spec). Rows never seen count as 1.
        weight: lambda.
    """

    def __init__(self, layers: Sequence[InputLayer], counts: Tensor, weight: float) -> None:
        self.layers, self.weight = list(layers), weight
        self.inv_counts = 1.0 / counts.clamp(min=1.0)  # (R,)

    @classmethod
    def for_model(
        cls, model: MultiTaskModel, counts: Sequence[np.ndarray], weight: float
    ) -> FrequencyRegularizer:
        """From per-field counts (``Encoded.id_counts``), laid out as the tables' rows."""
        flat = np.concatenate(list(counts)) if len(counts) else np.zeros(0)
        device = next(model.parameters()).device
        return cls(
            embedding_layers(model),
            torch.as_tensor(flat, dtype=torch.float32, device=device),
            weight,
        )

    def __call__(self, sparse: Tensor) -> Tensor:
        """The penalty of one batch of (B, S) ids: a scalar."""
        total = torch.zeros((), device=self.inv_counts.device)
        for layer in self.layers:
            table = layer.table
            rows = distinct_rows(layer.rows(sparse), table.num_embeddings)  # (U,)
            if table.sparse:  # F.embedding keeps the gradient sparse (sparse optimisers)
                e = F.embedding(rows, table.weight, sparse=True)  # (U, E)
            else:  # index_select's backward (index_add) is cheaper than embedding's
                e = table.weight.index_select(0, rows)  # (U, E)
            total = total + (e.pow(2).sum(dim=1) * self.inv_counts[rows]).sum()
        return 0.5 * self.weight * total


def distinct_rows(rows: Tensor, n_rows: int) -> Tensor:
    """The distinct values of ``rows`` (any shape, values in [0, n_rows)), ascending: (U,)."""
    flat = rows.reshape(-1)
    if n_rows <= 16 * flat.numel():  # a pass over the table's rows is cheaper than a sort
        return torch.bincount(flat, minlength=n_rows).nonzero().squeeze(1)
    distinct: Tensor = torch.unique(flat)
    return distinct


class WeightAverage:
    """An exponential moving average of ``model``'s parameters (buffers are copied, not averaged).

    Update n (counted from 0) sets ``a <- d_n a + (1 - d_n) w`` with
    ``d_n = min(decay, (1 + n) / (10 + n))``: the warm-up of TensorFlow's ExponentialMovingAverage,
    so that the average of a short run (a 39-step epoch at 100k rows) is not dominated by the
    random initial weights. The first update copies the weights.
    """

    def __init__(self, model: MultiTaskModel, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"weight_averaging.decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self._avg = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=False)

    def current_decay(self) -> float:
        """The decay the next update uses (after the first, which copies)."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    def _lerp(
        self,
        averaged: tuple[Tensor, ...] | list[Tensor],
        current: tuple[Tensor, ...] | list[Tensor],
        _n: Tensor | int,
    ) -> None:
        weight = 1.0 - self.current_decay()
        with torch.no_grad():
            for a, w in zip(averaged, current, strict=True):
                a.lerp_(w, weight)

    def update(self, model: MultiTaskModel) -> None:
        self._avg.update_parameters(model)
        self.updates += 1

    @property
    def module(self) -> MultiTaskModel:
        return cast(MultiTaskModel, self._avg.module)  # a deep copy: same class and keys
