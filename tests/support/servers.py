"""Real processes for reliability tests: a private redis-server, ``mtrank serve``, a load client.

Everything binds to 127.0.0.1 on a free port, and everything is bounded: servers start within a
deadline, and the load client stops at a request count or a duration, whichever comes first.

The load client is a raw asyncio HTTP/1.1 client with keep-alive connections. A library client
(httpx, aiohttp) would hide exactly what these tests look at: whether a connection was dropped,
whether a response arrived truncated, whether a request already sent got an answer. It records,
per request, when it was sent and answered, the status, a small summary of the body and any
connection error, so tests can ask questions about time windows ("every response after Redis came
back within 5 s is not degraded").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> float:
    """Poll ``check`` until it is true; returns the seconds it took, TimeoutError after."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s:.1f} s")
        time.sleep(interval_s)


# ------------------------------------------------------------------------------------ redis
class RedisProcess:
    """A throw-away ``redis-server`` on a free loopback port, with no persistence.

    ``--save ""`` and ``--appendonly no``: a killed server comes back empty, as a cache node
    without persistence does, so the tests (like an operator) reload the snapshot after a restart.
    ``kill()`` is SIGKILL (a crash, not a clean shutdown); ``start()`` again reuses the port.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="mtrank-rel-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        binary = shutil.which("redis-server") or "redis-server"
        args = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", ""]
        args += ["--appendonly", "no", "--dir", self._dir, "--protected-mode", "yes"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(host=LOOPBACK, port=self.port, socket_connect_timeout=0.2)
        try:
            wait_until(lambda: _pings(probe), timeout_s, 0.02)
        except TimeoutError:
            self.kill()
            raise
        finally:
            probe.close()
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, its data with it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, **kw)

    def pause_clients(self, ms: int) -> None:
        """``CLIENT PAUSE ms ALL``: every client's commands wait ``ms`` (a slow, stuck Redis)."""
        client = self.client()
        try:
            client.execute_command("CLIENT", "PAUSE", str(ms), "ALL")  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


# ------------------------------------------------------------------------------------ service
def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET; 4xx/5xx are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def http_post(
    url: str, body: bytes, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0
) -> tuple[int, bytes]:
    hdrs = {"content-type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=body, headers=hdrs, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0.0 when none)."""
    want = labels or {}
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, raw_labels = head.partition("{")
        if metric != name:
            continue
        found = dict(_split_labels(raw_labels.rstrip("}")))
        if all(found.get(k) == v for k, v in want.items()):
            total += float(value)
    return total


def _split_labels(raw: str) -> Iterator[tuple[str, str]]:
    for part in raw.split('",'):
        key, sep, value = part.partition('="')
        if sep:
            yield key.strip(), value.rstrip('"')


class ServiceProcess:
    """``mtrank serve --host 127.0.0.1 --port P --workers W`` as a subprocess.

    ``env`` holds ``MTRANK_*`` settings; the rest of the environment is inherited. stdout and
    stderr go to a log file (``log_text()``) so tests can check what was logged.
    """

    def __init__(self, env: Mapping[str, str], workers: int = 2, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workers = workers
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self._env = dict(env)
        self._dir = Path(tempfile.mkdtemp(prefix="mtrank-rel-serve-"))
        self.log_path = self._dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0, require_ready: bool = True) -> ServiceProcess:
        """Start and wait until every worker answers (``/readyz`` 200, or any answer)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(self._env)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "mtrank.cli", "serve", "--host", LOOPBACK]
        cmd += ["--port", str(self.port), "--workers", str(self.workers), "--log-level", "info"]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"mtrank serve exited during start-up:\n{self.log_text()}")
            try:
                status, _ = http_get(self.base_url + "/readyz", timeout_s=1.0)
            except OSError:
                return False
            return status == 200 or not require_ready

        try:
            wait_until(up, timeout_s, 0.1)
            # Both workers share the socket: wait until each has logged that it is ready.
            wait_until(lambda: self.log_text().count("mtrank ready") >= self.workers, 30, 0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes (children started with multiprocessing's spawn)."""
        if self.proc is None:
            return []
        if self.workers == 1:
            return [self.proc.pid]
        pids = []
        for child in _children(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(child)
        return pids

    def metrics(self) -> str:
        status, body = http_get(self.base_url + "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body.decode()

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc is None:
            return None
        rc: int | None = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                rc = self.proc.wait(timeout=10)
        self.proc = None
        return rc

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------------------------ load
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
) -> LoadResult:
    """Closed-loop load: ``concurrency`` keep-alive connections, each one request at a time.

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
