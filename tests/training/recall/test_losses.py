"""Retrieval losses: logQ correction, duplicate and accidental-hit masks, hard negatives."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.recall.conftest import small_config
from training.recall.config import RecallLossConfig
from training.recall.data import Catalog, RecallData
from training.recall.evaluate import catalog_items
from training.recall.losses import (
    RetrievalLoss,
    hard_logits,
    in_batch_logits,
    sampled_logits,
)
from training.recall.models import DSSM, ItemBatch, build_recall_model


def test_in_batch_logq_subtracts_log_q_of_each_column() -> None:
    torch.manual_seed(0)
    user, items = torch.randn(4, 3), torch.randn(4, 3)
    rows = torch.tensor([5, 6, 7, 8])
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    scale = torch.tensor(2.0)
    plain = in_batch_logits(user, items, rows, scale, None)
    corrected = in_batch_logits(user, items, rows, scale, log_q)
    torch.testing.assert_close(plain, 2.0 * user @ items.T)
    # column j (item j, in the batch with probability q_j) loses log q_j, in every row
    torch.testing.assert_close(corrected - plain, -log_q.expand(4, 4))
    # a popular item is pushed down less by a corrected loss than by the plain one
    assert corrected[0, 0] - corrected[0, 2] < plain[0, 0] - plain[0, 2] + math.log(4) + 1e-6


def test_in_batch_masks_repeats_of_the_positive_but_not_the_diagonal() -> None:
    user, items = torch.randn(3, 2), torch.randn(3, 2)
    logits = in_batch_logits(user, items, torch.tensor([1, 2, 1]), torch.tensor(1.0), None)
    assert torch.isinf(logits[0, 2]) and torch.isinf(logits[2, 0])
    assert torch.isfinite(logits.diagonal()).all() and torch.isfinite(logits[1]).all()


def test_sampled_logits_correct_and_mask_accidental_hits() -> None:
    user, pos, neg = torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 3)
    pos_rows, neg_rows = torch.tensor([1, 2]), torch.tensor([3, 1, 4, 5])
    lq_pos, lq_neg = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0, -4.0, -5.0])
    out = sampled_logits(user, pos, pos_rows, neg, neg_rows, torch.tensor(1.0), lq_pos, lq_neg)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out[:, 0], (user * pos).sum(1) + torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out[1, 1:], user[1] @ neg.T - lq_neg)
    assert torch.isinf(out[0, 2]) and torch.isfinite(out[1]).all()  # row 0 drew its positive


def test_hard_logits_mask_the_positive() -> None:
    user, hard = torch.randn(2, 3), torch.randn(2, 2, 3)
    out = hard_logits(
        user, hard, torch.tensor([[4, 1], [4, 6]]), torch.tensor([1, 2]), torch.tensor(3.0)
    )
    assert torch.isinf(out[0, 1])
    torch.testing.assert_close(out[1], 3.0 * hard[1] @ user[1])


def _catalog() -> Catalog:
    # rows: OOV, 4 items of category 1, 2 of category 2
    category = np.array([0, 1, 1, 1, 1, 2, 2])
    n = len(category)
    return Catalog(
        item_ids=np.array([-1, 10, 11, 12, 13, 20, 21]),
        sparse=np.stack([np.arange(n), category], axis=1),
        dense=np.zeros((n, 0), np.float32),
        title=np.zeros((n, 1), np.int64),
        title_len=np.zeros(n, np.int64),
        clicks=np.array([0, 5, 1, 1, 1, 2, 0]),
    )


def test_hard_negatives_come_from_the_positives_category() -> None:
    cat = _catalog()
    items = ItemBatch.from_arrays(cat.sparse, cat.dense, cat.title, cat.title_len)
    loss = RetrievalLoss(RecallLossConfig(hard_negatives=8), cat, items)
    rows = loss.hard_rows(torch.tensor([1, 5, 6]), 50, torch.Generator().manual_seed(0))
    assert set(rows[0].tolist()) == {1, 2, 3, 4}
    assert set(rows[1].tolist()) | set(rows[2].tolist()) == {5, 6}


def test_sampled_negatives_follow_click_frequency() -> None:
    cat = _catalog()
    q = cat.clicks / cat.clicks.sum()
    np.testing.assert_allclose(np.exp(cat.log_q[1:6]), q[1:6], rtol=1e-6)
    assert np.isneginf(cat.log_q[0])  # never clicked: never sampled, never a positive


# full softmax has every item already: hard negatives do not apply to it
@pytest.mark.parametrize(
    ("kind", "hard"),
    [(k, h) for k in ("in_batch", "sampled", "both") for h in (0, 3)] + [("full", 0)],
)
def test_every_loss_is_finite_and_trains_both_towers(
    kind: str, hard: int, recall_dir: Path, recall_data: RecallData
) -> None:
    cfg = small_config(recall_dir, "cnn_dssm", **{"loss.type": kind, "loss.hard_negatives": hard})
    torch.manual_seed(0)
    model = build_recall_model(cfg.model, recall_data.spec)
    assert isinstance(model, DSSM)
    items = catalog_items(recall_data.catalog)
    model.bind_catalog(items)
    loss_fn = RetrievalLoss(cfg.loss, recall_data.catalog, items)
    ex = recall_data.train
    batch = slice(0, 64)
    u = model(*(torch.from_numpy(a[batch]) for a in (ex.user_sparse, ex.history, ex.history_len)))
    loss = loss_fn(model, u, torch.from_numpy(ex.target[batch]), torch.ones(64), None)
    assert torch.isfinite(loss) and loss > 0
    torch.autograd.backward(loss)
    assert model.user_out.weight.grad is not None and model.user_out.weight.grad.abs().sum() > 0
    assert model.item_out.weight.grad is not None and model.item_out.weight.grad.abs().sum() > 0
    assert model.log_scale.grad is not None  # the temperature is learned
