"""HR@K, recall@K and NDCG@K on hand-computed lists; seen-item exclusion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.recall.data import EvalSet
from training.recall.evaluate import evaluate_retriever, ranking_metrics


def test_metrics_by_hand() -> None:
    top = np.array([[3, 1, 2], [5, 6, 7], [9, 8, 4]])
    targets = [np.array([1, 4]), np.array([8]), np.array([9, 8, 4])]
    m = ranking_metrics(top, targets, [1, 3])
    assert m["hr@1"].tolist() == [0, 0, 1]
    assert m["hr@3"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(m["recall@3"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(m["recall@1"], [0.0, 0.0, 1 / 3])
    # user 0: one hit at rank 2 -> (1/log2 3) / (1 + 1/log2 3), the ideal puts 2 targets first
    ideal0 = 1.0 + 1.0 / math.log2(3)
    np.testing.assert_allclose(m["ndcg@3"], [(1 / math.log2(3)) / ideal0, 0.0, 1.0])
    np.testing.assert_allclose(m["ndcg@1"], [0.0, 0.0, 1.0])


def test_metrics_refuse_a_cut_off_beyond_the_list() -> None:
    with pytest.raises(ValueError, match="K = 5"):
        ranking_metrics(np.zeros((1, 3), np.int64), [np.array([1])], [5])


class _Fixed:
    def __init__(self, scores: np.ndarray) -> None:
        self.s = torch.from_numpy(scores)

    def scores(self, users: EvalSet, rows: slice) -> torch.Tensor:
        return self.s[rows]


def _users(targets: list[list[int]], seen: list[list[int]]) -> EvalSet:
    n = len(targets)
    z = np.zeros((n, 1), np.int64)
    return EvalSet(
        np.arange(n),
        z,
        z,
        np.zeros(n, np.int64),
        [np.array(t) for t in targets],
        [np.array(s, dtype=np.int64) for s in seen],
    )


def test_seen_items_and_the_oov_row_are_never_candidates() -> None:
    # row 0 (OOV) and row 1 (seen) score highest; the seen target 1 is no longer a target
    scores = np.array([[9.0, 8.0, 1.0, 3.0, 2.0]])
    users = _users([[1, 4]], [[1]])
    rep = evaluate_retriever(_Fixed(scores), users, [1, 2], exclude_seen=True)
    assert rep["metrics"]["hr@1"] == 0.0  # top 1 is row 3
    assert rep["metrics"]["hr@2"] == 1.0  # row 4 second
    rep = evaluate_retriever(_Fixed(scores), users, [1], exclude_seen=False)
    assert rep["metrics"]["hr@1"] == 1.0  # row 1 is first and a target again


def test_users_without_a_new_target_are_dropped_and_counted() -> None:
    scores = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    users = _users([[1], [2]], [[1], []])
    rep = evaluate_retriever(_Fixed(scores), users, [1], exclude_seen=True, batch_users=1)
    assert rep["users"] == 1 and rep["users_dropped_no_new_target"] == 1
    assert rep["metrics"]["hr@1"] == 0.0  # user 1 ranks row 1 first, its target is row 2
