"""Baselines a recall model must beat, fitted on the clicks before the evaluated split.

- :class:`PopularityRetriever`: every user gets the most-clicked items (the same list for all).
- :class:`CoOccurrenceRetriever`: item-to-item collaborative filtering from co-clicks. With
  ``C[i, j]`` the number of users who clicked both i and j (i != j) and ``n_i`` the number who
  clicked i, a user whose history holds the distinct items H scores item j as
  ``sum_{i in H} C[i, j] / n_i``: the summed conditional probabilities P(j clicked | i clicked).
  Ties (above all, every item for a user with no history) are broken by popularity.

Both implement training/recall/evaluate.py's ``Retriever``: (b, N) scores over catalog rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from training.recall.data import Catalog, Clicks, EvalSet

TIE_BREAK = 1e-6  # popularity's weight under co-occurrence: orders only the ties


def click_counts(past: Clicks, catalog: Catalog) -> np.ndarray:
    """(N,) float64 clicks per catalog row in ``past``."""
    return np.bincount(catalog.rows(past.item_id), minlength=len(catalog)).astype(np.float64)


class PopularityRetriever:
    """Most clicked first, for everyone."""

    def __init__(self, past: Clicks, catalog: Catalog) -> None:
        self.popularity = torch.from_numpy(click_counts(past, catalog))  # (N,)

    def scores(self, users: EvalSet, rows: slice) -> Tensor:
        b = len(users.user_id[rows])
        return self.popularity.unsqueeze(0).expand(b, -1)  # (b, N)


class CoOccurrenceRetriever:
    """Item-to-item co-click counts (module docstring), as sparse user-item products."""

    def __init__(self, past: Clicks, catalog: Catalog) -> None:
        n = len(catalog)
        rows = catalog.rows(past.item_id)
        _, user_index = np.unique(past.user_id, return_inverse=True)
        pairs = np.unique(np.stack([user_index, rows]), axis=1)  # (2, P) distinct user-item
        ones = torch.ones(pairs.shape[1], dtype=torch.float64)
        shape = (int(user_index.max(initial=-1)) + 1, n)
        self.clicked = torch.sparse_coo_tensor(
            torch.from_numpy(pairs), ones, shape, check_invariants=True
        ).coalesce()  # (users, N) 1 where the user clicked the item
        self.clicked_t = self.clicked.t().coalesce()  # (N, users)
        self.users_per_item = np.bincount(pairs[1], minlength=n).astype(np.float64)  # n_i
        pop = click_counts(past, catalog)
        self.tie = torch.from_numpy(TIE_BREAK * pop / max(pop.max(initial=0.0), 1.0))  # (N,)

    def scores(self, users: EvalSet, rows: slice) -> Tensor:
        seen = users.seen[rows]
        r = np.concatenate([np.full(len(s), u, dtype=np.int64) for u, s in enumerate(seen)])
        c = np.concatenate(seen).astype(np.int64)
        r_t, c_t = torch.from_numpy(r), torch.from_numpy(c)
        query = torch.zeros(len(seen), len(self.users_per_item), dtype=torch.float64)  # (b, N)
        query[r_t, c_t] = torch.from_numpy(1.0 / np.maximum(self.users_per_item[c], 1.0))  # 1/n_i
        via_users = torch.sparse.mm(self.clicked, query.T)  # (users, b)
        co = torch.sparse.mm(self.clicked_t, via_users).T  # (b, N): sum_i C[i, j] / n_i
        # C[i, i] = n_i added 1 for each history item i itself: co-occurrence is for i != j
        co[r_t, c_t] -= 1.0
        out: Tensor = co + self.tie.unsqueeze(0)  # (b, N)
        return out
