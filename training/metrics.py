"""Offline ranking metrics in pure numpy (no torch): the evaluator and the tests share them.

``auc`` is exact (Mann-Whitney U with average ranks for tied scores), ``gauc`` is the
impression-weighted mean of per-user AUC used by industrial CTR papers (users with one class only
carry no ranking information and are skipped), ``calibration`` reports the expected calibration
error that fusion relies on: a fused score multiplies probabilities, so a miscalibrated head
distorts it even when its AUC is fine. Binary labels are read as ``y >= 0.5``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_1d(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.shape} vs {p.shape}")
    return y, p


def _grouped_auc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC (nan where a group lacks a class) and group sizes, fully vectorised.

    Sorting by (group, score) makes every group a contiguous run; runs of equal (group, score)
    are ties and share their average rank, which is what the Mann-Whitney statistic needs.
    """
    order = np.lexsort((p, groups))
    g, s, pos = groups[order], p[order], y[order] >= 0.5
    n = len(g)
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = g[1:] != g[:-1]
    new_tie = new_group.copy()
    new_tie[1:] |= s[1:] != s[:-1]
    group_id = np.cumsum(new_group) - 1  # (n,) dense group index
    tie_id = np.cumsum(new_tie) - 1  # (n,) dense tie-run index
    tie_start = np.flatnonzero(new_tie)
    tie_end = np.append(tie_start[1:], n)  # exclusive
    group_start = np.flatnonzero(new_group)
    # 1-based rank inside the group, averaged over each tie run
    avg_rank = (tie_start + tie_end + 1) / 2.0 - group_start[group_id[tie_start]]  # (runs,)
    rank = avg_rank[tie_id]  # (n,)
    n_groups = len(group_start)
    size = np.bincount(group_id, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(group_id, weights=pos, minlength=n_groups)
    rank_sum = np.bincount(group_id, weights=rank * pos, minlength=n_groups)
    n_neg = size - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        per_group = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    per_group[(n_pos == 0) | (n_neg == 0)] = np.nan
    return per_group, size


def auc(y: Any, p: Any) -> float:
    """Area under the ROC curve; ties count one half. ``nan`` when a class is missing."""
    y, p = _as_1d(y, p)
    if len(y) == 0:
        return float("nan")
    per_group, _ = _grouped_auc(y, p, np.zeros(len(y), dtype=np.int64))
    return float(per_group[0])


def gauc(y: Any, p: Any, groups: Any) -> float:
    """Impression-weighted mean of per-group AUC over groups that hold both classes."""
    y, p = _as_1d(y, p)
    g = np.asarray(groups).reshape(-1)
    if g.shape != y.shape:
        raise ValueError(f"groups length {g.shape} differs from labels {y.shape}")
    if len(y) == 0:
        return float("nan")
    per_group, size = _grouped_auc(y, p, g)
    ok = np.isfinite(per_group)
    if not ok.any():
        return float("nan")
    return float(np.sum(per_group[ok] * size[ok]) / np.sum(size[ok]))


def logloss(y: Any, p: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; predictions are clipped to [eps, 1 - eps] first."""
    y, p = _as_1d(y, p)
    if len(y) == 0:
        return float("nan")
    q = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def rmse(y: Any, p: Any) -> float:
    """Root mean squared error (regression heads such as dwell time)."""
    y, p = _as_1d(y, p)
    if len(y) == 0:
        return float("nan")
    return float(np.sqrt(np.mean((y - p) ** 2)))


def calibration(y: Any, p: Any, bins: int = 10) -> dict[str, Any]:
    """Reliability of probabilities over ``bins`` equal-width bins of [0, 1].

    Returns ``mean_pred``, ``mean_label``, the expected calibration error ``ece`` (bin-size
    weighted mean of |mean prediction - label rate|) and per-bin ``bins`` rows (empty bins are
    listed with count 0 and nan means so the table always has ``bins`` rows).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y, p = _as_1d(y, p)
    n = len(y)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)  # (n,) bin of each prediction
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mp, my = sum_p / count, sum_y / count
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(mp[filled] - my[filled])) / n) if n else float("nan")
    rows = [
        {
            "lo": b / bins,
            "hi": (b + 1) / bins,
            "count": int(count[b]),
            "mean_pred": float(mp[b]),
            "mean_label": float(my[b]),
        }
        for b in range(bins)
    ]
    return {
        "mean_pred": float(np.mean(p)) if n else float("nan"),
        "mean_label": float(np.mean(y)) if n else float("nan"),
        "ece": ece,
        "bins": rows,
    }
