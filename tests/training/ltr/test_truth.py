"""The generator's truth, re-derived: it must reproduce the logs exactly, and its expected
grade must match the grades the generator actually draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.ltr.config import DEFAULT_GRADES
from training.ltr.data import grade_labels
from training.ltr.truth import (
    TruthUnavailable,
    WorldTruth,
    check_replay,
    expected_gain,
    read_raw,
)
from training.synthetic import generate_ecommerce


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ltr_world")
    generate_ecommerce(out, 60_000, 5, selection_bias=1.5)
    return out


def test_the_redrawn_world_reproduces_the_logged_truth(world: Path) -> None:
    raw = read_raw(world / "train.parquet")
    assert check_replay(WorldTruth.from_folder(world), raw, rows=len(raw["user_id"])) < 1e-12


def test_expected_grade_matches_the_generator(world: Path) -> None:
    """Mean logged grade against the mean expected grade, per bucket of true P(click)."""
    import pyarrow.parquet as pq

    t = pq.read_table(world / "train.parquet").to_pydict()
    labels = {k: np.asarray(t[k], dtype=np.float64) for k in ("click", "cart", "purchase")}
    grade = grade_labels(labels, DEFAULT_GRADES).astype(np.float64)
    ctr, cvr = np.asarray(t["true_ctr"]), np.asarray(t["true_cvr"])
    gains = [0.0, 1.0, 2.0, 3.0]
    want = expected_gain(ctr, cvr, DEFAULT_GRADES, gains)
    n = len(grade)
    assert abs(grade.mean() - want.mean()) < 4 * grade.std() / np.sqrt(n)
    hi = ctr > np.quantile(ctr, 0.9)  # the rows that carry most of the grade
    assert abs(grade[hi].mean() - want[hi].mean()) < 4 * grade[hi].std() / np.sqrt(hi.sum())
    # gains other than the grade: E[gain] != gain(E[grade])
    exp_gains = [0.0, 1.0, 3.0, 7.0]
    got = np.asarray(exp_gains)[grade.astype(int)]
    want7 = expected_gain(ctr, cvr, DEFAULT_GRADES, exp_gains)
    assert abs(got.mean() - want7.mean()) < 4 * got.std() / np.sqrt(n)


def test_expected_gain_edges() -> None:
    one, zero = np.ones(1), np.zeros(1)
    assert expected_gain(zero, one, DEFAULT_GRADES, [0, 1, 2, 3]).tolist() == [0.0]
    assert expected_gain(one, one, DEFAULT_GRADES, [0, 1, 2, 3]).tolist() == [3.0]
    assert expected_gain(one, zero, DEFAULT_GRADES, [0, 1, 2, 3]) == pytest.approx(1.04)
    with pytest.raises(TruthUnavailable, match="collect"):
        expected_gain(one, one, {"impression": 0, "collect": 1}, [0, 1])


def test_a_confounded_world_has_no_request_truth(tmp_path: Path) -> None:
    generate_ecommerce(tmp_path, 2_000, 1, hidden_confounding=1.0)
    with pytest.raises(TruthUnavailable, match="hidden_confounding"):
        WorldTruth.from_folder(tmp_path)
