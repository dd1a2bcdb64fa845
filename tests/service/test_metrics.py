"""Metrics the alerts read: counters exist at 0 before their first event, model info carries the
provider in use, and the snapshot age is right in one process and across worker processes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import service
from service.metrics import DEGRADED_REASONS, Metrics

ROOT = Path(__file__).resolve().parents[2]
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def test_degraded_reasons_list_every_reason_the_service_emits() -> None:
    root = Path(service.__file__).parent
    emitted = {
        m
        for path in root.rglob("*.py")
        for m in re.findall(r'degraded\.append\("([a-z_]+)"\)', path.read_text())
    }
    assert emitted == set(DEGRADED_REASONS)


@pytest.mark.parametrize(
    "series",
    [f'mtrank_degraded_responses_total{{reason="{r}"}} 0.0' for r in DEGRADED_REASONS]
    + [f'mtrank_model_reloads_total{{result="{r}"}} 0.0' for r in ("success", "failure")],
)
def test_alerted_counters_start_at_zero(series: str) -> None:
    # A counter series born at 1 makes increase() miss its first event, and the alert with it.
    text = Metrics().exposition()[0].decode()
    assert series in text


def sample(text: str, series: str) -> float:
    """The value of one exact series line of the text format."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, flags=re.M)
    assert match, f"{series} not in\n{text}"
    return float(match.group(1))


def test_model_info_marks_the_served_series_and_zeroes_the_replaced_ones() -> None:
    m = Metrics()
    m.set_models({"a": "v1", "b": "v1"}, {"a": CUDA, "b": CUDA})
    m.set_models({"a": "v2", "b": "v1"}, {"a": CUDA, "b": CPU})  # b's CUDA did not start this time

    def info(name: str, version: str, provider: str) -> float | None:
        labels = {"name": name, "version": version, "provider": provider}
        return m.registry.get_sample_value("mtrank_model_info", labels)

    assert info("a", "v2", CUDA) == 1.0 and info("b", "v1", CPU) == 1.0
    assert info("a", "v1", CUDA) == 0.0 and info("b", "v1", CUDA) == 0.0


def test_snapshot_age_is_computed_when_scraped() -> None:
    m = Metrics()
    text = m.exposition()[0].decode()
    assert sample(text, "mtrank_feature_snapshot_age_seconds") == 0.0  # no snapshot known
    built: list[float | None] = [None]
    m.track_snapshot(lambda: built[0], max_age_s=7200.0)
    assert sample(m.exposition()[0].decode(), "mtrank_feature_snapshot_age_seconds") == 0.0
    built[0] = at = time.time() - 3600.0
    text = m.exposition()[0].decode()
    assert 3600.0 <= sample(text, "mtrank_feature_snapshot_age_seconds") < 3660.0
    assert sample(text, "mtrank_feature_snapshot_max_age_seconds") == 7200.0
    m.update_snapshot_age(now=at + 10.0)
    assert age(m) == 10.0
    m.update_snapshot_age(now=at - 5.0)  # a clock behind the builder's is not negative
    assert age(m) == 0.0


def age(m: Metrics) -> float | None:
    """The gauge as last written (collect() does not update it, exposition() does)."""
    return m.registry.get_sample_value("mtrank_feature_snapshot_age_seconds")


def test_every_worker_keeps_its_age_current_without_a_scrape() -> None:
    m = Metrics()
    built = [time.time() - 100.0]
    m.track_snapshot(lambda: built[0], max_age_s=3600.0)

    async def go() -> float | None:
        task = asyncio.create_task(m.keep_snapshot_age(interval_s=0.01))
        built[0] -= 1000.0  # e.g. the store switched to an older snapshot
        await asyncio.sleep(0.1)
        task.cancel()
        return age(m)

    assert (asyncio.run(go()) or 0.0) >= 1100.0


WORKER = """
import sys
from service.metrics import Metrics
m = Metrics()
if sys.argv[1] == "read":
    sys.stdout.write(m.exposition()[0].decode())
else:
    m.track_snapshot(lambda: None if sys.argv[1] == "none" else float(sys.argv[1]), 7200.0)
"""


def test_several_workers_report_the_oldest_snapshot_any_of_them_serves(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)

    def worker(arg: str) -> str:
        cmd = [sys.executable, "-c", WORKER, arg]
        done = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
        return done.stdout

    now = time.time()
    for arg in (str(now - 100.0), str(now - 5000.0), "none"):  # fresh, old, not resolved yet
        worker(arg)
    text = worker("read")  # a fourth worker answers the scrape
    assert 5000.0 <= sample(text, "mtrank_feature_snapshot_age_seconds") < 5060.0
    assert sample(text, "mtrank_feature_snapshot_max_age_seconds") == 7200.0
