"""Retrieval losses: a softmax of the clicked item against candidate negatives.

Every loss is a cross-entropy over logits ``scale * sim(u, v_j)`` whose first-choice class is the
clicked item; they differ in where the negatives come from (``loss.type``):

- ``in_batch``: the other examples' clicked items (Yi et al., "Sampling-Bias-Corrected Neural
  Modeling for Large Corpus Item Recommendations", RecSys 2019). Popular items turn up in more
  batches and so are pushed down more often than the data says; the logQ correction subtracts
  log q_j, the probability that item j is in a batch, from item j's logit (as a column of the
  batch). Batches are uniform over train clicks, so q_j is item j's share of train clicks: the
  exact value of the frequency that Yi et al. estimate in a stream. A repeat of the positive
  elsewhere in the batch is not a negative and is masked.
- ``sampled``: ``num_negatives`` items drawn for the whole batch in proportion to q (sampled
  softmax, Jean et al. 2015; Bengio & Senécal 2008), every logit (positive and negatives)
  corrected by -log q; a sample equal to the row's positive is masked (an accidental hit).
- ``both``: the sum of the two losses.
- ``full``: the exact softmax over every catalog row (no sampling, so no correction): affordable
  for an id table of tens of thousands of rows; it runs the item side over the whole catalog.

``hard_negatives: H`` adds, to each example, H catalog rows of the clicked item's category (the
first item attribute), drawn uniformly: near misses the frequency-proportional negatives rarely
supply. They are extra columns without a correction (their sampling is not frequency-based) and
are masked when they hit the positive. ``purchase_weight`` weighs the examples whose click led to
a purchase. ``log_q_correction: false`` drops every correction (the ablation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.recall.config import RecallLossConfig
from training.recall.data import Catalog
from training.recall.models import ItemBatch, RecallModel

NEG_INF = float("-inf")


def in_batch_logits(
    user: Tensor, items: Tensor, rows: Tensor, scale: Tensor, log_q: Tensor | None
) -> Tensor:
    """(B, D) users, (B, D) their clicked items, (B,) their catalog rows -> (B, B) logits.

    Row b's positive is column b. Column j is corrected by -log q_j; a column holding the same
    item as row b's positive (other than b itself) is -inf for row b.
    """
    logits = scale * (user @ items.T)  # (B, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)  # (B, B) column j minus log q_j
    same = rows.unsqueeze(1) == rows.unsqueeze(0)  # (B, B)
    eye = torch.eye(len(rows), dtype=torch.bool, device=rows.device)
    return logits.masked_fill(same & ~eye, NEG_INF)


def sampled_logits(
    user: Tensor,
    positives: Tensor,
    pos_rows: Tensor,
    negatives: Tensor,
    neg_rows: Tensor,
    scale: Tensor,
    pos_log_q: Tensor | None,
    neg_log_q: Tensor | None,
) -> Tensor:
    """(B, D) users, (B, D) positives, (M, D) shared negatives -> (B, 1 + M) logits, positive
    first; each logit minus its item's log q; an accidental hit is -inf."""
    pos = scale * (user * positives).sum(dim=1, keepdim=True)  # (B, 1)
    neg = scale * (user @ negatives.T)  # (B, M)
    if pos_log_q is not None and neg_log_q is not None:
        pos = pos - pos_log_q.unsqueeze(1)  # (B, 1)
        neg = neg - neg_log_q.unsqueeze(0)  # (B, M)
    neg = neg.masked_fill(pos_rows.unsqueeze(1) == neg_rows.unsqueeze(0), NEG_INF)  # (B, M)
    return torch.cat([pos, neg], dim=1)  # (B, 1 + M)


def hard_logits(
    user: Tensor, hard: Tensor, hard_rows: Tensor, pos_rows: Tensor, scale: Tensor
) -> Tensor:
    """(B, D) users, (B, H, D) per-example negatives -> (B, H) logits; hits on the positive -inf."""
    logits = scale * torch.einsum("bd,bhd->bh", user, hard)  # (B, H)
    return logits.masked_fill(hard_rows == pos_rows.unsqueeze(1), NEG_INF)


def weighted_ce(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    ce = F.cross_entropy(logits, target, reduction="none")  # (B,)
    return (ce * weight).sum() / weight.sum().clamp(min=1e-12)


class RetrievalLoss:
    """The configured loss over a model, bound to one catalog (its q and category groups).

    Args:
        cfg: the ``loss`` section of the config.
        catalog: the candidate rows; its train click counts are q's estimate.
        items: the catalog's features as tensors on the training device.
    """

    def __init__(self, cfg: RecallLossConfig, catalog: Catalog, items: ItemBatch) -> None:
        self.cfg, self.items = cfg, items
        device = items.sparse.device
        clicks = torch.from_numpy(catalog.clicks.astype(np.float64))
        self.q = (clicks / clicks.sum()).to(device)  # (N,) float64
        self.log_q = torch.from_numpy(catalog.log_q).to(device)  # (N,)
        # rows grouped by category: hard negatives of row r are drawn from its group
        has_attr = catalog.sparse.shape[1] > 1
        category = catalog.sparse[:, 1] if has_attr else np.zeros(len(catalog), dtype=np.int64)
        category = np.where(catalog.item_ids < 0, -1, category)  # the OOV row: a group alone
        order = np.argsort(category, kind="stable")
        keys, starts, counts = np.unique(category[order], return_index=True, return_counts=True)
        group = np.searchsorted(keys, category)  # (N,) group of each row
        self.by_group = torch.from_numpy(order).to(device)
        self.group_start = torch.from_numpy(starts[group]).to(device)  # (N,)
        self.group_size = torch.from_numpy(counts[group]).to(device)  # (N,)

    def __call__(
        self,
        model: RecallModel,
        user: Tensor,
        pos_rows: Tensor,
        weight: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """user (B, D) vectors of examples whose clicked catalog rows are ``pos_rows`` (B,)."""
        cfg, scale = self.cfg, model.scale()
        correct = cfg.log_q_correction
        B = len(pos_rows)
        positives = model.item_vectors(self.items.take(pos_rows))  # (B, D)
        extra = None
        if cfg.hard_negatives > 0:
            hard_rows = self.hard_rows(pos_rows, cfg.hard_negatives, generator)  # (B, H)
            hard = model.item_vectors(self.items.take(hard_rows.reshape(-1)))  # (B*H, D)
            extra = hard_logits(
                user, hard.reshape(B, cfg.hard_negatives, -1), hard_rows, pos_rows, scale
            )
        total = user.new_zeros(())
        if cfg.type in ("in_batch", "both"):
            logits = in_batch_logits(
                user, positives, pos_rows, scale, self.log_q[pos_rows] if correct else None
            )  # (B, B)
            target = torch.arange(B, device=user.device)
            total = total + weighted_ce(_cat(logits, extra), target, weight)
        if cfg.type in ("sampled", "both"):
            neg_rows = torch.multinomial(
                self.q, cfg.num_negatives, replacement=True, generator=generator
            )
            negatives = model.item_vectors(self.items.take(neg_rows))  # (M, D)
            logits = sampled_logits(
                user,
                positives,
                pos_rows,
                negatives,
                neg_rows,
                scale,
                self.log_q[pos_rows] if correct else None,
                self.log_q[neg_rows] if correct else None,
            )  # (B, 1 + M)
            target = torch.zeros(B, dtype=torch.int64, device=user.device)
            total = total + weighted_ce(_cat(logits, extra), target, weight)
        if cfg.type == "full":
            every = model.item_vectors(self.items)  # (N, D)
            logits = scale * (user @ every.T)  # (B, N)
            not_item = torch.arange(len(every), device=user.device) == 0  # the OOV row
            logits = logits.masked_fill(not_item.unsqueeze(0), NEG_INF)  # (B, N)
            total = total + weighted_ce(logits, pos_rows, weight)
        return total

    def hard_rows(self, pos_rows: Tensor, h: int, generator: torch.Generator | None) -> Tensor:
        """(B,) positives -> (B, h) uniform draws from each positive's category group."""
        u = torch.rand(len(pos_rows), h, generator=generator, device=pos_rows.device)  # (B, h)
        size = self.group_size[pos_rows].unsqueeze(1)  # (B, 1)
        offset = (u * size).long().clamp(max=size - 1)  # (B, h)
        return self.by_group[self.group_start[pos_rows].unsqueeze(1) + offset]  # (B, h)


def _cat(logits: Tensor, extra: Tensor | None) -> Tensor:
    return logits if extra is None else torch.cat([logits, extra], dim=1)
