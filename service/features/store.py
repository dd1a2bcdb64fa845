"""The feature store interface the ranking pipeline talks to.

A request needs, in one round trip, the user's record, every candidate's record and every
candidate's exposure count for today; after ranking it reserves exposures for the items it
returns. :class:`FeatureStore` is that contract; ``RedisFeatureStore`` (shared across workers and
replicas) and ``EmbeddedFeatureStore`` (the snapshot file in process memory, for a single
process) implement it with the same semantics.

Errors are plain exceptions here; the pipeline maps them to HTTP errors or a degraded response:

- :class:`FeatureStoreUnavailable`: the store cannot be reached right now (timeout, refused
  connection, no snapshot loaded yet). Transient: the caller serves cold-start defaults and the
  next request tries again.
- :class:`FeatureStoreError`: anything else, e.g. the serving snapshot was built for another
  feature spec. Not fixed by retrying.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

import numpy as np

# Counters live a little over a day so yesterday's can still be read across midnight, and no
# counter outlives the data it guards.
EXPOSURE_TTL_S = 2 * 24 * 3600


class FeatureStoreError(RuntimeError):
    """The feature store answered, but its answer cannot be used (wrong spec, bad data)."""


class FeatureStoreUnavailable(FeatureStoreError):
    """The feature store cannot be reached now; callers degrade to defaults and retry later."""


@dataclass(frozen=True)
class FetchResult:
    """Everything one ranking request reads from the store.

    Records are ``mtrank.snapshot`` structured records; misses hold the spec's default record
    (cold start), so every row is usable as is and ``*_found`` only tells misses apart.
    """

    user: np.ndarray  # () user_dtype record
    user_found: bool
    items: np.ndarray  # (N,) item_dtype records, in request order
    item_found: np.ndarray  # (N,) bool
    exposures: np.ndarray  # (N,) int64, today's exposures so far (0 when no counter)


@runtime_checkable
class FeatureStore(Protocol):
    """Async access to snapshot records and daily exposure counters.

    ``day`` is the UTC day as ``YYYYMMDD`` (see :func:`utc_day`); counters are per day.
    """

    @property
    def snapshot_version(self) -> str | None:
        """The snapshot version served now, or None before one is known."""
        ...

    @property
    def snapshot_built_at(self) -> float | None:
        """Unix time the served snapshot was built (its meta's ``built_at``), None if unknown."""
        ...

    async def fetch(self, user_id: str, item_ids: list[str], day: str) -> FetchResult:
        """The user, the items and the items' exposure counts, in one round trip."""
        ...

    async def reserve_exposures(
        self, item_ids: list[str], caps: np.ndarray, day: str
    ) -> np.ndarray:
        """Count one exposure per item unless that item reached its cap; (N,) bool accepted.

        Atomic per call and a hard cap under any concurrency: items are taken in order, an item
        listed twice counts twice, and ``caps[i] < 0`` means uncapped (counted, always accepted).
        Raises FeatureStoreError when the reservation cannot be made; a caller must not assume
        the items were or were not counted (service/exposure.py applies the scene's policy).
        """
        ...

    async def ping(self) -> bool:
        """True when the store answers (and has a usable snapshot); never raises."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...


def utc_day(now: datetime | None = None) -> str:
    """The exposure-counter day of ``now`` (default: the current time) as ``YYYYMMDD`` in UTC."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y%m%d")


def check_caps(item_ids: list[str], caps: np.ndarray) -> np.ndarray:
    """Caps as an (N,) int64 array matching ``item_ids``, or a ValueError naming the mismatch."""
    arr = np.asarray(caps)
    if arr.shape != (len(item_ids),):
        raise ValueError(f"caps has shape {arr.shape}, expected ({len(item_ids)},)")
    return arr.astype(np.int64, copy=False)
