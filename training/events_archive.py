"""``mtrank events archive``: the event stream copied to Parquet through a consumer group.

The stream (mtrank/events.py) keeps only ``MTRANK_EVENTS_RETENTION_HOURS``; training needs every
event of the attribution window and more. The archiver reads the stream as one consumer of a
consumer group and writes what it read as Parquet part files::

    OUT/YYYYMMDD/part-FIRSTMS-FIRSTSEQ-LASTMS-LASTSEQ-CONSUMER.parquet

one folder per UTC day of *arrival* (the stream id's milliseconds: when the service accepted the
event), so a reader of a time range opens only the folders that can hold it. Columns:
:data:`EVENT_SCHEMA` (the entry's fields, plus ``stream_id``).

**Delivery.** An entry is acknowledged (``XACK``) only after the part file that holds it is
written, fsynced and renamed into place; a killed archiver leaves its read-but-unacknowledged
entries pending in the group. On start it first re-reads *its own* pending entries
(``XREADGROUP ... 0``): those already in one of its part files (a kill between the rename and the
ack) are acknowledged without being written again, the others are written. Entries reach one
consumer in id order, so the part files of a consumer cover disjoint id ranges, named in the file
name; the recovery reads the ``stream_id`` column of the parts whose range meets the pending
ids. Restart an archiver under the same ``--consumer`` name (default: the host name) to recover
its entries; several archivers with different names share the work of one group. Readers
(:func:`read_archive`) still deduplicate by ``event_id``: a client that retried a batch after
the service's dedup window stored one event twice.

**Loss.** An entry trimmed by retention before the group read it is gone for the archive; the
archiver warns when the stream's ``max-deleted-entry-id`` is past the group's last delivered id
(the archive fell behind the retention) and counts pending entries whose data were trimmed.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
import redis
from redis.exceptions import RedisError, ResponseError

from mtrank.events import ENTRY_FIELD, stream_key

log = logging.getLogger(__name__)

EVENT_SCHEMA = pa.schema(
    [
        ("stream_id", pa.string()),  # "MS-SEQ": arrival order in the stream
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("request_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("ts", pa.float64()),  # the client's timestamp, Unix seconds
        ("received", pa.float64()),  # the service's clock when it accepted the event
        ("orphan", pa.bool_()),
        ("amount", pa.float64()),  # purchases only, else null
        ("seconds", pa.float64()),  # stay events only, else null
    ]
)
_JSON_SCHEMA = pa.schema(list(EVENT_SCHEMA)[1:])  # an entry's JSON: the fields but stream_id
_PART = re.compile(r"^part-(\d+)-(\d+)-(\d+)-(\d+)-(.+)\.parquet$")
_CONSUMER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream id, fields) as redis-py returns them


def parse_id(stream_id: str | bytes) -> tuple[int, int]:
    """``b"1700000000000-3"`` -> (1700000000000, 3): ids compare as these pairs."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def arrival_day(stream_id: str | bytes) -> str:
    return datetime.fromtimestamp(parse_id(stream_id)[0] / 1000, UTC).strftime("%Y%m%d")


def entries_to_table(entries: Sequence[Entry]) -> pa.Table:
    """Stream entries -> a table of :data:`EVENT_SCHEMA` (entries without data are skipped).

    The entries' JSON is parsed by Arrow's reader as one newline-delimited document (a Python
    ``json.loads`` per entry would cost the archiver most of its time)."""
    kept = [(sid, fields[ENTRY_FIELD]) for sid, fields in entries if ENTRY_FIELD in fields]
    if not kept:
        return EVENT_SCHEMA.empty_table()
    body = b"\n".join(raw for _, raw in kept)
    options = pajson.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore")
    parsed = pajson.read_json(io.BytesIO(body), parse_options=options)
    ids = pa.array([sid.decode() for sid, _ in kept], pa.string())
    return pa.Table.from_arrays(
        [ids, *(parsed.column(name) for name in _JSON_SCHEMA.names)], schema=EVENT_SCHEMA
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parts(table: pa.Table, out: Path, consumer: str) -> list[Path]:
    """Write ``table`` (ordered by stream id) as one part per arrival day, durably.

    Each part is written to a hidden temporary name, fsynced, renamed into place and its folder
    fsynced: once this returns, the rows survive a crash of the machine, so they may be acked.
    """
    if table.num_rows == 0:
        return []
    ms, seq = _id_columns(table.column("stream_id"))
    day = ms // 86_400_000  # (n,) UTC day number of each arrival
    cuts = [0, *(np.flatnonzero(np.diff(day)) + 1).tolist(), len(day)]
    paths = []
    for start, end in itertools.pairwise(cuts):
        folder = out / arrival_day(f"{ms[start]}-0")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{ms[start]}-{seq[start]}-{ms[end - 1]}-{seq[end - 1]}-{consumer}.parquet"
        path, tmp = folder / name, folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table.slice(start, end - start), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
        paths.append(path)
    return paths


def _days(start_s: float, end_s: float) -> list[str]:
    first = datetime.fromtimestamp(start_s, UTC).date()
    last = datetime.fromtimestamp(end_s, UTC).date()
    return [(first + timedelta(d)).strftime("%Y%m%d") for d in range((last - first).days + 1)]


def part_files(
    directory: Path, start_s: float | None = None, end_s: float | None = None
) -> list[Path]:
    """The archive's part files whose arrival range may meet [start_s, end_s], in name order."""
    directory = Path(directory)
    if start_s is None or end_s is None:
        folders = sorted(p for p in directory.iterdir() if p.is_dir())
    else:
        folders = [directory / d for d in _days(start_s, end_s)]
    out = []
    for folder in folders:
        for path in sorted(folder.glob("part-*.parquet")):
            m = _PART.match(path.name)
            if m is None:
                continue
            first_ms, last_ms = int(m.group(1)), int(m.group(3))
            if start_s is not None and last_ms < start_s * 1000:
                continue
            if end_s is not None and first_ms > end_s * 1000:
                continue
            out.append(path)
    return out


def _id_columns(ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(ms, seq) int64 arrays of "MS-SEQ" stream ids (vectorised :func:`parse_id`)."""
    parts = pc.split_pattern(ids, "-")
    ms = pc.cast(pc.list_element(parts, 0), pa.int64()).to_numpy()
    seq = pc.cast(pc.list_element(parts, 1), pa.int64()).to_numpy()
    return np.asarray(ms), np.asarray(seq)


def dedupe_events(table: pa.Table) -> pa.Table:
    """The first entry (in stream order) of every ``event_id``, in stream order."""
    if table.num_rows == 0:
        return table
    ms, seq = _id_columns(table.column("stream_id"))
    order = np.lexsort((seq, ms))
    if np.any(np.diff(order) < 0):
        table = table.take(pa.array(order))
    codes = pc.dictionary_encode(table.column("event_id").combine_chunks()).indices
    _, first = np.unique(codes.to_numpy(zero_copy_only=False), return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(pa.array(np.sort(first)))


def read_archive(
    directory: Path,
    start_s: float | None = None,
    end_s: float | None = None,
    request_ids: pa.Array | None = None,
) -> pa.Table:
    """The archived events that arrived in [start_s, end_s] (all when None), deduplicated by
    ``event_id``; with ``request_ids``, only the events of those requests (filtered file by
    file, so memory holds the matching events only)."""
    tables = []
    for path in part_files(directory, start_s, end_s):
        t = pq.read_table(path, schema=EVENT_SCHEMA)
        if request_ids is not None:
            t = t.filter(pc.is_in(t.column("request_id"), value_set=request_ids))
        tables.append(t)
    if not tables:
        return EVENT_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    if start_s is not None or end_s is not None:
        ms, _ = _id_columns(table.column("stream_id"))  # arrival, milliseconds
        lo = -1 if start_s is None else int(start_s * 1000)
        hi = 1 << 62 if end_s is None else int(end_s * 1000)
        table = table.filter(pa.array((ms >= lo) & (ms <= hi)))
    return dedupe_events(table.combine_chunks())


@dataclass
class ArchiveStats:
    """What one run did: entries read, rows written, pending entries found already archived
    (written before a crash, acked now), pending entries whose data were trimmed, part files."""

    read: int = 0
    written: int = 0
    already_archived: int = 0
    trimmed: int = 0
    parts: int = 0


class Archiver:
    """One consumer of a consumer group on the namespace's stream (module docstring).

    Args:
        client: a sync Redis client.
        namespace: the events' namespace (``mtrank:NS:events``).
        group: the consumer group; created at the start of the stream if missing.
        out: the archive directory.
        consumer: this archiver's name in the group (restart under the same name to recover
            its pending entries).
        batch: entries per part file at most (also the ``COUNT`` of a read).
        flush_s: a part is written at least this often while entries arrive.
        block_ms: how long one read waits for new entries (the reaction time to a stop).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        group: str,
        out: Path,
        consumer: str,
        *,
        batch: int = 10_000,
        flush_s: float = 10.0,
        block_ms: int = 2_000,
    ) -> None:
        if not _CONSUMER.match(consumer):
            raise ValueError(f"consumer name {consumer!r}: use letters, digits, '_', '.', '-'")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.client = client
        self.stream = stream_key(namespace)
        self.group = group
        self.out = Path(out)
        self.consumer = consumer
        self.batch = batch
        self.flush_s = flush_s
        self.block_ms = block_ms
        self.stats = ArchiveStats()

    def ensure_group(self) -> None:
        """Create the group at the start of the stream (``MKSTREAM``) unless it exists."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._warn_if_behind()

    def _warn_if_behind(self) -> None:
        """Warn when retention trimmed entries the group never read. Trimming removes the oldest
        entries, so if the stream still starts at or before the group's last delivered id, every
        unread entry is still there; otherwise the unread ones missing are the entries added
        less those the group read less those left."""
        info = self.client.xinfo_stream(self.stream)
        first = info["first-entry"][0] if info.get("first-entry") else None
        for g in self.client.xinfo_groups(self.stream):
            read = g.get("entries-read")
            if g["name"].decode() != self.group or read is None:
                continue
            if first is None or parse_id(first) > parse_id(g["last-delivered-id"]):
                lost = int(info["entries-added"]) - int(read) - int(info["length"])
                if lost > 0:
                    log.warning(
                        "events archive: the stream trimmed %d entries group %r had not read: "
                        "the archive fell behind retention", lost, self.group,
                    )  # fmt: skip
                    self.stats.trimmed += lost

    def _read(self, start: str, block: int | None) -> list[Entry]:
        # redis-py types a reply as any of its shapes; with one stream it is [[key, entries]]
        resp: Any = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self.batch, block=block
        )
        return list(resp[0][1]) if resp else []

    def recover(self) -> None:
        """Archive (or just acknowledge) this consumer's pending entries."""
        last = "0"
        while True:
            entries = self._read(last, None)
            if not entries:
                return
            last = entries[-1][0].decode()
            self.stats.read += len(entries)
            gone = [sid for sid, f in entries if not f]
            if gone:
                log.warning("events archive: %d pending entries were trimmed before they were "
                            "archived (%s..)", len(gone), gone[0].decode())  # fmt: skip
                self.stats.trimmed += len(gone)
            done = self._archived([sid for sid, f in entries if f])
            self.stats.already_archived += len(done)
            self._store([e for e in entries if e[1] and e[0] not in done])
            self._ack([sid for sid, _ in entries])

    def _archived(self, ids: Sequence[bytes]) -> set[bytes]:
        """Which of ``ids`` (this consumer's) are in this consumer's part files already."""
        if not ids:
            return set()
        lo, hi = parse_id(ids[0]), parse_id(ids[-1])
        found: set[bytes] = set()
        for day in sorted({arrival_day(s) for s in ids}):
            folder = self.out / day
            if not folder.is_dir():
                continue
            for path in folder.glob(f"part-*-{self.consumer}.parquet"):
                m = _PART.match(path.name)
                if m is None or m.group(5) != self.consumer:
                    continue
                first = (int(m.group(1)), int(m.group(2)))
                last = (int(m.group(3)), int(m.group(4)))
                if last < lo or first > hi:
                    continue
                col = pq.read_table(path, columns=["stream_id"]).column("stream_id")
                found.update(s.encode() for s in col.to_pylist())
        return {s for s in ids if s in found}

    def _store(self, entries: Sequence[Entry]) -> None:
        if entries:
            paths = write_parts(entries_to_table(entries), self.out, self.consumer)
            self.stats.written += len(entries)
            self.stats.parts += len(paths)

    def _ack(self, ids: Sequence[bytes]) -> None:
        if ids:
            self.client.xack(self.stream, self.group, *ids)

    def run(self, once: bool = False, stop: threading.Event | None = None) -> ArchiveStats:
        """Recover, then archive new entries until ``stop`` is set (``once``: until none are
        left). Entries are acknowledged only after their part is on disk."""
        stop = stop or threading.Event()
        self.ensure_group()
        self.recover()
        buffer: list[Entry] = []
        since = 0.0
        while True:
            entries = self._read(">", None if once else self.block_ms)
            if entries and not buffer:
                since = time.monotonic()
            buffer += entries
            self.stats.read += len(entries)
            idle = not entries
            due = bool(buffer) and time.monotonic() - since >= self.flush_s
            finishing = stop.is_set() or (once and idle)
            if len(buffer) >= self.batch or due or (buffer and finishing):
                self._store(buffer)
                self._ack([sid for sid, _ in buffer])
                buffer = []
            if finishing:
                return self.stats


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtrank events", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    a = sub.add_parser("archive", help="copy the event stream to Parquet via a consumer group")
    a.add_argument("--redis", required=True, help="redis://host:port/db")
    a.add_argument("--namespace", required=True, help="the service's MTRANK_FEATURE_NAMESPACE")
    a.add_argument("--group", required=True, help="consumer group (created if missing)")
    a.add_argument("--out", required=True, type=Path, help="archive directory")
    a.add_argument("--consumer", default=socket.gethostname(), help="default: the host name")
    a.add_argument("--block-ms", type=int, default=2_000, help="wait for new entries per read")
    a.add_argument("--batch", type=int, default=10_000, help="entries per part file at most")
    a.add_argument("--flush-s", type=float, default=10.0, help="a part at least this often")
    a.add_argument("--once", action="store_true", help="archive what is there, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    client = redis.Redis.from_url(args.redis)
    try:
        archiver = Archiver(client, args.namespace, args.group, args.out, args.consumer,
                            batch=args.batch, flush_s=args.flush_s,
                            block_ms=args.block_ms)  # fmt: skip
        stats = archiver.run(once=args.once, stop=stop)
    except (RedisError, OSError, ValueError) as e:
        log.error("mtrank events archive: %s", e)
        return 1
    finally:
        client.close()
    log.info("read %d, written %d in %d part(s), already archived %d, trimmed %d",
             stats.read, stats.written, stats.parts, stats.already_archived,
             stats.trimmed)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
