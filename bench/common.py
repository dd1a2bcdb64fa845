"""What every benchmark script shares: paths, one-thread worker processes, train-then-test,
summary statistics, result files and plain-text tables.

The machine these numbers come from has 2 cores shared with other people, so every worker
process runs torch with ONE thread and at most two workers run at a time; what a result was
measured under (workers, threads, load average, wall time) is written into its JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
IMAGES = REPO / "docs" / "img"
DATA = REPO / "data" / "bench"  # git-ignored: generated data and encoded caches
CONFIGS = REPO / "training" / "configs"
MAX_WORKERS = 2  # the machine has 2 cores
QUICK_RESULTS = Path(tempfile.gettempdir()) / "mtrank-bench-quick"

_J = TypeVar("_J")
_R = TypeVar("_R")


# ------------------------------------------------------------------ processes
def one_thread() -> None:
    """Pin this process to one intra-op and one inter-op torch thread (call before any work)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # raises once any inter-op work has started
        torch.set_num_interop_threads(1)


def run_jobs(
    fn: Callable[[_J], _R], jobs: Sequence[_J], workers: int, label: Callable[[_J], str] = str
) -> list[_R]:
    """``[fn(job) for job in jobs]`` in ``workers`` one-thread processes, results in job order.

    ``fn`` must be a module-level function (jobs travel to spawned processes by pickling).
    Progress goes to stdout as each job finishes, so a long run can be followed in its log.
    """
    workers = max(1, min(workers, MAX_WORKERS, len(jobs)))
    t0 = time.perf_counter()
    out: dict[int, _R] = {}
    ctx = mp.get_context("spawn")  # torch and fork do not mix well
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=one_thread) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            i = futures[fut]
            out[i] = fut.result()
            elapsed = time.perf_counter() - t0
            print(f"  [{len(out)}/{len(jobs)}] {label(jobs[i])}  ({elapsed:.0f}s)", flush=True)
    return [out[i] for i in range(len(jobs))]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow stderr (the trainer's tqdm bar) so worker logs stay readable."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


# ------------------------------------------------------------------ training
def fit_and_test(cfg: Any, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` (a TrainConfig), reload its best checkpoint, evaluate it on the test split.

    Returns the flat test metrics, the history of validation points (epoch, step, train losses,
    validation metrics), the best epoch and step and the wall time of training alone.
    """
    from training.checkpoint import load_checkpoint
    from training.data import prepare
    from training.evaluate import evaluate
    from training.train import train

    data = prepare(cfg.dataset, cache_dir)
    if data.test is None:
        raise ValueError(f"dataset {cfg.dataset.name!r} has no test split")
    t0 = time.perf_counter()
    with quiet():
        result = train(cfg, out_dir, data)
    train_seconds = time.perf_counter() - t0
    model, _, _, _ = load_checkpoint(result.best_checkpoint)
    report = evaluate(model, data.test, cfg.dataset.tasks, batch_size=8192)
    history = json.loads(result.history.read_text())
    return {
        "test": report["metrics"],
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "epochs_run": result.epochs_run,
        "train_seconds": train_seconds,
        "train_rows": len(data.train),
        "history": [
            {
                "epoch": h["epoch"],
                "step": h["step"],
                "train_loss": h["train_loss"],
                "valid": h["valid"],
            }
            for h in history
        ],  # fmt: skip
    }


# ------------------------------------------------------------------ statistics
def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min, max and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table (it reads as a plain table in a terminal too)."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "nan" if not math.isfinite(x) else f"{x:.4f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ results
def base_parser(description: str, seeds: int) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds 0..N-1 (default {seeds})")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a < 1 min smoke test")
    p.add_argument("--workers", type=int, default=MAX_WORKERS, help="parallel processes (<= 2)")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help=f"where JSON and PNG go (default bench/results + docs/img; {QUICK_RESULTS} "
        "with --quick, so a smoke test never overwrites committed results)",
    )
    return p


def output_paths(name: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """(JSON path, PNG path) for benchmark ``name`` under the chosen results folder."""
    if args.results_dir is not None:
        root = Path(args.results_dir)
        json_dir, img_dir = root, root
    elif args.quick:
        json_dir, img_dir = QUICK_RESULTS, QUICK_RESULTS
    else:
        json_dir, img_dir = RESULTS, IMAGES
    json_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    return json_dir / f"{name}.json", img_dir / f"{name}.png"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(
    path: Path, name: str, argv: Sequence[str], started: float, payload: dict[str, Any]
) -> Path:
    """Write ``payload`` with the command (module ``bench.name``), machine, load and wall time."""
    from training.reports import to_json

    record = {
        "benchmark": path.stem,
        "command": " ".join(["python -m", f"bench.{name}", *map(shlex.quote, argv)]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "torch_threads_per_process": 1,
        **payload,
    }
    path.write_text(json.dumps(to_json(record), indent=1, allow_nan=False) + "\n")
    return path


def plt_agg() -> Any:
    """matplotlib.pyplot on the Agg backend (no display on this machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def argv_of(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def make_config(base_yaml: Path, dataset: Any, overrides: dict[str, Any]) -> Any:
    """A validated TrainConfig: ``base_yaml`` with ``dataset`` swapped in and dotted overrides.

    Going through validation (not ``model_copy``) means a typo in a benchmark's settings fails
    exactly as it would in a config file.
    """
    from training.config import TrainConfig, load_train_config

    data = load_train_config(base_yaml).model_dump()
    data["dataset"] = dataset.model_dump()
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return TrainConfig.model_validate(data)
