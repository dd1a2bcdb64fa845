"""A real Prometheus server for live tests of the dashboard queries and alert rules.

``promtool`` proves an expression parses; only a Prometheus that scrapes the real service proves
it returns data. :class:`PrometheusProcess` runs the ``prometheus`` binary on a free loopback
port with its own config and TSDB in a temporary directory (nothing shared with a system
Prometheus on :9090), and :class:`PromAPI` reads its HTTP API (``/api/v1/query``, ``/rules``,
``/targets``). Everything is bounded: start-up within a deadline, every HTTP call with a timeout,
and ``stop()`` escalates from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from harness.processes import LOOPBACK, LoggedProcess, free_port


class PrometheusError(RuntimeError):
    """The Prometheus API answered with an error status (a bad query, a server problem)."""


def scrape_config(
    targets: Mapping[str, Sequence[str]],
    rule_files: Sequence[Path],
    interval_s: float = 1.0,
    job: str = "mtrank",
) -> dict[str, Any]:
    """A Prometheus config scraping ``targets`` (``role`` label -> host:port list) as ``job``.

    Each role becomes its own static group with a ``role`` label, so a test can tell, say, the
    healthy replica from the degraded one without depending on port numbers. Rule files are
    given as absolute paths: the rules under test are read where they live in the repository.
    """
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "scrape_timeout": interval,
                "static_configs": [
                    {"targets": list(hosts), "labels": {"role": role}}
                    for role, hosts in targets.items()
                ],
            }
        ],
    }


class PromAPI:
    """The few calls of the Prometheus HTTP API the tests need; errors raise PrometheusError."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as r:  # noqa: S310 - loopback
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 / 422 carry a JSON error body
            doc = json.loads(e.read() or b"{}")
        if doc.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params or {})}: {doc.get('error', doc)}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query at "now": the result vector (``[]`` when nothing matches).

        Only vectors are expected from the expressions under test; a scalar or string result
        raises, so an expression that stopped being a vector does not pass unnoticed.
        """
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r}: expected a vector, got {data['resultType']}")
        return list(data["result"])

    def values_between(
        self, expr: str, start: float, end: float, step_s: float = 1.0
    ) -> list[float]:
        """Every value of ``expr`` evaluated each ``step_s`` from ``start`` to ``end`` (unix s),
        over all result series, NaN included (a range query)."""
        params = {
            "query": expr,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{step_s:g}",
        }
        data = self._get("/api/v1/query_range", params)
        return [float(v) for series in data["result"] for _, v in series["values"]]

    def series_count(self, name: str) -> int:
        """Series Prometheus holds right now for the metric ``name`` (exact series name)."""
        result = self.query(f'count({{__name__="{name}"}})')
        return int(float(result[0]["value"][1])) if result else 0

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/rules")["groups"])

    def active_targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets", {"state": "active"})["activeTargets"])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/-/ready", timeout=1.0) as r:  # noqa: S310
                return int(r.status) == 200
        except (OSError, urllib.error.URLError):
            return False


class PrometheusProcess(LoggedProcess):
    """``prometheus`` on a free 127.0.0.1 port with a private config and data directory.

    Usage: ``with PrometheusProcess(config) as prom: prom.api.query(...)``. The config is the
    dict of :func:`scrape_config` (or any valid config); it is checked by Prometheus itself at
    start, so a bad one fails start-up with the server's own message.
    """

    proc_name = "prometheus"

    def __init__(self, config: Mapping[str, Any], port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.api = PromAPI(self.base_url)
        self._dir = Path(tempfile.mkdtemp(prefix="mtrank-prom-"))
        self.config_path = self._dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        self.log_path = self._dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> PrometheusProcess:
        binary = shutil.which("prometheus")
        if binary is None:  # a missing tool fails the test: CI installs it (Debian `prometheus`)
            raise RuntimeError("`prometheus` not on PATH: install the Debian package `prometheus`")
        cmd = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self._dir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--log.level=warn",
        ]
        self._spawn(cmd)
        self._wait_ready(self.api.ready, timeout_s)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Prometheus flushes its head block), SIGKILL if it takes too long."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> PrometheusProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
