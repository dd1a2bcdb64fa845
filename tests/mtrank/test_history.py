"""mtrank.history: pinned key bytes, the record layout, the file and the Redis loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import redis

from harness.processes import RedisProcess
from mtrank.history import (
    HistorySnapshot,
    decode_record,
    encode_record,
    load_history_to_redis,
    meta_key,
    pointer_key,
    user_key,
)


def _snapshot(version: str = "h1") -> HistorySnapshot:
    return HistorySnapshot(
        version=version, max_len=3, fields=["gender", "city_tier"],
        tables={"gender": ["F", "M"], "city_tier": ["1", "2", "3"]},
        user_ids=np.array(["7", "8"]), codes=np.array([[1, 2], [-1, 0]], dtype=np.int32),
        offsets=np.array([0, 3, 3]), items=np.array([11, 12, 2**40], dtype=np.int64),
    )  # fmt: skip


def test_keys_are_pinned() -> None:
    assert pointer_key("ns") == b"mtrank:ns:hist"
    assert meta_key("ns", "h1") == b"mtrank:ns:hist:h1:meta"
    assert user_key("ns", "h1", "u7") == b"mtrank:ns:hist:h1:u:u7"


def test_record_bytes_are_pinned_and_round_trip() -> None:
    raw = encode_record(np.array([1, -1]), np.array([5, 2**40]))
    assert raw == (
        b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"\x05" + b"\x00" * 7 + b"\x00" * 5 + b"\x01\x00\x00"
    )
    rec = decode_record(raw, 2)
    assert rec is not None
    assert rec.codes.tolist() == [1, -1] and rec.items.tolist() == [5, 2**40]
    assert decode_record(raw[:-1], 2) is None  # a length no layout of 2 fields can have
    empty = decode_record(encode_record(np.array([0, 0]), np.array([], np.int64)), 2)
    assert empty is not None and len(empty.items) == 0


def test_file_round_trip(tmp_path: Path) -> None:
    snap = _snapshot()
    back = HistorySnapshot.load(snap.save(tmp_path / "h.npz"))
    assert back.meta() == snap.meta()
    assert [back.record(u) for u in range(2)] == [snap.record(u) for u in range(2)]


def test_redis_load_switches_the_pointer_last() -> None:
    with RedisProcess() as rp:
        conn = redis.Redis.from_url(rp.url)
        load_history_to_redis(conn, "ns", _snapshot("h1"))
        assert conn.get(pointer_key("ns")) == b"h1"
        rec = decode_record(conn.get(user_key("ns", "h1", "7")), 2)  # type: ignore[arg-type]
        assert rec is not None and rec.items.tolist() == [11, 12, 2**40]
        summary = load_history_to_redis(conn, "ns", _snapshot("h2"))
        assert summary["previous_version"] == "h1" and conn.get(pointer_key("ns")) == b"h2"
        assert 0 < conn.ttl(user_key("ns", "h1", "7")) <= 3600  # the old version expires
        assert conn.ttl(user_key("ns", "h2", "7")) == -1
        conn.close()
