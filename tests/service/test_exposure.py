"""The reserve stage (service/exposure.py) against a scripted store: refills after refusals, and
what each ``on_store_failure`` policy serves when a reservation call fails in a given round.
"""

from __future__ import annotations

import asyncio
from typing import cast

import numpy as np
import pytest

from service.exposure import Reservation, StoreFailurePolicy, reserve
from service.features.store import FeatureStore, FeatureStoreUnavailable

IDS = [f"i{k}" for k in range(8)]
RANKED = np.array([3, 0, 5, 1, 7, 2, 6, 4], dtype=np.int64)  # best first
#                 i0  i1  i2  i3  i4  i5  i6  i7
CAPS = np.array([5, -1, -1, 2, -1, 4, -1, -1], dtype=np.int64)  # < 0: uncapped


class ScriptedStore:
    """Counts exposures like the real stores; refuses ``refuse`` ids once; fails round ``fail``."""

    def __init__(self, refuse: tuple[str, ...] = (), fail: int | None = None) -> None:
        self.refuse, self.fail = set(refuse), fail
        self.calls: list[list[str]] = []
        self.counted: list[str] = []

    async def reserve_exposures(
        self, item_ids: list[str], caps: np.ndarray, day: str
    ) -> np.ndarray:
        self.calls.append(list(item_ids))
        if self.fail is not None and len(self.calls) == self.fail:
            raise FeatureStoreUnavailable("redis down")
        accepted = np.array([i not in self.refuse for i in item_ids], dtype=bool)
        self.refuse -= set(item_ids)
        self.counted += [i for i, ok in zip(item_ids, accepted, strict=True) if ok]
        return accepted


def run(store: ScriptedStore, policy: StoreFailurePolicy, **kw: bool) -> Reservation:
    size, day = 4, "20260101"
    return asyncio.run(
        reserve(cast(FeatureStore, store), IDS, RANKED, CAPS, size, day, policy, **kw)
    )


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_healthy_store_reserves_the_top_items_and_refills_refusals(
    policy: StoreFailurePolicy,
) -> None:
    store = ScriptedStore(refuse=("i0",))
    got = run(store, policy)
    assert got.order.tolist() == [3, 5, 1, 7]  # i0 refused, the next best took its slot
    assert store.calls == [["i3", "i0", "i5", "i1"], ["i7"]]
    assert np.flatnonzero(got.refused).tolist() == [0]
    assert not got.failed and not got.withheld.any() and not got.uncounted.any()


def test_fail_open_serves_the_ranked_items_uncounted() -> None:
    got = run(ScriptedStore(fail=1), "fail_open")
    assert got.failed and got.order.tolist() == [3, 0, 5, 1]
    assert np.flatnonzero(got.uncounted).tolist() == [0, 1, 3, 5]
    assert not got.withheld.any()


def test_fail_closed_withholds_capped_items_and_refills_with_uncapped() -> None:
    got = run(ScriptedStore(fail=1), "fail_closed")
    assert got.failed
    assert got.order.tolist() == [1, 7, 2, 6]  # the best four without a cap
    assert np.flatnonzero(got.withheld).tolist() == [0, 3, 5]  # capped, were in the top four
    assert (CAPS[got.order] < 0).all()
    assert np.flatnonzero(got.uncounted).tolist() == [1, 2, 6, 7]


def test_fail_closed_keeps_what_an_earlier_round_reserved() -> None:
    # Round 1 reserves i3, i5, i1 and refuses i0; round 2 (the refill, i7) fails.
    store = ScriptedStore(refuse=("i0",), fail=2)
    got = run(store, "fail_closed")
    assert store.counted == ["i3", "i5", "i1"]
    assert got.order.tolist() == [3, 5, 1, 7]  # i3, i5 are capped but reserved: safe to show
    assert not got.withheld.any()
    assert np.flatnonzero(got.uncounted).tolist() == [7]
    assert np.flatnonzero(got.refused).tolist() == [0]


def test_fail_closed_when_the_caps_are_unknown_withholds_everything_without_a_call() -> None:
    store = ScriptedStore()
    got = run(store, "fail_closed", caps_known=False)
    assert store.calls == [] and got.failed
    assert got.order.tolist() == []
    assert np.flatnonzero(got.withheld).tolist() == [0, 1, 3, 5]


def test_fail_open_reserves_even_when_the_caps_are_unknown() -> None:
    store = ScriptedStore()
    got = run(store, "fail_open", caps_known=False)
    assert store.calls == [["i3", "i0", "i5", "i1"]] and not got.failed
    assert got.order.tolist() == [3, 0, 5, 1]


def test_refusals_past_the_last_round_return_only_reserved_items() -> None:
    # Every round refuses its first new item: after 4 rounds what is not reserved is not returned.
    class Stubborn(ScriptedStore):
        async def reserve_exposures(
            self, item_ids: list[str], caps: np.ndarray, day: str
        ) -> np.ndarray:
            self.calls.append(list(item_ids))
            return np.arange(len(item_ids)) != 0

    got = run(Stubborn(), "fail_open")
    assert not got.failed and got.refused.sum() == 4
    assert got.order.tolist() == [0, 5, 1]  # reserved in round 1; rounds 2-4 refused each refill
