"""mtrank events archive on the real Redis: a consumer group's entries on disk once each, a kill
between the write and the ack (or before the write) losing and duplicating nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import redis

from mtrank.events import ENTRY_FIELD, stream_key
from tests.support import REDIS_URL, redis_namespace
from training.events_archive import Archiver, arrival_day, main, part_files, read_archive

GROUP = "archive"


class Killed(Exception):
    """Stands for the archiver's process dying at the point a test chooses."""


def event(i: int, **extra: Any) -> dict[str, Any]:
    """One stream entry's event, in the service's encoding (service/events.py ``Stored``)."""
    kind = ("impression", "click", "purchase", "stay", "cart", "collect")[i % 6]
    ev: dict[str, Any] = {"event_id": f"ev-{i}", "type": kind, "request_id": f"r{i // 6}",
                          "user_id": "u1", "item_id": f"i{i % 4}", "ts": 1_700_000_000.0 + i,
                          "received": 1_700_000_001.0 + i, "orphan": False}  # fmt: skip
    if kind == "purchase":
        ev["amount"] = 10.0 + i
    if kind == "stay":
        ev["seconds"] = float(i)
    return {**ev, **extra}


def append(
    conn: redis.Redis, ns: str, events: list[dict[str, Any]], ids: list[str] | None = None
) -> list[bytes]:
    """XADD each event (at the given ids, else Redis's own); the ids Redis stored."""
    key = stream_key(ns)
    given: list[str] = ids or ["*"] * len(events)
    return [conn.xadd(key, {ENTRY_FIELD: json.dumps(e, separators=(",", ":"))}, id=i)
            for e, i in zip(events, given, strict=True)]  # fmt: skip


@pytest.fixture
def stream() -> Iterator[tuple[redis.Redis, str]]:
    with redis_namespace() as (conn, ns):
        yield conn, ns


def archiver(conn: redis.Redis, ns: str, out: Path, consumer: str = "c1", **kw: Any) -> Archiver:
    return Archiver(conn, ns, GROUP, out, consumer, batch=kw.pop("batch", 10), **kw)


def raw_rows(out: Path) -> list[dict[str, Any]]:
    """Every row of every part file, duplicates included (read_archive would hide them)."""
    return [row for p in part_files(out) for row in pq.read_table(p).to_pylist()]


def pending(conn: redis.Redis, ns: str) -> int:
    return int(conn.xpending(stream_key(ns), GROUP)["pending"])


def test_once_archives_every_entry_in_parts_and_acks_them(
    stream: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    conn, ns = stream
    sent = [event(i) for i in range(25)]
    ids = append(conn, ns, sent)
    stats = archiver(conn, ns, tmp_path).run(once=True)
    assert (stats.read, stats.written, stats.parts) == (25, 25, 3)  # batches of 10, 10, 5
    assert pending(conn, ns) == 0
    rows = raw_rows(tmp_path)
    assert [r["stream_id"] for r in rows] == [i.decode() for i in ids]
    for row, ev in zip(rows, sent, strict=True):
        assert {k: row[k] for k in ev} == ev
        assert row["amount"] is None or ev["type"] == "purchase"
        assert row["seconds"] is None or ev["type"] == "stay"
    for p in part_files(tmp_path):  # the folder is the arrival day of the entries it holds
        first_ms = int(p.name.split("-")[1])
        assert p.parent.name == arrival_day(f"{first_ms}-0")
        assert p.name.endswith("-c1.parquet")
    again = archiver(conn, ns, tmp_path).run(once=True)  # nothing new: nothing written
    assert (again.read, again.written) == (0, 0)


def test_a_kill_between_write_and_ack_loses_and_duplicates_nothing(
    stream: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    conn, ns = stream

    class DiesBeforeAck(Archiver):
        def _ack(self, ids: Any) -> None:
            raise Killed

    append(conn, ns, [event(i) for i in range(25)])
    dying = DiesBeforeAck(conn, ns, GROUP, tmp_path, "c1", batch=10)
    with pytest.raises(Killed):
        dying.run(once=True)
    assert len(raw_rows(tmp_path)) == 10  # the first batch is on disk...
    assert pending(conn, ns) == 10  # ...and still pending in the group
    append(conn, ns, [event(i) for i in range(25, 30)])
    stats = archiver(conn, ns, tmp_path).run(once=True)  # restarted under the same name
    assert stats.already_archived == 10
    assert stats.written == 20
    assert pending(conn, ns) == 0
    rows = raw_rows(tmp_path)
    assert sorted(r["event_id"] for r in rows) == sorted(f"ev-{i}" for i in range(30))
    assert len({r["stream_id"] for r in rows}) == len(rows) == 30


def test_a_kill_before_the_write_archives_the_pending_entries_on_restart(
    stream: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    conn, ns = stream

    class DiesBeforeWrite(Archiver):
        def _store(self, entries: Any) -> None:
            raise Killed

    append(conn, ns, [event(i) for i in range(12)])
    with pytest.raises(Killed):
        DiesBeforeWrite(conn, ns, GROUP, tmp_path, "c1", batch=10).run(once=True)
    assert raw_rows(tmp_path) == [] and pending(conn, ns) == 10
    stats = archiver(conn, ns, tmp_path).run(once=True)
    assert (stats.already_archived, stats.written) == (0, 12)
    assert sorted(r["event_id"] for r in raw_rows(tmp_path)) == sorted(f"ev-{i}" for i in range(12))


def test_another_consumer_does_not_take_a_dead_ones_entries_as_archived(
    stream: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """Parts are per consumer: c2's recovery reads only c2's pending entries and parts."""
    conn, ns = stream

    class DiesBeforeAck(Archiver):
        def _ack(self, ids: Any) -> None:
            raise Killed

    append(conn, ns, [event(i) for i in range(6)])
    with pytest.raises(Killed):
        DiesBeforeAck(conn, ns, GROUP, tmp_path, "c1", batch=10).run(once=True)
    append(conn, ns, [event(i) for i in range(6, 9)])
    other = archiver(conn, ns, tmp_path, consumer="c2").run(once=True)
    assert (other.already_archived, other.written) == (0, 3)
    assert pending(conn, ns) == 6  # c1's, until c1 restarts
    assert archiver(conn, ns, tmp_path, consumer="c1").run(once=True).already_archived == 6
    assert pending(conn, ns) == 0
    assert len(raw_rows(tmp_path)) == 9


def test_pending_entries_trimmed_before_the_restart_are_counted(
    stream: tuple[redis.Redis, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conn, ns = stream

    class DiesBeforeWrite(Archiver):
        def _store(self, entries: Any) -> None:
            raise Killed

    append(conn, ns, [event(i) for i in range(4)])
    with pytest.raises(Killed):
        DiesBeforeWrite(conn, ns, GROUP, tmp_path, "c1").run(once=True)
    conn.xtrim(stream_key(ns), maxlen=1, approximate=False)  # retention passed over them
    stats = archiver(conn, ns, tmp_path).run(once=True)
    assert (stats.trimmed, stats.written) == (3, 1)
    assert pending(conn, ns) == 0
    assert "trimmed before they were archived" in caplog.text


def test_a_group_behind_the_retention_is_reported(
    stream: tuple[redis.Redis, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conn, ns = stream
    append(conn, ns, [event(0)])
    archiver(conn, ns, tmp_path).run(once=True)
    append(conn, ns, [event(i) for i in range(1, 5)])
    conn.xtrim(stream_key(ns), maxlen=1, approximate=False)  # 3 unread entries gone
    stats = archiver(conn, ns, tmp_path).run(once=True)
    assert (stats.written, stats.trimmed) == (1, 3)
    assert "trimmed 3 entries" in caplog.text and "fell behind retention" in caplog.text
    append(conn, ns, [event(5)])
    assert archiver(conn, ns, tmp_path).run(once=True).trimmed == 0  # caught up: silent


def test_reading_the_archive_keeps_the_first_of_a_repeated_event_id(
    stream: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """A client retry after the service's dedup window stores the event twice."""
    conn, ns = stream
    ms = [1_700_000_000_000 + 1000 * k for k in range(4)]  # arrivals one second apart
    ids = [f"{m}-0" for m in ms]
    append(conn, ns, [event(0), event(1), event(1, ts=9.0), event(2)], ids)
    archiver(conn, ns, tmp_path).run(once=True)
    table = read_archive(tmp_path)
    assert table.column("event_id").to_pylist() == ["ev-0", "ev-1", "ev-2"]
    assert table.column("stream_id").to_pylist() == [ids[0], ids[1], ids[3]]
    assert table.column("ts").to_pylist()[1] == event(1)["ts"]
    window = read_archive(tmp_path, ms[3] / 1000, ms[3] / 1000)  # by arrival, bounds included
    assert window.column("event_id").to_pylist() == ["ev-2"]
    assert read_archive(tmp_path, (ms[3] + 1) / 1000, None).num_rows == 0


def test_the_command_archives_once_and_creates_the_group(
    stream: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    conn, ns = stream
    append(conn, ns, [event(i) for i in range(7)])
    argv = ["archive", "--redis", REDIS_URL, "--namespace", ns, "--group", GROUP,
            "--out", str(tmp_path), "--consumer", "cli-1", "--once"]  # fmt: skip
    assert main(argv) == 0
    assert len(raw_rows(tmp_path)) == 7
    assert [g["name"] for g in conn.xinfo_groups(stream_key(ns))] == [GROUP.encode()]
    assert main([*argv[:-3], "--consumer", "bad name", "--once"]) == 1


def test_a_running_archiver_writes_within_flush_s_and_stops_cleanly(
    stream: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    conn, ns = stream
    stop = threading.Event()
    running = archiver(conn, ns, tmp_path, batch=1000, flush_s=0.2, block_ms=50)
    thread = threading.Thread(target=running.run, kwargs={"stop": stop})
    thread.start()
    try:
        append(conn, ns, [event(i) for i in range(5)])
        deadline = time.monotonic() + 10
        while len(raw_rows(tmp_path)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(raw_rows(tmp_path)) == 5  # a part well before the batch of 1000 filled
        append(conn, ns, [event(i) for i in range(5, 8)])
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert sorted(r["event_id"] for r in raw_rows(tmp_path)) == sorted(f"ev-{i}" for i in range(8))
    assert pending(conn, ns) == 0
