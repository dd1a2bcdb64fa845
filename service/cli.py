"""``mtrank serve``: run the ranking service under uvicorn.

Settings come from ``MTRANK_*`` (see service/settings.py); ``--host/--port/--workers`` override
them and are passed to every worker through the environment. uvicorn runs in factory mode, so
each worker builds its own app (its own ORT session, store connections and metrics). With
several workers, Prometheus metrics switch to multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a
fresh temporary directory unless set) and ``/metrics`` aggregates every worker. One ONNX Runtime
intra-op thread per worker is the recommended setting: the workers already use the cores.
uvicorn's ``auto`` loop and HTTP choices pick uvloop and httptools when they are installed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from typing import Any

import orjson

from mtrank.registry import Registry, RegistryError
from mtrank.snapshot import Snapshot
from mtrank.spec import FeatureSpec
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtrank serve", description="run the ranking service")
    p.add_argument("--host", help="bind address (MTRANK_HOST)")
    p.add_argument("--port", type=int, help="port (MTRANK_PORT)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (MTRANK_WORKERS)")
    p.add_argument("--log-level", help="critical|error|warning|info|debug (MTRANK_LOG_LEVEL)")
    return p


def example_ids(settings: Settings) -> tuple[str, list[str]] | None:
    """A real user id and item ids from the served model's snapshot, for the example request."""
    try:
        name = settings.model_names[0]
        spec = FeatureSpec.load(Registry(settings.model_dir).resolve(name).path)
        path = settings.snapshot_path or Registry(settings.model_dir).latest_snapshot(
            name, spec.sha256()
        )
        if path is None:
            return None
        snap = Snapshot.load(path, spec)
    except (RegistryError, OSError, ValueError):
        return None
    if len(snap.user_ids) == 0 or len(snap.item_ids) == 0:
        return None
    return str(snap.user_ids[0]), [str(i) for i in snap.item_ids[:5]]


def example_curl(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/rank"
    ids = example_ids(settings) or ("some-user", ["item-1", "item-2", "item-3"])
    body: dict[str, Any] = {
        "user_id": ids[0],
        "candidates": [{"item_id": i} for i in ids[1]],
        "size": 3,
        "explain": False,
    }
    payload = orjson.dumps(body).decode()
    return f"curl -s -X POST {url} -H 'content-type: application/json' -d {shlex.quote(payload)}"


def example_recommend_curl(settings: Settings) -> str:
    """``POST /recommend`` for the example user (recall, then the /rank path)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}/recommend"
    ids = example_ids(settings)
    payload = orjson.dumps({"user_id": ids[0] if ids else "some-user", "size": 5}).decode()
    return f"curl -s -X POST {url} -H 'content-type: application/json' -d {shlex.quote(payload)}"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "workers": args.workers,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        sys.stderr.write(f"mtrank serve: {e}\n")
        return 2
    # Workers re-read settings from the environment: hand the command-line overrides on.
    for key, value in overrides.items():
        os.environ[ENV_PREFIX + key.upper()] = str(value)
    made_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made_dir = tempfile.mkdtemp(prefix="mtrank-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made_dir
    if settings.workers > 1 and settings.ort_intra_threads != 1:
        sys.stderr.write(
            f"mtrank serve: {settings.workers} workers with MTRANK_ORT_INTRA_THREADS="
            f"{settings.ort_intra_threads}: 1 per worker is recommended\n"
        )
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    examples = [example_curl(settings)]
    if settings.recall_model is not None:
        examples.append(example_recommend_curl(settings))
    served = settings.model_names + ([settings.recall_model] if settings.recall_model else [])
    sys.stdout.write(
        f"mtrank: serving {served} on http://{host}:{settings.port} "
        f"({settings.workers} worker(s)); docs at http://{host}:{settings.port}/docs\n"
        "try:\n" + "".join(f"  {line}\n" for line in examples)
    )
    sys.stdout.flush()
    import uvicorn

    try:
        uvicorn.run(
            "service.app:app_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            loop="auto",
            http="auto",
            access_log=False,  # one log line per request costs more than the ranking at p99
        )
    finally:
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)
    return 0
