"""Recall quality on held-out next interactions: HR@K, recall@K and NDCG@K.

    mtrank evaluate-recall CHECKPOINT [--split test] [--baselines] [--out report.json]

For each user who clicks in the split (training/recall/data.py EvalSet) a retriever scores every
catalog row by brute force (an exact top-K, no ANN), and the K best rows are compared with the
distinct items the user clicked in the split:

- HR@K (hit rate): 1 if any target is in the top K;
- recall@K: |top K ∩ targets| / |targets|;
- NDCG@K: sum over hits at rank r (1-based) of 1 / log2(r + 1), divided by the same sum for a
  perfect list, which puts min(|targets|, K) targets first;

each averaged over users. Never candidates: the catalog's OOV row (row 0). With
``exclude_seen`` (the default), every item the user clicked *before* the split is left out of the
candidates and of the targets (a repeat click is not a discovery); a user left with no target is
not scored, and the report says how many were dropped. The popularity and co-occurrence
baselines (training/recall/baselines.py) are scored by the same function on the same users.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from training.recall.data import Catalog, EvalSet, prepare
from training.recall.models import ItemBatch, RecallModel


class Retriever(Protocol):
    """Scores every catalog row for a slice of an evaluation set's users."""

    def scores(self, users: EvalSet, rows: slice) -> Tensor:
        """(b, N) float scores, higher is better, for users ``rows`` of ``users``."""
        ...


def ranking_metrics(
    top: np.ndarray, targets: list[np.ndarray], ks: list[int]
) -> dict[str, np.ndarray]:
    """Per-user metrics of ranked lists ``top`` (n, >= max K) against target sets.

    Returns ``{"hr@K", "recall@K", "ndcg@K"}`` -> (n,) float64 for each K in ``ks``.
    """
    n, width = top.shape
    if ks and max(ks) > width:
        raise ValueError(f"lists of {width} items cannot give metrics at K = {max(ks)}")
    hits = np.zeros((n, width), dtype=bool)
    for u, t in enumerate(targets):
        hits[u] = np.isin(top[u], t)
    n_targets = np.array([len(t) for t in targets], dtype=np.float64)
    gain = 1.0 / np.log2(np.arange(2, width + 2))  # (width,) discount at ranks 1..width
    ideal_cum = np.cumsum(gain)  # (width,) a perfect list's DCG at each cut-off
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        out[f"hr@{k}"] = np.asarray(h.any(axis=1), dtype=np.float64)
        out[f"recall@{k}"] = np.asarray(h.sum(axis=1) / np.maximum(n_targets, 1.0))
        dcg = (h * gain[:k]).sum(axis=1)
        ideal = ideal_cum[np.clip(np.minimum(n_targets, k).astype(int) - 1, 0, None)]
        out[f"ndcg@{k}"] = np.where(n_targets > 0, dcg / ideal, 0.0)
    return out


def evaluate_retriever(
    retriever: Retriever,
    users: EvalSet,
    ks: list[int],
    exclude_seen: bool = True,
    batch_users: int = 1024,
) -> dict[str, Any]:
    """Mean HR/recall/NDCG@K over the users of ``users`` (the module docstring's rules)."""
    targets = users.targets
    if exclude_seen:
        targets = [np.setdiff1d(t, s) for t, s in zip(users.targets, users.seen, strict=True)]
    scored = np.array([len(t) > 0 for t in targets])
    k_max = max(ks)
    tops: list[np.ndarray] = []
    for lo in range(0, len(users), batch_users):
        rows = slice(lo, min(lo + batch_users, len(users)))
        with torch.no_grad():
            s = retriever.scores(users, rows).float().clone()  # (b, N)
        s[:, 0] = -torch.inf  # the OOV row is no item
        if exclude_seen:
            for r, seen in enumerate(users.seen[rows]):
                s[r, torch.from_numpy(seen)] = -torch.inf
        k = min(k_max, s.shape[1])
        top = torch.topk(s, k, dim=1).indices.cpu().numpy()  # (b, k)
        if k < k_max:  # a catalog smaller than K: the rest of the list is empty (-1)
            top = np.pad(top, ((0, 0), (0, k_max - k)), constant_values=-1)
        tops.append(top)
    top_all = np.concatenate(tops) if tops else np.zeros((0, k_max), dtype=np.int64)
    per_user = ranking_metrics(
        top_all[scored], [t for t, ok in zip(targets, scored, strict=True) if ok], ks
    )
    metrics = {name: float(v.mean()) if len(v) else float("nan") for name, v in per_user.items()}
    return {
        "metrics": metrics,
        "users": int(scored.sum()),
        "users_dropped_no_new_target": int((~scored).sum()),
        "exclude_seen": exclude_seen,
        "ks": list(ks),
    }


class ModelRetriever:
    """A trained model: user vectors against the item vectors of the whole catalog."""

    def __init__(self, model: RecallModel, items: ItemBatch) -> None:
        self.model = model.eval()
        self.device = items.sparse.device
        with torch.no_grad():
            self.item_vectors = model.item_vectors(items)  # (N, D)

    def scores(self, users: EvalSet, rows: slice) -> Tensor:
        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

        u = self.model(
            t(users.user_sparse[rows]), t(users.history[rows]), t(users.history_len[rows])
        )
        out: Tensor = u @ self.item_vectors.T  # (b, D) @ (D, N) -> (b, N)
        return out


def catalog_items(catalog: Catalog, device: torch.device | str = "cpu") -> ItemBatch:
    return ItemBatch.from_arrays(
        catalog.sparse, catalog.dense, catalog.title, catalog.title_len, device
    )


def evaluate_model(
    model: RecallModel,
    catalog: Catalog,
    users: EvalSet,
    ks: list[int],
    exclude_seen: bool = True,
    batch_users: int = 1024,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    retriever = ModelRetriever(model, catalog_items(catalog, device))
    return evaluate_retriever(retriever, users, ks, exclude_seen, batch_users)


def main(argv: list[str]) -> int:
    from training.recall.baselines import CoOccurrenceRetriever, PopularityRetriever
    from training.recall.checkpoint import load_recall_checkpoint
    from training.reports import write_report

    p = argparse.ArgumentParser(prog="mtrank evaluate-recall", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--baselines", action="store_true", help="also popularity and co-occurrence")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    model, cfg, spec, catalog, _ = load_recall_checkpoint(args.checkpoint)
    data = prepare(cfg, spec, catalog)
    users = data.valid if args.split == "valid" else data.test
    if users is None:
        print(
            f"mtrank evaluate-recall: no {args.split} split in {cfg.data.data_dir}", file=sys.stderr
        )
        return 1
    ks, ex = cfg.eval.ks, cfg.eval.exclude_seen
    report: dict[str, Any] = {"split": args.split, "checkpoint": str(args.checkpoint)}
    report["model"] = evaluate_model(model, data.catalog, users, ks, ex, cfg.eval.batch_users)
    if args.baselines:
        past = data.past[args.split]
        for name, r in (
            ("popularity", PopularityRetriever(past, data.catalog)),
            ("cooccurrence", CoOccurrenceRetriever(past, data.catalog)),
        ):
            report[name] = evaluate_retriever(r, users, ks, ex, cfg.eval.batch_users)
    print(json.dumps(report, indent=1))
    if args.out is not None:
        write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
