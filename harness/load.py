"""A load client for ``mtrank serve``: raw asyncio HTTP/1.1 with keep-alive connections.

Bounded: it stops at a request count or a duration, whichever comes first. A library client
(httpx, aiohttp) would hide exactly what the reliability tests look at: whether a connection was
dropped, whether a response arrived truncated, whether a request already sent got an answer. It
records, per request, when it was sent and answered, the status, a small summary of the body and
any connection error, so tests can ask questions about time windows ("every response after Redis
came back within 5 s is not degraded").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.processes import LOOPBACK


@dataclass(frozen=True)
class Sample:
    """One request: monotonic send/answer times, status (0: no answer) and a body summary."""

    sent: float
    done: float
    status: int
    info: Any = None
    error: str | None = None  # connection-level failure, with whether response bytes had come

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def statuses(self) -> Counter[int]:
        return Counter(s.status for s in self.samples if s.error is None)

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if s.error is not None]

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    def server_errors(self) -> list[Sample]:
        return [s for s in self.ok if s.status >= 500]

    def percentile(self, q: float) -> float:
        """Latency percentile (seconds) over answered requests, nearest-rank."""
        lat = sorted(s.latency for s in self.ok)
        if not lat:
            return float("nan")
        k = min(len(lat) - 1, max(0, int(round(q / 100.0 * len(lat) + 0.5)) - 1))
        return lat[k]

    def summary(self) -> str:
        n = len(self.samples)
        secs = max(self.finished - self.started, 1e-9)
        return (
            f"{n} requests in {secs:.1f} s ({n / secs:.0f}/s), statuses {dict(self.statuses)}, "
            f"connection errors {len(self.errors)}, p50 {self.percentile(50) * 1e3:.1f} ms, "
            f"p99 {self.percentile(99) * 1e3:.1f} ms, max {self.percentile(100) * 1e3:.1f} ms"
        )


class _Dropped(Exception):
    """The connection failed; ``partial`` says whether part of a response had arrived."""

    def __init__(self, what: str, partial: bool) -> None:
        super().__init__(what)
        self.partial = partial


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server asked to close (``Connection: close``)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        what = "eof in headers" if e.partial else "eof before response"
        raise _Dropped(what, bool(e.partial)) from e
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
        elif name == "transfer-encoding":
            raise _Dropped("chunked responses are not expected from /rank", True)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise _Dropped(f"eof in body ({len(e.partial)} of {length} bytes)", True) from e
    return status, body, close


def _request_bytes(path: str, body: bytes, host: str, port: int) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run_load(
    port: int,
    make_body: Callable[[int], bytes],
    *,
    concurrency: int = 32,
    max_requests: int = 100_000,
    duration_s: float = 20.0,
    path: str = "/rank",
    summarise: Callable[[int, bytes], Any] | None = None,
    stop: threading.Event | None = None,
    request_timeout_s: float = 10.0,
    reconnect: bool = True,
    think_s: float = 0.0,
) -> LoadResult:
    """Closed-loop load: ``concurrency`` keep-alive connections, each one request at a time.

    ``think_s`` is a pause between a connection's answer and its next request: it stretches a
    bounded number of requests over time (for scrapes to see the traffic as a rate).

    Stops at ``max_requests`` sent, after ``duration_s``, or when ``stop`` is set; requests in
    flight then finish (each bounded by ``request_timeout_s``). ``make_body(k)`` builds request
    ``k``; ``summarise(status, body)`` keeps what a test needs of each response (the bodies
    themselves are not kept). A dropped connection is recorded as an error and, with
    ``reconnect``, replaced.
    """
    result = LoadResult(started=time.monotonic())
    deadline = result.started + duration_s
    counter = iter(range(max_requests))
    host = LOOPBACK

    def more() -> int | None:
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return None
        return next(counter, None)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        except (OSError, TimeoutError) as e:
            result.samples.append(Sample(time.monotonic(), time.monotonic(), 0, None,
                                         f"connect: {type(e).__name__}"))  # fmt: skip
            return None

    async def one_connection() -> None:
        conn = await connect()
        while conn is not None:
            k = more()
            if k is None:
                break
            reader, writer = conn
            payload = _request_bytes(path, make_body(k), host, port)
            sent = time.monotonic()
            try:
                writer.write(payload)
                async with asyncio.timeout(request_timeout_s):
                    await writer.drain()
                    status, body, close = await _read_response(reader)
            except (_Dropped, OSError, TimeoutError) as e:
                partial = isinstance(e, _Dropped) and e.partial
                what = f"{type(e).__name__}: {e}" + (" [partial response]" if partial else "")
                result.samples.append(Sample(sent, time.monotonic(), 0, None, what))
                writer.close()
                conn = await connect() if reconnect else None
                continue
            info = summarise(status, body) if summarise is not None else None
            result.samples.append(Sample(sent, time.monotonic(), status, info))
            if close:
                writer.close()
                conn = await connect() if reconnect else None
            if think_s > 0:
                await asyncio.sleep(think_s)
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    result.finished = time.monotonic()
    return result


class LoadThread:
    """:func:`run_load` on its own event loop in a thread, so a test can inject faults meanwhile.

    ``with LoadThread(port, body, ...) as load: ...; result = load.result()``; leaving the block
    (or calling :meth:`result`) waits for the load to end (it is bounded by its duration).
    """

    def __init__(self, port: int, make_body: Callable[[int], bytes], **kw: Any) -> None:
        self.stop_event = threading.Event()
        kw.setdefault("stop", self.stop_event)
        self._args = (port, make_body)
        self._kw = kw
        self._result: LoadResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        try:
            self._result = asyncio.run(run_load(*self._args, **self._kw))
        except BaseException as e:  # surfaced by result()
            self._error = e

    def start(self) -> LoadThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def result(self, timeout_s: float = 60.0) -> LoadResult:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("load did not finish")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def __enter__(self) -> LoadThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._thread.join(60)


def raw_http(port: int, request: bytes, timeout_s: float = 10.0) -> tuple[int, bytes, float]:
    """Send exact request bytes on a fresh connection; status, body and seconds to the answer.

    The clock stops when the whole response has arrived. For bodies the server refuses early
    (413 before reading them) the send may fail half-way: the answer is read all the same.
    """
    start = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(request)
        data = b""
        while True:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                head = data[:head_end].decode("latin-1")
                length = next(
                    (int(line.split(":", 1)[1]) for line in head.split("\r\n")
                     if line.lower().startswith("content-length:")),
                    0,
                )  # fmt: skip
                if len(data) >= head_end + 4 + length:
                    status = int(head.split(" ", 2)[1])
                    body = data[head_end + 4 : head_end + 4 + length]
                    return status, body, time.monotonic() - start
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ConnectionError(f"connection closed after {len(data)} response bytes")
            data += chunk


def post_bytes(path: str, port: int, body: bytes, chunked: bool = False) -> bytes:
    """A complete POST request, with Content-Length or as one chunked body."""
    head = f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\ncontent-type: application/json\r\n"
    if chunked:
        return (head + "transfer-encoding: chunked\r\n\r\n").encode() + (
            f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        )
    return (head + f"content-length: {len(body)}\r\n\r\n").encode() + body
