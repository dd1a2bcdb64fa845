"""Ranking metrics per request group: NDCG@K with any gain, and the value of the top K.

Both take a group-sorted or unsorted split alike (rows are grouped by id, ties in score break by
row order, as in tune-fusion's :func:`training.tune_fusion.ndcg_at_k`, which NDCG is).
"""

from __future__ import annotations

import numpy as np

from training.tune_fusion import ndcg_at_k

__all__ = ["ndcg_at_k", "top_k_value"]


def top_k_value(scores: np.ndarray, values: np.ndarray, groups: np.ndarray, k: int) -> float:
    """Mean over groups of the summed ``values`` of each group's top ``k`` rows by score.

    With ``values`` = P(click) x P(purchase | click) x price this is the expected GMV a request
    earns from the ``k`` items it shows.
    """
    order = np.lexsort((np.arange(len(scores)), -scores, groups))  # by group, score desc
    g_sorted = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g_sorted)) + 1]  # first row of each group
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    kept = np.where(rank < k, values[order], 0.0)
    return float(np.mean(np.add.reduceat(kept, starts))) if len(starts) else float("nan")
