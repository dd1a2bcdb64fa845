"""Request ids that the service can recognise later without storing them.

Every ranking answer carries a ``request_id``; events (``POST /events``, service/events.py) name
the request they belong to, and one that names a request this service never answered is an
*orphan*: kept, but counted, because it cannot be joined to what was served. Remembering every
request id (one Redis key per request for the attribution window) would cost more memory than the
feature snapshot itself at scale, so the id proves its own origin instead: 8 random bytes and the
first 8 bytes of their HMAC-SHA256 under the service's key, 32 hex characters like a uuid4.
Every worker and replica that shares the key (``MTRANK_EVENTS_KEY``) recognises the others' ids.

Without ``MTRANK_EVENTS_KEY`` the key is derived from the registry path and the served model
names: stable across workers and replicas of one deployment, but not secret, so a client that
knows both could forge an id. Set the key to make ids unforgeable.
"""

from __future__ import annotations

import hashlib
import hmac
import os

ID_BYTES = 8  # random part; the tag is as long


class RequestIds:
    """Mints and recognises request ids under one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the request id key needs at least 16 bytes")
        self._key = key

    @classmethod
    def derived(cls, *parts: str) -> RequestIds:
        """A key from deployment facts (see the module docstring for what that does not give)."""
        return cls(hashlib.sha256("\0".join(("mtrank-request-ids", *parts)).encode()).digest())

    def _tag(self, nonce: bytes) -> bytes:
        return hmac.new(self._key, nonce, hashlib.sha256).digest()[:ID_BYTES]

    def mint(self) -> str:
        nonce = os.urandom(ID_BYTES)
        return (nonce + self._tag(nonce)).hex()

    def known(self, request_id: str) -> bool:
        """Whether ``request_id`` was minted under this key (constant-time comparison)."""
        if len(request_id) != 4 * ID_BYTES:
            return False
        try:
            raw = bytes.fromhex(request_id)
        except ValueError:
            return False
        return hmac.compare_digest(raw[ID_BYTES:], self._tag(raw[:ID_BYTES]))
