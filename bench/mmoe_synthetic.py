"""The synthetic study of Ma et al., KDD 2018 (MMoE), section 3: Shared-Bottom vs OMoE vs MMoE
on two regression tasks whose relatedness is set by the cosine similarity rho of their weight
vectors (training/synthetic.py ``generate_mmoe``), at rho = 1.0, 0.9 and 0.5.

Each seed draws new data (new weight vectors, sines and samples) and a new initialisation, as the
paper's repeated runs do. We report the training-loss curves (mean and min-max band over seeds,
like the paper's Figure 4) and the final test loss: the mean of the two tasks' MSE of the
checkpoint with the best validation loss.

    python -m bench.mmoe_synthetic [--seeds 5] [--quick]
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

NAME = "mmoe_synthetic"
CORRELATIONS = (1.0, 0.9, 0.5)
MODELS = ("shared_bottom", "omoe", "mmoe")
LABELS = {"shared_bottom": "Shared-Bottom", "omoe": "OMoE", "mmoe": "MMoE"}
COLOURS = {"shared_bottom": "tab:blue", "omoe": "tab:orange", "mmoe": "tab:green"}


@dataclass(frozen=True)
class Sizes:
    samples: int  # generated rows; 80% train, 10% valid, 10% test
    epochs: int
    batch_size: int
    lr: float
    n_experts: int
    expert_units: int  # one hidden layer per expert, as in the paper
    bottom_units: int  # Shared-Bottom: one layer as wide as all experts together
    tower_units: int


FULL = Sizes(
    samples=20_000,
    epochs=20,
    batch_size=128,
    lr=2e-3,
    n_experts=8,
    expert_units=16,
    bottom_units=128,
    tower_units=8,
)
QUICK = Sizes(2_000, 2, 128, 2e-3, 4, 8, 32, 4)


@dataclass(frozen=True)
class Job:
    correlation: float
    seed: int
    model: str
    sizes: Sizes

    def __str__(self) -> str:
        return f"rho={self.correlation} seed={self.seed} {self.model}"


def data_dir(correlation: float, seed: int, samples: int) -> Path:
    return DATA / "mmoe" / f"rho{correlation:g}_seed{seed}_n{samples}"


def make_data(key: tuple[float, int, int]) -> str:
    """Generate (once) and encode one data set; runs in a worker."""
    from training.data import prepare
    from training.synthetic import generate_mmoe

    correlation, seed, samples = key
    out = data_dir(correlation, seed, samples)
    if not (out / "meta.json").is_file():
        generate_mmoe(out, correlation, samples, seed)
    prepare(dataset(out), DATA / ".cache")
    return str(out)


def dataset(directory: Path) -> Any:
    from training.config import load_dataset_spec

    ds = load_dataset_spec(CONFIGS / "mmoe_synthetic.dataset.yaml")
    return ds.model_copy(
        update={s: str(directory / f"{s}.parquet") for s in ("train", "valid", "test")}
    )


def run_one(job: Job) -> dict[str, Any]:
    """Train one model on one (rho, seed) data set; runs in a worker."""
    s = job.sizes
    ds = dataset(data_dir(job.correlation, job.seed, s.samples))
    cfg = make_config(
        CONFIGS / "mmoe_synthetic.yaml",
        ds,
        {
            "model.type": job.model,
            "model.n_experts": s.n_experts,
            "model.expert_units": [s.expert_units],
            "model.bottom_units": [s.bottom_units],
            "model.tower_units": [s.tower_units],
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "seed": job.seed,
            # the curves must cover every epoch: patience as long as the run
            "early_stopping": {"metric": "valid_loss", "patience": s.epochs},
            "device": "cpu",
        },
    )
    out = Path(tempfile.mkdtemp(prefix="mmoe-bench-"))
    try:
        res = fit_and_test(cfg, out, DATA / ".cache")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    test = res["test"]
    return {
        "correlation": job.correlation,
        "seed": job.seed,
        "model": job.model,
        "test_loss": (test["y1_rmse"] ** 2 + test["y2_rmse"] ** 2) / 2.0,
        "test_rmse": {"y1": test["y1_rmse"], "y2": test["y2_rmse"]},
        "train_curve": [sum(h["train_loss"].values()) / 2.0 for h in res["history"]],
        "best_epoch": res["best_epoch"],
        "train_seconds": res["train_seconds"],
    }


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rho in CORRELATIONS:
        for m in MODELS:
            mine = [r for r in runs if r["correlation"] == rho and r["model"] == m]
            if mine:
                rows.append(
                    {"correlation": rho, "model": m}
                    | {"test_loss": summarise([r["test_loss"] for r in mine])}
                    | {"final_train_loss": summarise([r["train_curve"][-1] for r in mine])}
                )
    return rows


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Top: training loss per epoch (mean, min-max band); bottom: test loss of every seed."""
    import numpy as np

    plt = plt_agg()
    fig, axes = plt.subplots(2, len(CORRELATIONS), figsize=(4.2 * len(CORRELATIONS), 7))
    for col, rho in enumerate(CORRELATIONS):
        top, bottom = axes[0, col], axes[1, col]
        for k, m in enumerate(MODELS):
            mine = [r for r in runs if r["correlation"] == rho and r["model"] == m]
            if not mine:
                continue
            n = min(len(r["train_curve"]) for r in mine)
            curves = np.array([r["train_curve"][:n] for r in mine])  # (seeds, epochs)
            x = np.arange(1, n + 1)
            top.plot(x, curves.mean(0), color=COLOURS[m], label=LABELS[m])
            top.fill_between(x, curves.min(0), curves.max(0), color=COLOURS[m], alpha=0.2)
            losses = [r["test_loss"] for r in mine]
            jitter = np.linspace(-0.15, 0.15, len(losses))
            bottom.scatter(k + jitter, losses, color=COLOURS[m], s=18)
            bottom.hlines(np.mean(losses), k - 0.3, k + 0.3, color=COLOURS[m])
        top.set_title(f"task correlation {rho:g}")
        top.set_xlabel("epoch")
        top.set_ylabel("training loss (mean MSE of 2 tasks)")
        top.set_yscale("log")
        top.grid(alpha=0.3)
        bottom.set_xticks(range(len(MODELS)), [LABELS[m] for m in MODELS])
        bottom.set_ylabel("test loss per seed (line: mean)")
        bottom.grid(alpha=0.3, axis="y")
    axes[0, 0].legend()
    fig.suptitle("MMoE synthetic study: Shared-Bottom vs OMoE vs MMoE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    args = base_parser(__doc__.split("\n")[0], seeds=5).parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    seeds = list(range(args.seeds))
    json_path, png_path = output_paths(NAME, args)

    keys = [(rho, s, sizes.samples) for rho in CORRELATIONS for s in seeds]
    print(f"{NAME}: generating/encoding {len(keys)} data sets", flush=True)
    run_jobs(make_data, keys, args.workers)
    jobs = [Job(rho, s, m, sizes) for rho in CORRELATIONS for s in seeds for m in MODELS]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)

    rows = summary(runs)
    plot(runs, png_path)
    settings = vars(sizes) | {"seeds": seeds, "correlations": list(CORRELATIONS)}
    settings |= {"workers": args.workers, "quick": args.quick}
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    print(
        format_table(
            ["rho", "model", "test loss mean", "std", "min", "max", "final train loss"],
            [
                [
                    r["correlation"],
                    LABELS[r["model"]],
                    r["test_loss"]["mean"],
                    r["test_loss"]["std"],
                    r["test_loss"]["min"],
                    r["test_loss"]["max"],
                    r["final_train_loss"]["mean"],
                ]
                for r in rows
            ],
        )
    )
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
