"""Popularity and co-occurrence baselines on a toy log computed by hand."""

from __future__ import annotations

import numpy as np
import torch

from training.recall.baselines import CoOccurrenceRetriever, PopularityRetriever
from training.recall.data import Catalog, Clicks, EvalSet


def _catalog(n_items: int) -> Catalog:
    n = n_items + 1
    return Catalog(
        item_ids=np.r_[-1, np.arange(100, 100 + n_items)],
        sparse=np.zeros((n, 1), np.int64),
        dense=np.zeros((n, 0), np.float32),
        title=np.zeros((n, 1), np.int64),
        title_len=np.zeros(n, np.int64),
        clicks=np.zeros(n, np.int64),
    )


# users 1..3; items 100..103 (catalog rows 1..4)
PAST = Clicks(
    user_id=np.array([1, 1, 1, 2, 2, 3, 3]),
    item_id=np.array([100, 101, 101, 100, 102, 101, 103]),
    ts=np.arange(7),
    purchase=np.zeros(7, np.int8),
)


def _users(seen: list[list[int]]) -> EvalSet:
    n = len(seen)
    z = np.zeros((n, 1), np.int64)
    return EvalSet(np.arange(n), z, z, np.zeros(n, np.int64), [np.array([1])] * n,
                   [np.array(s, dtype=np.int64) for s in seen])  # fmt: skip


def test_popularity_counts_every_click() -> None:
    r = PopularityRetriever(PAST, _catalog(4))
    s = r.scores(_users([[], [1]]), slice(0, 2))
    assert s.tolist() == [[0, 2, 3, 1, 1]] * 2


def test_cooccurrence_sums_conditional_probabilities() -> None:
    r = CoOccurrenceRetriever(PAST, _catalog(4))
    # distinct clickers: n(100)=2 (users 1, 2), n(101)=2 (1, 3), n(102)=1, n(103)=1
    # C[100, 101]=1 (user 1), C[100, 102]=1 (user 2), C[101, 103]=1 (user 3)
    s = r.scores(_users([[1], [1, 2], []]), slice(0, 3)).numpy()
    tie = r.tie.numpy()
    # history {100}: 101 -> 1/2, 102 -> 1/2, 103 -> 0, 100 itself -> 0 (i != j)
    np.testing.assert_allclose(s[0] - tie, [0, 0, 0.5, 0.5, 0.0], atol=1e-12)
    # history {100, 101}: 100 <- C[101,100]/n(101) = 1/2, 101 <- C[100,101]/n(100) = 1/2,
    # 102 <- 1/2 (via 100), 103 <- 1/2 (via 101)
    np.testing.assert_allclose(s[1] - tie, [0, 0.5, 0.5, 0.5, 0.5], atol=1e-12)
    # no history: popularity alone orders the list
    assert np.argsort(-s[2])[:2].tolist() == [2, 1]
    assert float(torch.from_numpy(s[2]).max()) < 1e-5
