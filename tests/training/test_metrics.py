"""Metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import auc, calibration, gauc, logloss, rmse


def brute_auc(y: np.ndarray, p: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_hand_computed() -> None:
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) = 3/4
    assert auc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(0.75)
    assert auc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.1, 0.2]) == 0.0


def test_auc_ties_count_half() -> None:
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    # positive 0.5 ties one negative, beats the other: (0.5 + 1) / 2
    assert auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)


def test_auc_one_class_is_nan() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 6)),  # coarse scores force many ties
        min_size=1,
        max_size=60,
    )
)
def test_auc_equals_brute_force(rows: list[tuple[int, int]]) -> None:
    y = np.array([r[0] for r in rows], dtype=np.float64)
    p = np.array([r[1] for r in rows], dtype=np.float64) / 6.0
    want = brute_auc(y, p)
    got = auc(y, p)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


def test_auc_random_large_against_brute_force() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.3).astype(np.float64)
    p = np.round(rng.random(2000) + 0.3 * y, 2)
    assert auc(y, p) == pytest.approx(brute_auc(y, p), abs=1e-12)


def test_gauc_hand_computed() -> None:
    # user 1: 3 rows, AUC 1.0; user 2: 2 rows, AUC 0.0; user 3: one class only -> skipped
    y = [1, 0, 0, 1, 0, 1, 1]
    p = [0.9, 0.1, 0.2, 0.3, 0.7, 0.5, 0.6]
    g = [1, 1, 1, 2, 2, 3, 3]
    assert gauc(y, p, g) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)


def test_gauc_matches_per_group_brute_force() -> None:
    rng = np.random.default_rng(7)
    n = 3000
    g = rng.integers(0, 80, n)
    y = (rng.random(n) < 0.2).astype(np.float64)
    p = np.round(rng.random(n) + 0.2 * y, 1)
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        a = brute_auc(y[m], p[m])
        if not math.isnan(a):
            num += a * m.sum()
            den += m.sum()
    assert gauc(y, p, g) == pytest.approx(num / den, abs=1e-12)
    # groups given in any order or dtype give the same answer
    perm = rng.permutation(n)
    assert gauc(y[perm], p[perm], g[perm].astype(str)) == pytest.approx(num / den, abs=1e-12)


def test_gauc_no_informative_group_is_nan() -> None:
    assert math.isnan(gauc([1, 0], [0.3, 0.2], [1, 2]))


def test_logloss_hand_computed() -> None:
    want = -(math.log(0.8) + math.log(1 - 0.4)) / 2
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(want)
    # clipping keeps a confident mistake finite
    assert logloss([1], [0.0], eps=1e-7) == pytest.approx(-math.log(1e-7))


def test_rmse_hand_computed() -> None:
    assert rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="length"):
        auc([1, 0], [0.1])


def test_calibration_hand_computed() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.15, 0.95, 0.91, 0.99])
    cal = calibration(y, p, bins=10)
    assert cal["mean_pred"] == pytest.approx(p.mean())
    assert cal["mean_label"] == pytest.approx(0.5)
    assert len(cal["bins"]) == 10
    b1, b9 = cal["bins"][1], cal["bins"][9]
    assert b1["count"] == 2 and b1["mean_pred"] == pytest.approx(0.15)
    assert b1["mean_label"] == pytest.approx(0.5)
    assert b9["count"] == 3 and b9["mean_label"] == pytest.approx(2 / 3)
    want = (1 * 0.05 + 2 * abs(0.15 - 0.5) + 3 * abs(0.95 - 2 / 3)) / 6
    assert cal["ece"] == pytest.approx(want)
    assert cal["bins"][4]["count"] == 0 and math.isnan(cal["bins"][4]["mean_pred"])


def test_calibration_of_calibrated_predictions_is_small() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(np.float64)
    assert calibration(y, p)["ece"] < 0.01
    assert calibration(y, np.clip(p * 0.5, 0, 1))["ece"] > 0.2
