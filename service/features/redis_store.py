"""Feature store on Redis: snapshot records and exposure counters shared by every worker.

Reads follow the one-round-trip habit of Feast's Redis online store: a request issues a single
``MGET`` of ``[user key, N item keys, N exposure keys]`` and decodes the records with one
``numpy.frombuffer`` (:func:`mtrank.snapshot.decode`). The snapshot version in those keys is
not looked up per request: it is read from the pointer key ``mtrank:{ns}:snap`` when first
needed and refreshed by a background task every ``refresh_s`` seconds, each time checking that
the snapshot was encoded for the model's feature spec.

Exposure reservations run one Lua script (``EVALSHA``) that checks and increments every item's
daily counter atomically inside Redis, so a cap holds across coroutines, processes and replicas.

Failures map to :mod:`service.features.store` errors: a timeout or a refused connection is
:class:`FeatureStoreUnavailable` (the caller serves defaults); nothing is latched, so the next
call after Redis comes back simply succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

from mtrank.snapshot import (
    SNAPSHOT_FORMAT,
    decode,
    default_item_record,
    default_user_record,
    exposure_key,
    exposure_key_prefix,
    item_key_prefix,
    meta_key,
    pointer_key,
    user_key,
)
from mtrank.spec import FeatureSpec
from service.features.store import (
    EXPOSURE_TTL_S,
    FeatureStoreError,
    FeatureStoreUnavailable,
    FetchResult,
    check_caps,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# KEYS: counter keys in request order. ARGV[1]: TTL of new counters (s); ARGV[1 + i]: cap of
# KEYS[i], negative = uncapped. Returns one '1'/'0' character per key (accepted or refused): a
# single bulk string parses faster than thousands of integers.
_RESERVE_LUA = """
local ttl = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[i + 1])
  local n = tonumber(redis.call('GET', key) or '0')
  if cap < 0 or n < cap then
    if n == 0 then
      redis.call('SET', key, 1, 'EX', ttl)
    else
      redis.call('INCR', key)
    end
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out)
"""

# Errors that mean "Redis cannot be reached now" (redis-py's own and the asyncio deadline).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    TimeoutError,
    OSError,
)


class _CPackedConnection(aioredis.Connection):
    """A connection that serialises commands with hiredis' C packer.

    redis-py's asyncio connection packs arguments in Python, which is most of the client-side
    cost of an MGET of thousands of keys; the sync client already uses hiredis for this.
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


@dataclass(frozen=True)
class _Serving:
    version: str
    meta: dict[str, Any]


class RedisFeatureStore:
    """:class:`~service.features.store.FeatureStore` backed by Redis.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS).
        namespace: the key namespace the snapshot was loaded under.
        spec: the served model's feature spec; snapshots encoded for another spec are refused.
        timeout_s: deadline of every Redis call (connect + command); past it the call raises
            :class:`FeatureStoreUnavailable`.
        refresh_s: how often the background task re-reads the snapshot pointer.
        max_connections: size of the connection pool shared by concurrent requests.

    One instance belongs to one event loop (redis-py's asyncio connections do).
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        spec: FeatureSpec,
        timeout_s: float = 0.05,
        *,
        refresh_s: float = 5.0,
        max_connections: int = 64,
    ) -> None:
        self.namespace = namespace
        self.spec = spec
        self._timeout_s = timeout_s
        self._refresh_s = refresh_s
        self._spec_sha = spec.sha256()
        self._default_user = default_user_record(spec)
        self._default_item = default_item_record(spec)
        # One retry without backoff: a pooled connection that died with a Redis restart is
        # replaced at once; the overall deadline still bounds the call. A blocking pool makes a
        # burst of requests beyond max_connections wait for a free connection (within the
        # deadline) instead of failing at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            # rediss:// and unix:// URLs bring their own connection class (Python packing).
            **({"connection_class": _CPackedConnection} if HIREDIS_AVAILABLE else {}),
        )
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._reserve = self._client.register_script(_RESERVE_LUA)
        self._serving: _Serving | None = None
        self._error: FeatureStoreError | None = None  # pointer names an unusable snapshot
        self._error_until = 0.0
        self._resolve_lock: asyncio.Lock | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    # -- snapshot version ------------------------------------------------------------------
    @property
    def snapshot_version(self) -> str | None:
        return self._serving.version if self._serving else None

    @property
    def snapshot_built_at(self) -> float | None:
        # A snapshot loaded before metas carried ``built_at`` has no known age.
        built = self._serving.meta.get("built_at") if self._serving else None
        return float(built) if isinstance(built, int | float) else None

    async def resolve_snapshot(self) -> str:
        """Re-read the pointer now and switch to the version it names; returns that version.

        Raises FeatureStoreError when the pointed-at snapshot does not fit the spec; the
        previously served compatible version, if any, keeps being served meanwhile.
        """
        raw = await self._guarded(
            "read snapshot pointer", self._client.get(pointer_key(self.namespace))
        )
        if raw is None:
            self._serving = None  # the data is gone (Redis restarted empty): stop reading it
            raise FeatureStoreUnavailable(
                f"no feature snapshot loaded in Redis namespace {self.namespace!r} "
                f"(key {pointer_key(self.namespace)!r} is missing): run `mtrank features load`"
            )
        version = raw.decode() if isinstance(raw, bytes) else str(raw)
        if self._serving is not None and self._serving.version == version:
            return version
        raw_meta = await self._guarded(
            "read snapshot meta", self._client.get(meta_key(self.namespace, version))
        )
        try:
            meta = self._check_meta(version, raw_meta)
        except FeatureStoreError as e:
            self.last_error = str(e)
            if self._serving is None:
                self._error, self._error_until = e, time.monotonic() + self._refresh_s
            raise
        previous = self.snapshot_version
        self._serving, self._error, self.last_error = _Serving(version, meta), None, None
        log.info("feature snapshot %s -> %s (namespace %s)", previous, version, self.namespace)
        return version

    def _check_meta(self, version: str, raw: bytes | str | None) -> dict[str, Any]:
        where = f"snapshot {version!r} in Redis namespace {self.namespace!r}"
        if raw is None:
            raise FeatureStoreError(f"{where}: the pointer names it but its meta key is missing")
        try:
            meta: dict[str, Any] = json.loads(raw)
        except ValueError as e:
            raise FeatureStoreError(f"{where}: meta is not JSON: {e}") from e
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise FeatureStoreError(f"{where}: format {meta.get('format')} is not supported")
        sha = str(meta.get("spec_sha256", ""))
        if sha != self._spec_sha:
            raise FeatureStoreError(
                f"{where} was built for feature spec {sha[:12]}, the model's spec is "
                f"{self._spec_sha[:12]}: build and load a snapshot for this model "
                "(`mtrank features build` then `mtrank features load`)"
            )
        sizes = (meta.get("user_record_bytes"), meta.get("item_record_bytes"))
        expected = (self._default_user.dtype.itemsize, self._default_item.dtype.itemsize)
        if sizes != expected:
            raise FeatureStoreError(f"{where}: record sizes {sizes} != {expected} for this spec")
        return meta

    async def _serving_version(self) -> str:
        self._start_refresher()
        if self._serving is not None:
            return self._serving.version
        if self._error is not None and time.monotonic() < self._error_until:
            raise self._error
        if self._resolve_lock is None:
            self._resolve_lock = asyncio.Lock()
        async with self._resolve_lock:  # one resolution for a burst of first requests
            if self._serving is not None:
                return self._serving.version
            return await self.resolve_snapshot()

    def _start_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.resolve_snapshot()
            except FeatureStoreError as e:
                self.last_error = str(e)
                log.warning("feature snapshot refresh failed: %s", e)

    # -- requests -------------------------------------------------------------------------
    async def fetch(self, user_id: str, item_ids: list[str], day: str) -> FetchResult:
        """User, items and exposure counts of one request with a single ``MGET``."""
        version = await self._serving_version()
        ns, n = self.namespace, len(item_ids)
        encoded = [i.encode() for i in item_ids]
        item_prefix, exposure_prefix = item_key_prefix(ns, version), exposure_key_prefix(ns, day)
        keys = [user_key(ns, version, user_id)]
        keys += [item_prefix + e for e in encoded]  # == item_key(ns, version, id), built cheaply
        keys += [exposure_prefix + e for e in encoded]
        # The client returns bytes (no decode_responses): records are binary.
        values = cast(list[bytes | None], await self._guarded("fetch", self._client.mget(keys)))
        users, user_found = decode(values[:1], self._default_user)
        items, item_found = decode(values[1 : n + 1], self._default_item)
        return FetchResult(
            user=users.reshape(()),
            user_found=bool(user_found[0]),
            items=items,
            item_found=item_found,
            exposures=self._counts(values[n + 1 :]),
        )

    def _counts(self, values: list[bytes | None]) -> np.ndarray:
        raw = np.array([b"0" if v is None else v for v in values], dtype="S20")  # (N,)
        try:
            return raw.astype(np.int64)  # (N,)
        except ValueError as e:
            raise FeatureStoreError(f"exposure counters hold a non-integer value: {e}") from e

    async def reserve_exposures(
        self, item_ids: list[str], caps: np.ndarray, day: str
    ) -> np.ndarray:
        """Atomically count one exposure per item below its cap; (N,) bool accepted.

        Raises :class:`FeatureStoreUnavailable` / :class:`FeatureStoreError` when the call fails.
        A call that timed out may still have run in Redis, so the items may or may not be
        counted; it is not retried (that could count them twice). What is served then is the
        scene's ``exposure_cap.on_store_failure`` (service/exposure.py): ``fail_closed``
        withholds capped items, so a timeout can only under-deliver (counted, not shown);
        ``fail_open`` serves them, so a cap can be exceeded by items the call did not count.
        """
        caps64 = check_caps(item_ids, caps)
        if not item_ids:
            return np.zeros(0, dtype=bool)
        keys = [exposure_key(self.namespace, day, i) for i in item_ids]
        args = [EXPOSURE_TTL_S, *caps64.tolist()]
        raw = await self._guarded("reserve exposures", self._reserve(keys=keys, args=args))
        accepted: np.ndarray = np.frombuffer(bytes(raw), dtype=np.uint8) == ord("1")  # (N,)
        if accepted.shape != (len(item_ids),):
            raise FeatureStoreError(f"reserve script returned {len(raw)} flags for {len(keys)}")
        return accepted

    async def ping(self) -> bool:
        """True when Redis answers and a snapshot compatible with the spec is being served."""
        try:
            await self._guarded("ping", self._client.ping())
            await self.resolve_snapshot()  # the pointer itself: an emptied Redis is not ready
        except FeatureStoreError as e:
            self.last_error = str(e)
            return False
        return True

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self._client.aclose()

    async def _guarded(self, what: str, call: Awaitable[T]) -> T:
        """Await a Redis call under the deadline, mapping failures to store errors."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except _UNAVAILABLE as e:
            raise FeatureStoreUnavailable(
                f"Redis feature store ({self.namespace!r}): {what} failed: {type(e).__name__}: {e}"
            ) from e
        except RedisError as e:
            raise FeatureStoreError(
                f"Redis feature store ({self.namespace!r}): {what} failed: {e}"
            ) from e
