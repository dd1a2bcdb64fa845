"""Load a feature snapshot into Redis without readers ever seeing half of it.

Every record goes under the snapshot's own version keys (``mtrank:{ns}:snap:{version}:...``),
written in pipelined batches; only when all of them and the meta are in does the pointer
``mtrank:{ns}:snap`` switch to the new version, with one ``SET``. Readers resolve the pointer,
so they see the old snapshot or the new one, never a mix. Superseded versions are not deleted
but given a TTL: a reader that resolved the old version a moment ago can still finish with it,
and the previous version stays whole for a quick rollback (switch the pointer back).

Loading the same snapshot again rewrites identical bytes under the same keys and sets the
pointer to the version it already holds: harmless.

The writer side of the key layout in :mod:`mtrank.snapshot`, so it lives in the contract: the
``mtrank features load`` job, the benchmarks and the tests all load through it. It needs only a
client object; redis-py itself (in both extras, not in the core) is imported for type checking.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from mtrank.snapshot import Snapshot, item_key, meta_key, pointer_key, user_key

if TYPE_CHECKING:
    import redis

Progress = Callable[[int], None]  # records written by the batch just sent (tqdm's update)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def load_snapshot_to_redis(
    client: redis.Redis,
    namespace: str,
    snapshot: Snapshot,
    batch_size: int = 2000,
    progress: Progress | None = None,
    keep_versions: int = 2,
    ttl_old_s: int = 3600,
) -> dict[str, Any]:
    """Write ``snapshot`` under its version keys, then point the namespace at it.

    Args:
        client: a synchronous redis-py client (bytes responses).
        namespace: key namespace the service reads (``MTRANK_REDIS_NAMESPACE``).
        batch_size: records per pipelined batch (one network round trip each).
        progress: called after each batch with the number of records it wrote.
        keep_versions: versions left without a TTL, the new one included (2 = new + previous).
        ttl_old_s: TTL given to every key of older versions.

    Returns a summary: version, previous version, records written, expired versions, seconds.
    """
    if not _VERSION.match(snapshot.version):
        raise ValueError(f"snapshot version {snapshot.version!r}: use letters, digits, '_-.'")
    if batch_size < 1 or keep_versions < 1 or ttl_old_s < 1:
        raise ValueError("batch_size, keep_versions and ttl_old_s must be positive")
    start = time.perf_counter()
    version = snapshot.version
    meta = snapshot.meta() | {"loaded_at": datetime.now(UTC).isoformat(timespec="microseconds")}
    previous_raw = client.get(pointer_key(namespace))
    previous = previous_raw.decode() if isinstance(previous_raw, bytes) else previous_raw

    # Meta first: a load that dies half-way leaves a findable version that a later load expires.
    client.set(meta_key(namespace, version), json.dumps(meta))
    records = _records(namespace, snapshot)
    written = 0
    while batch := list(itertools.islice(records, batch_size)):
        pipe = client.pipeline(transaction=False)
        for key, value in batch:
            pipe.set(key, value)
        pipe.execute()
        written += len(batch)
        if progress is not None:
            progress(len(batch))

    client.set(pointer_key(namespace), version)  # the switch: readers move to the new version
    expired = _expire_old_versions(client, namespace, version, previous, keep_versions, ttl_old_s)
    return {
        "namespace": namespace,
        "version": version,
        "previous_version": previous,
        "users": int(len(snapshot.user_ids)),
        "items": int(len(snapshot.item_ids)),
        "records_written": written,
        "expired_versions": expired,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _records(namespace: str, snapshot: Snapshot) -> Iterator[tuple[bytes, bytes]]:
    """(key, packed record) for every user then every item, slicing one contiguous buffer."""
    for ids, recs, key_of in (
        (snapshot.user_ids, snapshot.users, user_key),
        (snapshot.item_ids, snapshot.items, item_key),
    ):
        size = recs.dtype.itemsize
        buf = np.ascontiguousarray(recs).tobytes()
        for k, entity in enumerate(ids.tolist()):
            yield key_of(namespace, snapshot.version, str(entity)), buf[k * size : (k + 1) * size]


def stored_versions(client: redis.Redis, namespace: str) -> dict[str, dict[str, Any]]:
    """Every snapshot version with a meta key in ``namespace``: version -> meta."""
    prefix = meta_key(namespace, "")[: -len(b":meta")]
    pattern = _GLOB_SPECIAL.sub(r"\\\1", prefix.decode()) + "*:meta"
    found: dict[str, dict[str, Any]] = {}
    for key in client.scan_iter(match=pattern, count=1000):
        version = key[len(prefix) : -len(b":meta")].decode()
        # A user or item id ending in ':meta' also matches the pattern; versions have no ':'.
        if ":" in version or meta_key(namespace, version) != key:
            continue
        raw = client.get(key)
        if raw is not None:
            found[version] = json.loads(raw)
    return found


def _expire_old_versions(
    client: redis.Redis,
    namespace: str,
    current: str,
    previous: str | None,
    keep_versions: int,
    ttl_old_s: int,
) -> list[str]:
    """Give a TTL to every key of the versions beyond the ``keep_versions`` newest.

    Kept: the current version, the one it replaced (the rollback target), then the most recently
    loaded others. Versions already expiring are left alone, so reloading never extends them.
    """
    versions = stored_versions(client, namespace)
    others = sorted(
        (v for v in versions if v not in (current, previous)),
        key=lambda v: str(versions[v].get("loaded_at", "")),
        reverse=True,
    )
    ordered = [current] + ([previous] if previous and previous != current else []) + others
    expired: list[str] = []
    for version in ordered[keep_versions:]:
        if client.ttl(meta_key(namespace, version)) >= 0:
            continue  # already expiring
        meta = meta_key(namespace, version)
        pattern = _GLOB_SPECIAL.sub(r"\\\1", meta[: -len(b"meta")].decode()) + "*"
        pipe = client.pipeline(transaction=False)
        for n, key in enumerate(client.scan_iter(match=pattern, count=1000), start=1):
            if key != meta:
                pipe.expire(key, ttl_old_s)
            if n % 2000 == 0:
                pipe.execute()
        pipe.expire(meta, ttl_old_s)  # last: a version whose meta expires is fully handled
        pipe.execute()
        expired.append(version)
    return expired
