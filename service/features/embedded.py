"""Feature store held in process memory, loaded from a snapshot file (``snapshot.npz``).

For a single process (the demo, a laptop, tests) it answers exactly like the Redis store: the
same records, the same default record for misses, the same reservation semantics. Lookups are a
dict from id to row and one vectorised ``take``; there is no I/O per request.

Exposure counters live in this process only, guarded by a lock: caps hold across the threads
and coroutines of one process, NOT across uvicorn workers or replicas. Serving with several
workers and exposure caps needs the Redis store, whose counters are shared.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from mtrank.snapshot import Snapshot, default_item_record, default_user_record
from mtrank.spec import FeatureSpec
from service.features.store import FeatureStoreError, FetchResult, check_caps


class EmbeddedFeatureStore:
    """:class:`~service.features.store.FeatureStore` over an in-memory snapshot.

    Args:
        snapshot: path of a ``snapshot.npz`` (checked against ``spec``) or a loaded Snapshot.
        spec: the served model's feature spec.
    """

    def __init__(self, snapshot: Path | str | Snapshot, spec: FeatureSpec) -> None:
        if not isinstance(snapshot, Snapshot):
            try:
                snapshot = Snapshot.load(Path(snapshot), spec)
            except (OSError, ValueError, KeyError) as e:
                raise FeatureStoreError(f"cannot load feature snapshot {snapshot}: {e}") from e
        elif snapshot.spec_sha256 != spec.sha256():
            raise FeatureStoreError(
                f"snapshot {snapshot.version!r} was built for spec {snapshot.spec_sha256[:12]}, "
                f"the model's spec is {spec.sha256()[:12]}"
            )
        self.spec = spec
        self.snapshot = snapshot
        # The default record sits after the last row, so a miss is just another index.
        self._users = np.concatenate([snapshot.users, default_user_record(spec).reshape(1)])
        self._items = np.concatenate([snapshot.items, default_item_record(spec).reshape(1)])
        self._user_row = {str(u): i for i, u in enumerate(snapshot.user_ids.tolist())}
        self._item_row = {str(u): i for i, u in enumerate(snapshot.item_ids.tolist())}
        self._counters: dict[str, dict[str, int]] = {}  # day -> item id -> exposures
        self._lock = threading.Lock()

    @property
    def snapshot_version(self) -> str | None:
        return self.snapshot.version

    @property
    def snapshot_built_at(self) -> float | None:
        return self.snapshot.built_at

    async def fetch(self, user_id: str, item_ids: list[str], day: str) -> FetchResult:
        miss_user, miss_item = len(self._users) - 1, len(self._items) - 1
        urow = self._user_row.get(user_id, miss_user)
        rows = np.fromiter(
            (self._item_row.get(i, miss_item) for i in item_ids),
            dtype=np.int64,
            count=len(item_ids),
        )  # (N,)
        with self._lock:
            counts = self._counters.get(day, {})
            exposures = np.fromiter(
                (counts.get(i, 0) for i in item_ids), dtype=np.int64, count=len(item_ids)
            )  # (N,)
        return FetchResult(
            user=self._users[urow].reshape(()).copy(),
            user_found=urow != miss_user,
            items=self._items.take(rows),  # (N,) records, a copy
            item_found=rows != miss_item,
            exposures=exposures,
        )

    async def reserve_exposures(
        self, item_ids: list[str], caps: np.ndarray, day: str
    ) -> np.ndarray:
        """Count one exposure per item below its cap (this process only); (N,) bool accepted.

        In memory, it never fails: ``on_store_failure`` never applies to this store.
        """
        caps64 = check_caps(item_ids, caps).tolist()
        accepted = np.zeros(len(item_ids), dtype=bool)
        with self._lock:
            counts = self._counters.setdefault(day, {})
            for k, (item, cap) in enumerate(zip(item_ids, caps64, strict=True)):
                n = counts.get(item, 0)
                if cap < 0 or n < cap:
                    counts[item] = n + 1
                    accepted[k] = True
            self._forget_old_days(keep=day)
        return accepted

    def _forget_old_days(self, keep: str) -> None:
        # Like the Redis counters' TTL: only today and the day before stay.
        for day in sorted(self._counters)[:-2]:
            if day != keep:
                del self._counters[day]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
