"""UCI Census-Income (KDD) with the MMoE paper's first task pair: income > 50K and never married
(Ma et al., KDD 2018, section 6.3, the table of AUC best / mean over repeated runs).

The raw file ../shared/data/census-income/census-income.test.gz (99,762 people) is split
80/10/10 with a fixed seed by training.synthetic.split_census; every model is trained on the same
split with ``--seeds`` initialisations, early-stopped on the validation loss (the sum of both
tasks' losses, so no task is favoured), and its best checkpoint is scored on the test split.

    python -m bench.census [--seeds 10] [--quick]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CONFIGS,
    DATA,
    REPO,
    argv_of,
    base_parser,
    fit_and_test,
    format_table,
    make_config,
    output_paths,
    plt_agg,
    run_jobs,
    summarise,
    write_result,
)

NAME = "census"
SOURCE = REPO.parent / "shared" / "data" / "census-income" / "census-income.test.gz"
SPLIT_SEED = 0
TASKS = ("income", "marital")
MODELS = ("single_task", "shared_bottom", "omoe", "mmoe", "ple")
LABELS = {
    "single_task": "Single-Task",
    "shared_bottom": "Shared-Bottom",
    "omoe": "OMoE",
    "mmoe": "MMoE",
    "ple": "PLE",
}


@dataclass(frozen=True)
class Sizes:
    epochs: int
    batch_size: int
    lr: float
    embed_dim: int
    n_experts: int  # OMoE / MMoE
    expert_units: int  # one hidden layer per expert (PLE too)
    bottom_units: int  # Shared-Bottom: as wide as all MoE experts together
    single_units: int  # Single-Task: per task, half of that
    ple_specific: int
    ple_shared: int
    tower_units: int
    max_steps: int | None = None


FULL = Sizes(
    epochs=10,
    batch_size=1024,
    lr=1e-3,
    embed_dim=4,
    n_experts=8,
    expert_units=16,
    bottom_units=128,
    single_units=64,
    ple_specific=2,
    ple_shared=4,
    tower_units=8,
)
QUICK = Sizes(1, 1024, 1e-3, 4, 4, 8, 32, 16, 1, 2, 4, max_steps=15)


@dataclass(frozen=True)
class Job:
    seed: int
    model: str
    sizes: Sizes

    def __str__(self) -> str:
        return f"seed={self.seed} {self.model}"


def dataset() -> Any:
    from training.config import load_dataset_spec

    ds = load_dataset_spec(CONFIGS / "census_income.dataset.yaml")
    out = DATA / f"census_seed{SPLIT_SEED}"
    return ds.model_copy(update={s: str(out / f"{s}.parquet") for s in ("train", "valid", "test")})


def prepare_data() -> dict[str, Any]:
    """Split the raw file once (fixed seed) and encode it; returns the split's meta."""
    import json

    from training.data import prepare
    from training.synthetic import split_census

    out = DATA / f"census_seed{SPLIT_SEED}"
    if not (out / "meta.json").is_file():
        split_census(SOURCE, out, seed=SPLIT_SEED)
    prepare(dataset(), DATA / ".cache")
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return meta


def run_one(job: Job) -> dict[str, Any]:
    s = job.sizes
    bottom = s.single_units if job.model == "single_task" else s.bottom_units
    cfg = make_config(
        CONFIGS / "census_mmoe.yaml",
        dataset(),
        {
            "model.type": job.model,
            "model.embed_dim": s.embed_dim,
            "model.n_experts": s.n_experts,
            "model.expert_units": [s.expert_units],
            "model.bottom_units": [bottom],
            "model.tower_units": [s.tower_units],
            "model.ple_levels": 2,
            "model.ple_specific_experts": s.ple_specific,
            "model.ple_shared_experts": s.ple_shared,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "seed": job.seed,
            "max_steps": s.max_steps,
            "early_stopping": {"metric": "valid_loss", "patience": 3},
            "device": "cpu",
        },
    )
    out = Path(tempfile.mkdtemp(prefix="census-bench-"))
    try:
        res = fit_and_test(cfg, out, DATA / ".cache")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    test = res["test"]
    return {
        "seed": job.seed,
        "model": job.model,
        "auc": {t: test[f"{t}_auc"] for t in TASKS},
        "logloss": {t: test[f"{t}_logloss"] for t in TASKS},
        "best_epoch": res["best_epoch"],
        "epochs_run": res["epochs_run"],
        "train_seconds": res["train_seconds"],
    }


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in MODELS:
        mine = [r for r in runs if r["model"] == m]
        if mine:
            rows.append(
                {"model": m}
                | {f"{t}_auc": summarise([r["auc"][t] for r in mine]) for t in TASKS}
                | {"train_seconds": summarise([r["train_seconds"] for r in mine])}
            )
    return rows


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Test AUC of every seed per model and task (line: mean)."""
    import numpy as np

    plt = plt_agg()
    fig, axes = plt.subplots(1, len(TASKS), figsize=(11, 4))
    for ax, task in zip(axes, TASKS, strict=True):
        for k, m in enumerate(MODELS):
            vals = [r["auc"][task] for r in runs if r["model"] == m]
            if not vals:
                continue
            jitter = np.linspace(-0.15, 0.15, len(vals))
            ax.scatter(k + jitter, vals, s=18, color=f"C{k}")
            ax.hlines(np.mean(vals), k - 0.3, k + 0.3, color=f"C{k}")
        ax.set_xticks(range(len(MODELS)), [LABELS[m] for m in MODELS])
        ax.set_title(f"{task}: test AUC per seed (line: mean)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("UCI Census-Income: income > 50K and never married")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    args = base_parser(__doc__.split("\n")[0], seeds=10).parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    seeds = list(range(args.seeds))
    json_path, png_path = output_paths(NAME, args)

    meta = prepare_data()  # once, here: the workers only open the cache
    jobs = [Job(s, m, sizes) for s in seeds for m in MODELS]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)

    rows = summary(runs)
    plot(runs, png_path)
    settings = vars(sizes) | {"seeds": seeds, "split_seed": SPLIT_SEED, "workers": args.workers}
    settings |= {"quick": args.quick, "ple_levels": 2, "data": meta}
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    headers = ["model"]
    for t in TASKS:
        headers += [f"{t} AUC best", f"{t} AUC mean", f"{t} std"]
    table = []
    for r in rows:
        line: list[Any] = [LABELS[r["model"]]]
        for t in TASKS:
            a = r[f"{t}_auc"]
            line += [a["max"], a["mean"], a["std"]]
        table.append(line)
    print(format_table(headers, table))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
