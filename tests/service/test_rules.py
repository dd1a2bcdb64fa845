"""Re-rank rules: caps, exact boost/demotion weights, greedy diversity, truncation, refills."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrank.attributes import ITEM_ATTRIBUTES
from service.ranking_config import (
    Boost,
    Condition,
    Demotion,
    DiversityConstraint,
    ExposureCap,
    RulesConfig,
)
from service.rules import cap_filter, diversify, fill_after_refusals, rerank, rule_weight

TODAY = 20_000


def items(n: int, **cols: Any) -> np.ndarray:
    """Item attribute records in the snapshot layout, defaults overridden by ``cols``."""
    rec = np.zeros(n, dtype=ITEM_ATTRIBUTES.record_fields())
    rec["category"] = rec["brand"] = rec["first_seen_day"] = rec["exposure_cap"] = -1
    rec["quality"] = 1.0
    for name, values in cols.items():
        rec[name] = values
    return rec


def rules(**kw: Any) -> RulesConfig:
    return RulesConfig(**kw)


DEFAULT_RULES = RulesConfig(
    boosts=[
        Boost(
            name="promoted", when=[Condition(field="promoted", op="eq", value=1)], multiplier=1.2
        ),
        Boost(
            name="new_item",
            when=[Condition(field="first_seen_day", op="within_days", value=7)],
            multiplier=1.15,
        ),
    ],
    demotions=[
        Demotion(
            name="low_quality",
            when=[Condition(field="quality", op="lt", value=0.3)],
            multiplier=0.5,
        )
    ],
)


# ---------------------------------------------------------------- (a) caps
@pytest.mark.parametrize(
    ("exposures", "caps", "default", "keep"),
    [
        ([0, 9, 10, 11], [-1, -1, -1, -1], 10, [True, True, False, False]),
        ([5, 5, 5], [5, 6, 0], 100, [False, True, False]),
        ([0, 0], [0, -1], 1, [False, True]),
        ([99_999], [100_000], 10, [True]),
    ],
)
def test_cap_filter(exposures: list[int], caps: list[int], default: int, keep: list[bool]) -> None:
    got = cap_filter(np.array(exposures, np.int64), np.array(caps, np.int32), default)
    np.testing.assert_array_equal(got, keep)


# ---------------------------------------------------------------- (b) boosts and demotions
def test_rule_weights_multiply_exactly() -> None:
    attrs = items(
        6,
        promoted=[0, 1, 0, 1, 1, 0],
        first_seen_day=[TODAY - 30, TODAY, TODAY - 6, TODAY - 3, -1, TODAY - 7],
        quality=[1.0, 0.1, 0.29, 0.3, 0.0, 0.5],
    )
    w, effects = rule_weight(attrs, DEFAULT_RULES, TODAY)
    assert w.dtype == np.float64
    np.testing.assert_array_equal(
        w, [1.0, 1.2 * 1.15 * 0.5, 1.15 * 0.5, 1.2 * 1.15, 1.2 * 0.5, 1.0]
    )
    np.testing.assert_array_equal(effects["promoted"], [0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(effects["new_item"], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(effects["low_quality"], [0, 1, 1, 0, 1, 0])


@pytest.mark.parametrize(
    ("cond", "column", "fired"),
    [
        ({"field": "price", "op": "ge", "value": 10}, [9.99, 10, 11], [0, 1, 1]),
        ({"field": "price", "op": "le", "value": 10}, [9.99, 10, 11], [1, 1, 0]),
        ({"field": "price", "op": "gt", "value": 10}, [9.99, 10, 11], [0, 0, 1]),
        ({"field": "category", "op": "ne", "value": 3}, [3, 4, -1], [0, 1, 1]),
        ({"field": "category", "op": "in", "value": [3, 7]}, [3, 4, 7], [1, 0, 1]),
        (
            {"field": "first_seen_day", "op": "within_days", "value": 1},
            [TODAY, TODAY - 1, TODAY + 1],
            [1, 0, 0],
        ),
    ],
)
def test_conditions(cond: dict[str, Any], column: list[float], fired: list[int]) -> None:
    cfg = rules(boosts=[Boost(name="r", when=[Condition(**cond)], multiplier=2.0)])
    w, effects = rule_weight(items(3, **{cond["field"]: column}), cfg, TODAY)
    np.testing.assert_array_equal(effects["r"], np.array(fired, bool))
    np.testing.assert_array_equal(w, np.where(np.array(fired, bool), 2.0, 1.0))


def test_all_conditions_of_a_rule_must_hold() -> None:
    both = [
        Condition(field="promoted", op="eq", value=1),
        Condition(field="price", op="lt", value=5),
    ]
    cfg = rules(boosts=[Boost(name="cheap_promo", when=both, multiplier=1.5)])
    w, _ = rule_weight(items(4, promoted=[1, 1, 0, 0], price=[1, 9, 1, 9]), cfg, TODAY)
    np.testing.assert_array_equal(w, [1.5, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------- (c) diversity: worked examples
CAT_2_1 = [DiversityConstraint(field="category", window=2, max_count=1)]


def test_diversity_moves_the_next_fitting_item_up() -> None:
    attrs = items(4, category=[5, 5, 6, 6])
    res = rerank(np.array([4.0, 3.0, 2.0, 1.0]), attrs, None, rules(diversity=CAT_2_1), 4, TODAY)
    np.testing.assert_array_equal(res.order, [0, 2, 1, 3])
    np.testing.assert_array_equal(res.moved, [0, 1, -1, 0])
    assert not res.diversity_fallback.any()
    assert res.counts["diversity_moved"] == 2


def test_fallback_takes_the_best_remaining_and_flags_it() -> None:
    attrs = items(3, category=[5, 5, 5])
    res = rerank(np.array([3.0, 2.0, 1.0]), attrs, None, rules(diversity=CAT_2_1), 3, TODAY)
    np.testing.assert_array_equal(res.order, [0, 1, 2])
    np.testing.assert_array_equal(res.diversity_fallback, [False, True, True])
    assert res.counts["diversity_fallback"] == 2


def test_unknown_codes_never_count_as_equal() -> None:
    attrs = items(4, category=[-1, -1, -1, -1])
    res = rerank(np.array([4.0, 3.0, 2.0, 1.0]), attrs, None, rules(diversity=CAT_2_1), 4, TODAY)
    np.testing.assert_array_equal(res.order, [0, 1, 2, 3])
    assert not res.diversity_fallback.any()


def test_positions_after_size_keep_score_order() -> None:
    attrs = items(5, category=[1, 1, 1, 2, 2])
    ranked, fallback = diversify(np.arange(5), [attrs["category"]], CAT_2_1, 2)
    np.testing.assert_array_equal(ranked, [0, 3, 1, 2, 4])
    assert not fallback.any()


def test_ties_keep_input_order() -> None:
    res = rerank(np.zeros(5), items(5), None, rules(), 5, TODAY)
    np.testing.assert_array_equal(res.order, np.arange(5))


# ---------------------------------------------------------------- (c) diversity: properties
def reference_greedy(
    scores: np.ndarray,
    keep: np.ndarray,
    cols: list[np.ndarray],
    cons: list[tuple[int, int]],
    size: int,
) -> tuple[list[int], list[bool]]:
    """The documented greedy, written the slow and obvious way."""
    remaining = sorted(np.flatnonzero(keep).tolist(), key=lambda i: (-scores[i], i))
    out: list[int] = []
    fallback: list[bool] = []

    def fits(i: int) -> bool:
        for col, (window, k) in zip(cols, cons, strict=True):
            recent = out[max(0, len(out) - window + 1) :]
            if col[i] != -1 and sum(col[j] == col[i] for j in recent) >= k:
                return False
        return True

    while remaining and len(out) < size:
        pick = next((i for i in remaining if fits(i)), None)
        fallback.append(pick is None)
        pick = remaining[0] if pick is None else pick
        out.append(pick)
        remaining.remove(pick)
    return out, fallback


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 40))
    ints = st.lists
    scores = draw(
        ints(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, np.nan, np.inf]), min_size=n, max_size=n)
    )
    cats = draw(ints(st.integers(-1, 4), min_size=n, max_size=n))
    brands = draw(ints(st.integers(-1, 2), min_size=n, max_size=n))
    exposures = draw(ints(st.integers(0, 3), min_size=n, max_size=n))
    caps = draw(ints(st.integers(-1, 3), min_size=n, max_size=n))
    cons = draw(
        st.lists(
            st.tuples(st.sampled_from(["category", "brand"]), st.integers(1, 5), st.integers(1, 3)),
            max_size=2,
        )
    )
    return {
        "scores": np.array(scores, dtype=np.float64),
        "attrs": items(n, category=cats, brand=brands, exposure_cap=caps),
        "exposures": np.array(exposures, dtype=np.int64),
        "cons": cons,
        "size": draw(st.integers(0, 45)),
        "default_cap": draw(st.integers(1, 3)),
    }


@settings(max_examples=300, deadline=None)
@given(sc=scenarios())
def test_rerank_matches_the_reference_greedy(sc: dict[str, Any]) -> None:
    diversity = [DiversityConstraint(field=f, window=w, max_count=k) for f, w, k in sc["cons"]]
    cfg = rules(exposure_cap=ExposureCap(default_daily_cap=sc["default_cap"]), diversity=diversity)
    res = rerank(sc["scores"], sc["attrs"], sc["exposures"], cfg, sc["size"], TODAY)
    n, order = len(sc["scores"]), res.order.tolist()

    caps = np.where(
        sc["attrs"]["exposure_cap"] >= 0, sc["attrs"]["exposure_cap"], sc["default_cap"]
    )
    keep = sc["exposures"] < caps
    # Subset of the input, no duplicates, capped items never returned, nothing lost from the pool.
    assert len(set(order)) == len(order) == min(sc["size"], int(keep.sum()))
    assert all(0 <= i < n and keep[i] for i in order)
    assert sorted(res.ranked.tolist()) == np.flatnonzero(keep).tolist()
    np.testing.assert_array_equal(res.capped, ~keep)

    ranked_scores = np.where(np.isfinite(sc["scores"]), sc["scores"], -np.inf)
    cols = [sc["attrs"][f] for f, _, _ in sc["cons"]]
    want, want_fb = reference_greedy(
        ranked_scores, keep, cols, [(w, k) for _, w, k in sc["cons"]], sc["size"]
    )
    assert order == want
    assert [bool(res.diversity_fallback[i]) for i in order] == want_fb

    # Every window holds the constraints, except at items flagged as fallback.
    for col, (_, window, k) in zip(cols, sc["cons"], strict=True):
        for p, i in enumerate(order):
            recent = order[max(0, p - window + 1) : p + 1]
            if col[i] != -1 and not res.diversity_fallback[i]:
                assert sum(col[j] == col[i] for j in recent) <= k

    # moved = output position - score rank among kept items.
    by_score = sorted(np.flatnonzero(keep).tolist(), key=lambda i: (-ranked_scores[i], i))
    for p, i in enumerate(order):
        assert res.position[i] == p
        assert res.moved[i] == p - by_score.index(i)
    assert (res.position >= 0).sum() == len(order)


@pytest.mark.parametrize("seed", range(8))
def test_long_runs_of_one_value_match_the_reference(seed: int) -> None:
    """Long blocked runs send the search past the one-by-one scan into the vectorised one."""
    rng = np.random.default_rng(seed)
    n = 150
    cats = np.where(rng.random(n) < 0.85, 0, rng.integers(-1, 3, n))
    scores = np.sort(rng.random(n))[::-1] + (cats == 0)  # the big category scores first
    cons = [(3, 1), (5, 2)]
    diversity = [
        DiversityConstraint(field="category", window=3, max_count=1),
        DiversityConstraint(field="brand", window=5, max_count=2),
    ]
    attrs = items(n, category=cats, brand=rng.integers(0, 4, n))
    res = rerank(scores, attrs, None, rules(diversity=diversity), 60, TODAY)
    want, want_fb = reference_greedy(
        scores, np.ones(n, bool), [attrs["category"], attrs["brand"]], cons, 60
    )
    assert res.order.tolist() == want
    assert [bool(res.diversity_fallback[i]) for i in want] == want_fb
    assert res.counts["diversity_moved"] > 0


def test_adversarial_single_category_is_complete_and_flagged() -> None:
    n = 2000
    attrs = items(n, category=np.zeros(n, np.int32), brand=np.arange(n) % 3)
    cons = [
        DiversityConstraint(field="category", window=4, max_count=1),
        DiversityConstraint(field="brand", window=6, max_count=2),
    ]
    scores = np.random.default_rng(0).random(n)
    res = rerank(scores, attrs, None, rules(diversity=cons), 100, TODAY)
    np.testing.assert_array_equal(res.order, np.argsort(-scores, kind="stable")[:100])
    assert res.counts["diversity_fallback"] == 99
    assert len(res.ranked) == n


# ---------------------------------------------------------------- rerank composition
def test_nonfinite_scores_rank_last_and_are_flagged() -> None:
    res = rerank(np.array([np.nan, 1.0, np.inf, -np.inf, 0.5]), items(5), None, rules(), 5, TODAY)
    np.testing.assert_array_equal(res.order, [1, 4, 0, 2, 3])
    np.testing.assert_array_equal(res.nonfinite, [True, False, True, True, False])
    assert res.counts["nonfinite_score"] == 3


def test_capped_items_are_dropped_before_ranking() -> None:
    attrs = items(4, exposure_cap=[-1, 2, -1, 0])
    cfg = rules(exposure_cap=ExposureCap(default_daily_cap=5))
    res = rerank(np.array([4.0, 3.0, 2.0, 1.0]), attrs, np.array([5, 1, 4, 0]), cfg, 10, TODAY)
    np.testing.assert_array_equal(res.order, [1, 2])
    assert res.counts["capped"] == 2 and res.explain(0)["capped"] is True
    off = rules(exposure_cap=ExposureCap(enabled=False))
    res = rerank(np.array([4.0, 3.0, 2.0, 1.0]), attrs, np.array([5, 1, 4, 0]), off, 10, TODAY)
    np.testing.assert_array_equal(res.order, [0, 1, 2, 3])


def test_truncation_and_counts() -> None:
    res = rerank(np.arange(10.0), items(10), None, rules(), 3, TODAY)
    np.testing.assert_array_equal(res.order, [9, 8, 7])
    assert res.counts["truncated"] == 7 and len(res.ranked) == 10
    assert rerank(np.arange(3.0), items(3), None, rules(), 0, TODAY).order.size == 0
    with pytest.raises(ValueError, match="size must be >= 0"):
        rerank(np.arange(3.0), items(3), None, rules(), -1, TODAY)
    with pytest.raises(ValueError, match="exposures has 2 rows"):
        rerank(np.arange(3.0), items(3), np.zeros(2, np.int64), rules(), 3, TODAY)


def test_rule_effects_are_reported_not_reapplied() -> None:
    attrs = items(3, promoted=[0, 1, 0], quality=[1.0, 1.0, 0.1])
    scores = np.array([3.0, 2.0, 1.0])  # the fused scores already carry rule_weight
    res = rerank(scores, attrs, None, DEFAULT_RULES, 3, TODAY)
    np.testing.assert_array_equal(res.scores, scores)
    np.testing.assert_array_equal(res.weights, [1.0, 1.2, 0.5])
    assert res.counts["rule:promoted"] == 1 and res.counts["rule:low_quality"] == 1
    assert res.explain(1) == {
        "score": 2.0,
        "rule_weight": 1.2,
        "rules": {"promoted": 1.2},
        "capped": False,
        "nonfinite_score": False,
        "position": 1,
        "moved": 0,
        "diversity_fallback": False,
    }
    given_w = (np.array([7.0, 7.0, 7.0]), {})
    assert rerank(scores, attrs, None, DEFAULT_RULES, 3, TODAY, weights=given_w).weights[0] == 7.0


def test_attributes_as_a_mapping_of_columns() -> None:
    rec = items(3, category=[1, 1, 2])
    cols = {name: rec[name] for name in rec.dtype.names or ()}
    a = rerank(np.array([3.0, 2.0, 1.0]), rec, None, rules(diversity=CAT_2_1), 3, TODAY)
    b = rerank(np.array([3.0, 2.0, 1.0]), cols, None, rules(diversity=CAT_2_1), 3, TODAY)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.order, [0, 2, 1])


# ---------------------------------------------------------------- refills after the atomic reserve
@pytest.mark.parametrize(
    ("refused", "size", "want"),
    [
        ([0, 0, 0, 0, 0], 3, [10, 11, 12]),
        ([0, 1, 0, 0, 0], 3, [10, 12, 13]),
        ([1, 1, 1, 0, 0], 3, [13, 14]),
        ([1, 1, 1, 1, 1], 3, []),
        ([0, 1, 0, 1, 0], 0, []),
    ],
)
def test_fill_after_refusals(refused: list[int], size: int, want: list[int]) -> None:
    order = np.array([10, 11, 12, 13, 14], dtype=np.int64)
    got = fill_after_refusals(order, np.array(refused, bool), size)
    assert got.tolist() == want


def test_fill_after_refusals_checks_shapes() -> None:
    with pytest.raises(ValueError, match="refused_mask has shape"):
        fill_after_refusals(np.arange(3), np.zeros(2, bool), 2)
