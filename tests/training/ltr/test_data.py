"""Grades from the objective hierarchy, request groups and BPR's pairs: table-driven and
property checks of the pure parts of training/ltr/data.py and training/ltr/bpr.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.config import ConfigError
from training.ltr.bpr import sample_pairs
from training.ltr.config import DEFAULT_GRADES
from training.ltr.data import grade_labels, group_order, group_starts, informative_rows

# click, cart, purchase, collect -> the grade under the default hierarchy
CASES = [
    ((0, 0, 0, 0), 0),  # an impression
    ((1, 0, 0, 0), 1),  # a click
    ((1, 1, 0, 0), 2),  # carted
    ((1, 0, 1, 0), 3),  # bought without a cart
    ((1, 1, 1, 0), 3),  # bought: the highest event wins
    ((1, 0, 0, 1), 1),  # collect has no grade by default
]


def labels_of(rows: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    a = np.array(rows, dtype=np.float64)
    return {"click": a[:, 0], "cart": a[:, 1], "purchase": a[:, 2], "collect": a[:, 3]}


def test_default_grades_follow_the_hierarchy() -> None:
    got = grade_labels(labels_of([r for r, _ in CASES]), DEFAULT_GRADES)
    assert got.tolist() == [g for _, g in CASES]
    assert got.dtype == np.int32


def test_grades_are_configurable() -> None:
    grades = {"impression": 1, "click": 2, "collect": 4, "purchase": 9}
    got = grade_labels(labels_of([r for r, _ in CASES]), grades)
    assert got.tolist() == [1, 2, 2, 9, 9, 4]  # cart ungraded: a carted click is a click


def test_a_grade_for_an_unknown_event_names_it() -> None:
    with pytest.raises(ConfigError, match=r"\['share'\] are not label columns"):
        grade_labels(labels_of([(0, 0, 0, 0)]), {"impression": 0, "share": 5})


def test_groups_become_contiguous_in_a_stable_order() -> None:
    groups = np.array([7, 3, 7, 3, 9, 7])
    order, sizes = group_order(groups)
    assert order.tolist() == [1, 3, 0, 2, 5, 4]
    assert sizes.tolist() == [2, 3, 1]
    assert group_starts(sizes).tolist() == [0, 2, 5]


def test_only_groups_with_two_grades_are_informative() -> None:
    grades = np.array([0, 0, 1, 0, 2, 2, 3])
    sizes = np.array([2, 2, 2, 1])
    assert informative_rows(grades, sizes).tolist() == [False] * 2 + [True] * 2 + [False] * 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=20),
       st.integers(1, 4), st.integers(0, 2**16))  # fmt: skip
def test_every_pair_is_within_a_group_and_ordered(
    groups: list[list[int]], per_row: int, seed: int
) -> None:
    grades = np.array([g for group in groups for g in group], dtype=np.int32)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    group_of = np.repeat(np.arange(len(sizes)), sizes)
    win, lose = sample_pairs(grades, sizes, per_row, np.random.default_rng(seed))
    assert np.all(group_of[win] == group_of[lose])
    assert np.all(grades[win] > grades[lose])
    # every row above its group's lowest grade is a winner exactly per_row times
    low = np.array([min(g) for g in groups])[group_of]
    expected = np.flatnonzero(grades > low)
    assert np.array_equal(np.unique(win), expected)
    assert np.all(np.bincount(win, minlength=len(grades))[expected] == per_row)


def test_partners_are_uniform_over_the_lower_graded_rows() -> None:
    grades = np.array([2, 0, 1, 0, 0], dtype=np.int32)  # one group, grades out of order
    win, lose = sample_pairs(grades, np.array([5]), 20_000, np.random.default_rng(3))
    top = np.bincount(lose[win == 0], minlength=5) / 20_000  # grade 2 over rows 1, 2, 3, 4
    np.testing.assert_allclose(top, [0, 0.25, 0.25, 0.25, 0.25], atol=0.015)
    mid = np.bincount(lose[win == 2], minlength=5) / 20_000  # grade 1 over rows 1, 3, 4
    np.testing.assert_allclose(mid, [0, 1 / 3, 0, 1 / 3, 1 / 3], atol=0.015)
