"""Where the recall stage reads a user's history (mtrank.history): Redis, or the file in memory.

Redis: one ``GET`` per request. The version in the key is not looked up per request: the pointer
``mtrank:{ns}:hist`` and the version's meta (fields and raw-value tables) are read when first
needed and re-read by :meth:`RedisHistoryStore.watch` every few seconds, as the feature store
does with its snapshot pointer. A timeout or a refused connection is
:class:`HistoryUnavailable`; the caller answers from popularity and says so in ``degraded``.

Embedded: the history file (``MTRANK_HISTORY_PATH``, or the newest under
``models/RECALL/histories/``), held in process memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mtrank.history import (
    HistorySnapshot,
    UserHistory,
    check_meta,
    decode_record,
    meta_key,
    pointer_key,
    user_key,
)

log = logging.getLogger(__name__)


class HistoryUnavailable(RuntimeError):
    """The history store cannot answer now (down, timed out, no version loaded)."""


@dataclass(frozen=True)
class HistoryTables:
    """What one history version's records mean: attribute fields and their raw values."""

    version: str
    fields: tuple[str, ...]
    tables: dict[str, list[str]]
    max_len: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> HistoryTables:
        return cls(meta["version"], tuple(meta["fields"]), meta["tables"], int(meta["max_len"]))


class HistoryStore(Protocol):
    async def fetch(self, user_id: str) -> tuple[HistoryTables, UserHistory | None]:
        """The history version's tables and the user's record (None: unknown user)."""
        ...

    async def close(self) -> None: ...


class EmbeddedHistoryStore:
    """A history file in memory: user id -> record, decoded on demand."""

    def __init__(self, path: Path) -> None:
        snap = HistorySnapshot.load(path)
        self.tables = HistoryTables.from_meta(snap.meta())
        self._rows = {str(u): i for i, u in enumerate(snap.user_ids.tolist())}
        self._snap = snap

    async def fetch(self, user_id: str) -> tuple[HistoryTables, UserHistory | None]:
        u = self._rows.get(user_id)
        if u is None:
            return self.tables, None
        s = self._snap
        return self.tables, UserHistory(s.codes[u], s.items[s.offsets[u] : s.offsets[u + 1]])

    async def close(self) -> None:
        return None


class MissingHistoryStore:
    """No history to read (none was built): every fetch says so, with what to do."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def fetch(self, user_id: str) -> tuple[HistoryTables, UserHistory | None]:
        raise HistoryUnavailable(self.why)

    async def close(self) -> None:
        return None


class RedisHistoryStore:
    """Histories in Redis under ``namespace`` (module docstring)."""

    def __init__(self, url: str, namespace: str, timeout_s: float) -> None:
        self.namespace = namespace
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._tables: HistoryTables | None = None

    async def resolve(self) -> HistoryTables:
        """Re-read the pointer and, if it moved, the new version's meta."""
        try:
            raw = await self._client.get(pointer_key(self.namespace))
            if raw is None:
                raise HistoryUnavailable(
                    f"no history in Redis namespace {self.namespace!r}: run "
                    "`mtrank features load-history`"
                )
            version = raw.decode() if isinstance(raw, bytes) else str(raw)
            if self._tables is not None and self._tables.version == version:
                return self._tables
            raw_meta = await self._client.get(meta_key(self.namespace, version))
        except (RedisError, OSError) as e:
            raise HistoryUnavailable(f"history store: {type(e).__name__}: {e}") from e
        if raw_meta is None:
            raise HistoryUnavailable(f"history {version!r}: the pointer names it, no meta key")
        try:
            meta = check_meta(json.loads(raw_meta), f"history {version!r} in Redis")
        except ValueError as e:
            raise HistoryUnavailable(str(e)) from e
        self._tables = HistoryTables.from_meta(meta)
        log.info("history version -> %s (namespace %s)", version, self.namespace)
        return self._tables

    async def fetch(self, user_id: str) -> tuple[HistoryTables, UserHistory | None]:
        tables = self._tables or await self.resolve()
        key = user_key(self.namespace, tables.version, user_id)
        try:
            raw = await self._client.get(key)
        except (RedisError, OSError) as e:
            raise HistoryUnavailable(f"history store: {type(e).__name__}: {e}") from e
        if not isinstance(raw, bytes):
            return tables, None
        return tables, decode_record(raw, len(tables.fields))

    async def watch(self, interval_s: float) -> None:
        """Follow the pointer (run as a task): a newly loaded history reaches every worker."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.resolve()
            except HistoryUnavailable as e:
                log.warning("history watch: %s", e)

    async def close(self) -> None:
        await self._client.aclose()
