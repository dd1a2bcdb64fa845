"""The event log's contract: event types, the Redis keys of the stream, one entry's encoding.

``POST /events`` (service/events.py) appends accepted events to one Redis Stream per namespace;
offline readers (``mtrank events archive``, ``mtrank logs export``: training/logs.py) read it
through a consumer group. Both sides use these names, so neither can drift from the other.

One stream entry is one event, a single field ``e`` holding the event as compact JSON with the
keys of :data:`FIELDS` (``amount`` only for purchases, ``seconds`` only for stay events) plus
``orphan`` (true when its ``request_id`` is not one this service minted) and ``received`` (the
service's clock when it was accepted, seconds). The entry id is Redis's own
(milliseconds-sequence of the append), so ``MINID`` trimming keeps a time-based retention.
"""

from __future__ import annotations

from typing import Final

EVENT_TYPES: Final = ("impression", "click", "cart", "collect", "purchase", "stay")
FIELDS: Final = ("event_id", "type", "request_id", "user_id", "item_id", "ts", "amount", "seconds")
ENTRY_FIELD: Final = b"e"


def stream_key(namespace: str) -> bytes:
    """The namespace's event stream."""
    return f"mtrank:{namespace}:events".encode()


def dedup_key_prefix(namespace: str) -> bytes:
    """Prefix of the keys that remember an accepted ``event_id`` for the dedup window."""
    return f"mtrank:{namespace}:evid:".encode()
