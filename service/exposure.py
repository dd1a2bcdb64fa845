"""Exposure reservation: the request's "reserve" stage, the one write a request makes.

After the rules picked the items (service/rules.py, pure), :func:`reserve` counts one exposure
per returned item with the store's atomic check-and-increment (a Redis Lua script, or a lock in
process memory). That reservation is what makes a cap hard: an item the store refuses (another
request took its last exposure) is replaced by the next item of the ranked pool with
:func:`~service.rules.fill_after_refusals`, for up to :data:`MAX_RESERVE_ROUNDS` rounds.

When the reservation cannot be made (store down, timeout, error), the scene's
``exposure_cap.on_store_failure`` decides what is served (service/ranking_config.py):

* ``fail_open``: the items as ranked, unreserved; they are reported in
  :attr:`Reservation.uncounted`, and a cap can be exceeded by them.
* ``fail_closed``: items with a cap (:func:`~service.rules.item_caps` >= 0) that are not
  reserved are withheld (:attr:`Reservation.withheld`) and their slots go to the next uncapped
  items, so no cap is ever exceeded. Items reserved in an earlier round stay. When the features
  were not read (``caps_known=False``: the items' own caps are unknown, the defaults stand in),
  no item can be shown as uncapped with certainty, nor reserved against its real cap: every item
  is withheld without a store call.

A failed call is not retried: the script may have run in Redis before the deadline, and a retry
would count the items twice. Such an exposure is counted without being shown under
``fail_closed`` (under-delivery), and counted and shown under ``fail_open``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from service.features.store import FeatureStore, FeatureStoreError
from service.rules import fill_after_refusals

log = logging.getLogger("mtrank.exposure")
MAX_RESERVE_ROUNDS = 4  # refusals are rare races; a few refills are plenty
StoreFailurePolicy = Literal["fail_open", "fail_closed"]


@dataclass(frozen=True)
class Reservation:
    """What the reserve stage decided. Per-item masks are (N,) over the request's candidates."""

    order: NDArray[np.int64]  # (k,) item indices to return, best first
    refused: NDArray[np.bool_]  # the atomic cap refused them (lost race): not returned
    withheld: NDArray[np.bool_]  # capped, not reservable while the store failed (fail_closed)
    uncounted: NDArray[np.bool_]  # returned without a counted exposure (the store failed)
    failed: bool  # a reservation call failed


async def reserve(
    store: FeatureStore,
    item_ids: list[str],
    ranked: NDArray[np.int64],
    caps: NDArray[np.int64],
    size: int,
    day: str,
    policy: StoreFailurePolicy,
    *,
    caps_known: bool = True,
    count: bool = True,
) -> Reservation:
    """Reserve one exposure for each of the first ``size`` items of ``ranked``; refill refusals.

    ``ranked`` (M,) is every item the rules kept, best first (``RerankResult.ranked``); ``caps``
    (N,) is each item's cap, < 0 uncapped (:func:`~service.rules.item_caps`). ``caps_known``
    is False when ``caps`` come from default records because the features were not read.
    ``count=False`` (``exposure_cap.count_on: impression``): impression events count the
    exposures (service/events.py), so nothing is written here; the caps were already applied
    to the counts read with the features.
    """
    n = len(item_ids)
    refused = np.zeros(n, dtype=bool)
    reserved = np.zeros(n, dtype=bool)
    refused_pos = np.zeros(len(ranked), dtype=bool)  # over `ranked`: never to be returned
    order = fill_after_refusals(ranked, refused_pos, size)
    if not count:
        none = np.zeros(n, dtype=bool)
        return Reservation(order, refused, none, none.copy(), failed=False)
    if not caps_known and policy == "fail_closed" and len(order):
        why = "the features were not read, so the items' caps are unknown"
        every = np.zeros(n, dtype=np.int64)  # any item may be capped
        return _store_failed(why, ranked, refused_pos, refused, reserved, every, size, policy)
    for _ in range(MAX_RESERVE_ROUNDS):
        todo = order[~reserved[order]]
        if len(todo) == 0:
            break
        try:
            accepted = await store.reserve_exposures(
                [item_ids[i] for i in todo.tolist()], caps[todo], day
            )
        except FeatureStoreError as e:
            return _store_failed(str(e), ranked, refused_pos, refused, reserved, caps, size, policy)
        reserved[todo[accepted]] = True
        if accepted.all():
            break
        refused[todo[~accepted]] = True
        refused_pos |= refused[ranked]
        order = fill_after_refusals(ranked, refused_pos, size)
    else:
        # Still refusing after several refills: return only what is reserved.
        order = order[reserved[order]]
    none = np.zeros(n, dtype=bool)
    return Reservation(order, refused, none, none.copy(), failed=False)


def _store_failed(
    why: str,
    ranked: NDArray[np.int64],
    refused_pos: NDArray[np.bool_],
    refused: NDArray[np.bool_],
    reserved: NDArray[np.bool_],
    caps: NDArray[np.int64],
    size: int,
    policy: StoreFailurePolicy,
) -> Reservation:
    n = len(refused)
    order = fill_after_refusals(ranked, refused_pos, size)
    withheld = np.zeros(n, dtype=bool)
    if policy == "fail_closed":
        # Capped and not reserved: showing it could pass its cap. Its slot goes further down.
        unsafe = (caps >= 0) & ~reserved  # (N,)
        withheld[order] = unsafe[order]
        order = fill_after_refusals(ranked, refused_pos | unsafe[ranked], size)
        log.warning(
            "exposure reservation failed, withholding %d capped items: %s", withheld.sum(), why
        )
    else:
        log.warning("exposure reservation failed, returning unreserved: %s", why)
    uncounted = np.zeros(n, dtype=bool)
    uncounted[order] = ~reserved[order]
    return Reservation(order, refused, withheld, uncounted, failed=True)
