"""``POST /events``: what happened after an answer, checked, deduplicated, appended to a stream.

A batch of impression, click, cart, collect, purchase (with ``amount``) and stay (with
``seconds``) events. Each carries ``event_id``, ``request_id`` (the ``request_id`` of the ranking
answer it belongs to), ``user_id``, ``item_id`` and ``ts`` (Unix seconds).

**Checks** (msgspec decodes the body straight into typed structs): an unknown type, a missing or
malformed id, a timestamp more than ``MTRANK_EVENTS_FUTURE_TOLERANCE_S`` in the future, a
purchase without an amount or a stay without seconds make the whole batch a 422 naming the first
bad event's field (``events[3].type``), so a client fixes and resends one batch. An event whose
``request_id`` this service did not mint (service/request_ids.py) is kept and counted as an
*orphan*: it cannot be joined to what was served.

**Storage** is a Redis Stream per namespace (mtrank/events.py), appended by one Lua script per
batch, atomically:

- an event whose ``event_id`` was accepted within the dedup window (``SET NX EX``) is a
  duplicate: not appended again, counted as such, and the batch still succeeds (a retried batch
  is counted once);
- with ``exposure_cap.count_on: impression`` each new impression event increments its item's
  daily exposure counter (the day of its ``ts``), the counter the caps read;
- the stream is trimmed by age (``MINID``: ``MTRANK_EVENTS_RETENTION_HOURS``); readers that need
  more history archive it through a consumer group (``mtrank events archive``).

A 200 means the batch is in Redis (and, with Redis persistence, survives a restart of the
service). Redis down or past ``MTRANK_REDIS_TIMEOUT_MS`` x 4: 503 with ``Retry-After``, safe to
retry (deduplication), while ``/rank`` keeps answering from its own path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mtrank.events import dedup_key_prefix, stream_key
from mtrank.snapshot import exposure_key
from service.errors import EventsUnavailable, InvalidRequest
from service.features.store import EXPOSURE_TTL_S
from service.request_ids import RequestIds

_ID = r"^[A-Za-z0-9_.:\-]{1,128}$"
MAX_TEXT_ID = 256  # as /rank's user and item ids

EventType = Literal["impression", "click", "cart", "collect", "purchase", "stay"]


class Event(msgspec.Struct, forbid_unknown_fields=True):
    event_id: Annotated[str, msgspec.Meta(pattern=_ID)]
    type: EventType
    request_id: Annotated[str, msgspec.Meta(pattern=_ID)]
    user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_ID)]
    item_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_ID)]
    ts: Annotated[float, msgspec.Meta(ge=0)]
    amount: Annotated[float, msgspec.Meta(ge=0)] | None = None
    seconds: Annotated[float, msgspec.Meta(ge=0)] | None = None


class Stored(msgspec.Struct, omit_defaults=True):
    """One stream entry (mtrank/events.py): the event, whether it is an orphan, when received."""

    event_id: str
    type: str
    request_id: str
    user_id: str
    item_id: str
    ts: float
    received: float
    orphan: bool
    amount: float | None = None
    seconds: float | None = None


_DECODERS: dict[int, msgspec.json.Decoder[Any]] = {}
_ENCODER = msgspec.json.Encoder()


def _decoder(max_batch: int) -> msgspec.json.Decoder[Any]:
    """A decoder of ``{"events": [...]}`` with 1..max_batch events (built once per limit)."""
    dec = _DECODERS.get(max_batch)
    if dec is None:
        bounded = Annotated[list[Event], msgspec.Meta(min_length=1, max_length=max_batch)]
        batch = msgspec.defstruct("Batch", [("events", bounded)], forbid_unknown_fields=True)
        dec = _DECODERS[max_batch] = msgspec.json.Decoder(batch)
    return dec


def _field_of(message: str) -> str:
    """msgspec's ``... - at `$.events[3].type``` -> ``events[3].type``."""
    _, sep, where = message.rpartition(" - at `$.")
    return where.rstrip("`") if sep else "body"


def parse_events(
    body: bytes, max_batch: int, future_tolerance_s: float, now: float | None = None
) -> list[Event]:
    """The batch's events, or InvalidRequest naming the first bad one's field."""
    try:
        events: list[Event] = _decoder(max_batch).decode(body).events
    except msgspec.ValidationError as e:
        text = str(e)
        raise InvalidRequest(text.split(" - at ")[0], field=_field_of(text)) from e
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"body is not valid JSON: {e}", field="body") from e
    latest = (time.time() if now is None else now) + future_tolerance_s
    for i, ev in enumerate(events):
        if ev.ts > latest:
            raise InvalidRequest(
                f"ts {ev.ts} is more than {future_tolerance_s:g} s in the future",
                field=f"events[{i}].ts",
            )
        if ev.type == "purchase" and ev.amount is None:
            raise InvalidRequest("a purchase needs an amount", field=f"events[{i}].amount")
        if ev.type == "stay" and ev.seconds is None:
            raise InvalidRequest("a stay event needs seconds", field=f"events[{i}].seconds")
    return events


# KEYS[1]: the stream; KEYS[1 + i]: event i's dedup key; KEYS[1 + n + i]: its exposure counter.
# ARGV: n, dedup TTL (s), MINID of the retention, counter TTL (s), '1' to count impressions,
# then n encoded entries, then n types. Returns one character per event: 'a' appended, 'd' a
# duplicate of an event accepted within the dedup window.
_APPEND_LUA = """
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local minid = ARGV[3]
local exp_ttl = tonumber(ARGV[4])
local count = ARGV[5] == '1'
local out = {}
for i = 1, n do
  if redis.call('SET', KEYS[1 + i], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[1], 'MINID', '~', minid, '*', 'e', ARGV[5 + i])
    if count and ARGV[5 + n + i] == 'impression' then
      if redis.call('INCR', KEYS[1 + n + i]) == 1 then
        redis.call('EXPIRE', KEYS[1 + n + i], exp_ttl)
      end
    end
    out[i] = 'a'
  else
    out[i] = 'd'
  end
end
return table.concat(out)
"""


@dataclass(frozen=True)
class Appended:
    """What one batch did, per event type."""

    accepted: dict[str, int]
    duplicates: dict[str, int]
    orphans: dict[str, int]


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d")


class EventLog:
    """The Redis side of ``POST /events`` (module docstring).

    Args:
        url: the Redis URL.
        namespace: key namespace (the feature store's, so impressions reach its counters).
        request_ids: recognises the service's own request ids (orphans are the others).
        timeout_s: deadline of one batch's script.
        dedup_s: how long an ``event_id`` is remembered.
        retention_s: how long the stream keeps an entry (``MINID`` trimming).
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        request_ids: RequestIds,
        *,
        timeout_s: float,
        dedup_s: int,
        retention_s: int,
    ) -> None:
        self.namespace = namespace
        self.request_ids = request_ids
        self.timeout_s = timeout_s
        self.dedup_s = dedup_s
        self.retention_s = retention_s
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._append = self._client.register_script(_APPEND_LUA)
        self._stream = stream_key(namespace)
        self._dedup = dedup_key_prefix(namespace)

    async def append(self, events: Sequence[Event], count_impressions: bool) -> Appended:
        """Append the batch (module docstring); EventsUnavailable when Redis cannot take it."""
        now = time.time()
        entries, types, orphan_flags = [], [], []
        for ev in events:
            orphan = not self.request_ids.known(ev.request_id)
            stored = Stored(ev.event_id, ev.type, ev.request_id, ev.user_id, ev.item_id, ev.ts,
                            round(now, 3), orphan, ev.amount, ev.seconds)  # fmt: skip
            entries.append(_ENCODER.encode(stored))
            types.append(ev.type)
            orphan_flags.append(orphan)
        keys = [self._stream]
        keys += [self._dedup + ev.event_id.encode() for ev in events]
        keys += [exposure_key(self.namespace, _day(ev.ts), ev.item_id) for ev in events]
        minid = str(int((now - self.retention_s) * 1000))
        args = [len(events), self.dedup_s, minid, EXPOSURE_TTL_S,
                "1" if count_impressions else "0", *entries, *types]  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._append(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as e:
            raise EventsUnavailable(
                f"the event log cannot take the batch now ({type(e).__name__}): retry it"
            ) from e
        marks = raw.decode() if isinstance(raw, bytes) else str(raw)
        accepted: dict[str, int] = {}
        duplicates: dict[str, int] = {}
        orphans: dict[str, int] = {}
        for ev, mark, orphan in zip(events, marks, orphan_flags, strict=True):
            if mark == "a":
                accepted[ev.type] = accepted.get(ev.type, 0) + 1
                if orphan:
                    orphans[ev.type] = orphans.get(ev.type, 0) + 1
            else:
                duplicates[ev.type] = duplicates.get(ev.type, 0) + 1
        return Appended(accepted, duplicates, orphans)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self._client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._client.aclose()
