"""BPR: a pairwise scorer over the fusion inputs, trained on pairs from the objective hierarchy.

Bayesian Personalised Ranking (Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit
Feedback", UAI 2009) maximises ``log sigmoid(s_i - s_j)`` over pairs where i should rank above
j. Seed 004 builds those pairs from the objective hierarchy: within one request group, a row is
paired with rows of a lower grade (a purchase over a click, a click over an impression). Each
epoch draws ``pairs_per_positive`` lower-graded partners for every row above the group's lowest
grade; a pair is weighted by its gain gap when ``grade_gap_weight`` is set, so a
purchase-over-impression pair counts as much as the three steps it spans, and (with value
grades) an expensive purchase more than a cheap one. Unlike lambdarank's NDCG, nothing
normalises a group: pairs weigh the same in every group.

The scorer reads the raw fusion inputs: its first layer applies ``log(max(x, 1e-6))`` to the
non-negative ones (when ``log_inputs``) and standardises with train-split statistics held as
buffers, so the exported graph takes exactly what the service's fusion env holds. With no
hidden layer it is a learned power product ``prod x_f ** w_f``, the fusion formula's family.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from training.ltr.config import BprConfig
from training.ltr.data import LtrSplit, group_starts

LOG_FLOOR = 1e-6


class InputTransform(nn.Module):
    """(B, F) raw inputs -> (B, F) standardised, log first where the column is non-negative."""

    log_mask: Tensor
    mean: Tensor
    std: Tensor

    def __init__(self, log_mask: Tensor, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("log_mask", log_mask)  # (F,) bool
        self.register_buffer("mean", mean)  # (F,)
        self.register_buffer("std", std)  # (F,)

    def forward(self, x: Tensor) -> Tensor:
        logged = torch.log(torch.clamp(x, min=LOG_FLOOR))  # (B, F)
        x = torch.where(self.log_mask, logged, x)
        return (x - self.mean) / self.std  # (B, F)


class BprScorer(nn.Module):
    """Inputs -> one score per row: transform, then an MLP (or a linear layer)."""

    def __init__(self, transform: InputTransform, n_inputs: int, hidden: list[int]) -> None:
        super().__init__()
        self.transform = transform
        layers: list[nn.Module] = []
        width = n_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(self.transform(x)).squeeze(-1)  # (B, F) -> (B,)
        return out


def fit_transform(x: np.ndarray, log_inputs: bool) -> InputTransform:
    """Statistics of the train inputs (n, F): which columns to log, their mean and std."""
    log_mask = np.full(x.shape[1], log_inputs) & (x.min(axis=0) >= 0.0)  # (F,)
    t = np.where(log_mask, np.log(np.maximum(x, LOG_FLOOR)), x).astype(np.float64)
    std = t.std(axis=0)
    return InputTransform(
        torch.from_numpy(log_mask),
        torch.from_numpy(t.mean(axis=0).astype(np.float32)),
        torch.from_numpy(np.where(std > 0, std, 1.0).astype(np.float32)),
    )


def sample_pairs(
    grades: np.ndarray, sizes: np.ndarray, per_row: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(winners, losers) row indices of a group-sorted split: each row above its group's lowest
    grade is paired ``per_row`` times with a uniformly drawn lower-graded row of its group.

    Exact, without rejection: within a group sorted by grade the rows below grade g are a
    prefix, so a partner is a uniform position in that prefix.
    """
    starts = group_starts(sizes)
    group_of = np.repeat(np.arange(len(sizes)), sizes)  # (n,)
    by_grade = np.lexsort((grades, group_of))  # (n,) rows by group, then grade ascending
    span = int(grades.max(initial=0)) + 1
    keys = group_of[by_grade] * span + grades[by_grade]  # (n,) non-decreasing
    low = np.minimum.reduceat(grades, starts)[group_of] if len(grades) else grades  # (n,)
    winners = np.repeat(np.flatnonzero(grades > low), per_row)  # (P,)
    g = group_of[winners]
    below = np.searchsorted(keys, g * span + grades[winners], side="left") - starts[g]  # (P,)
    pick = starts[g] + (rng.random(len(winners)) * below).astype(np.int64)  # (P,)
    return winners, by_grade[pick]


def train_bpr(
    train: LtrSplit, cfg: BprConfig, gains: list[float], seed: int,
    log: list[dict[str, float]] | None = None,
) -> BprScorer:  # fmt: skip
    """Fit a :class:`BprScorer` on ``train``'s pairs (module docstring); returns it in eval mode.

    A pair's order and its weight come from the gains of its labels (``gains[label]``): with
    value levels (training/ltr/relevance.py) a cheap purchase may rank below a cart.
    ``log`` (optional) receives one ``{"epoch", "loss", "pairs"}`` record per epoch.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = BprScorer(fit_transform(train.x, cfg.log_inputs), train.x.shape[1], cfg.hidden_units)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x = torch.from_numpy(np.ascontiguousarray(train.x, dtype=np.float32))  # (n, F)
    row_gain = np.asarray(gains, dtype=np.float64)[train.grades]  # (n,)
    order = np.unique(row_gain, return_inverse=True)[1].astype(np.int32)  # (n,) rank of gain
    grades = torch.from_numpy(row_gain.astype(np.float32))  # (n,)
    model.train()
    for epoch in range(cfg.epochs):
        win, lose = sample_pairs(order, train.sizes, cfg.pairs_per_positive, rng)
        perm = rng.permutation(len(win))
        total, seen = 0.0, 0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            w, lo = torch.from_numpy(win[idx]), torch.from_numpy(lose[idx])
            margin = model(x[w]) - model(x[lo])  # (B,)
            weight = grades[w] - grades[lo] if cfg.grade_gap_weight else torch.ones_like(margin)
            loss = (weight * nn.functional.softplus(-margin)).sum() / weight.sum()  # -log sig
            opt.zero_grad()
            torch.autograd.backward(loss)
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        if log is not None:
            log.append({"epoch": epoch, "loss": total / max(seen, 1), "pairs": float(len(win))})
    return model.eval()


def predict(model: BprScorer, x: np.ndarray) -> np.ndarray:
    """Native torch scores (n,) float64."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    scores: np.ndarray = out.double().numpy()
    return scores
