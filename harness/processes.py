"""Real processes on loopback: a private ``redis-server``, ``mtrank serve``, and their probes.

Everything binds to 127.0.0.1 on a free port, and everything is bounded: servers start within a
deadline and stop with SIGTERM, then SIGKILL. The reliability tests start whole stacks of these
(:mod:`harness.stack`); the sizing and soak benchmarks measure them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
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

    @contextlib.contextmanager
    def writes_refused(self) -> Iterator[None]:
        """Redis out of memory under ``noeviction`` (its default): reads work, writes fail."""
        conn = self.client()
        conn.config_set("maxmemory", 1)
        try:
            yield
        finally:
            conn.config_set("maxmemory", 0)
            conn.close()

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


class LoggedProcess:
    """A server process whose stdout and stderr go to ``log_path``, started within a deadline.

    Subclasses set ``log_path`` and ``proc`` in ``__init__``, start with :meth:`_spawn` and
    :meth:`_wait_ready`, and say how to :meth:`stop`.
    """

    proc_name = "process"  # for the start-up error
    log_path: Path
    proc: subprocess.Popen[bytes] | None

    def _spawn(self, cmd: list[str], **popen: Any) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)

    def _wait_ready(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Poll ``ready``; if the process exits first or time runs out, stop it and raise."""

        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc_name} exited during start-up:\n{self.log_text()}")
            return ready()

        try:
            wait_until(up, timeout_s, 0.1)
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> int | None:
        raise NotImplementedError


class ServiceProcess(LoggedProcess):
    """``mtrank serve --host 127.0.0.1 --port P --workers W`` as a subprocess.

    ``env`` holds ``MTRANK_*`` settings; the rest of the environment is inherited. stdout and
    stderr go to a log file (``log_text()``) so tests can check what was logged.
    """

    proc_name = "mtrank serve"

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
        self._spawn(cmd, cwd=REPO_ROOT, env=env)

        def ready() -> bool:
            try:
                status, _ = http_get(self.base_url + "/readyz", timeout_s=1.0)
            except OSError:
                return False
            # Both workers share the socket: each must also have logged that it is ready.
            workers_ready = self.log_text().count("mtrank ready") >= self.workers
            return (status == 200 or not require_ready) and workers_ready

        self._wait_ready(ready, timeout_s)
        return self

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
