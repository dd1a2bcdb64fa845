"""The synthetic study of Ma et al., KDD 2018 (MMoE), sections 3.2 and 5.2: Shared-Bottom vs OMoE
vs MMoE on two regression tasks whose relatedness is set by the cosine similarity rho of their
weight vectors (training/synthetic.py ``generate_mmoe``), at rho = 1.0, 0.9, 0.5 and 0.0.

Each seed is one data set (weight directions, sine terms, samples: data seed = run seed) that the
three models all train on, from the same initialisation seed, so they can be compared seed by
seed: how hard a seed's draw makes the tasks cancels out of the paired differences. For one seed
only w2 changes with rho (the generator draws u1, u2, the sines and x from the seed alone).

Every run is scored on the validation split every ``validate_every`` steps and stops after
``patience`` such points without a lower validation loss; ``max_epochs`` is only a budget, meant
to be out of reach (the share of runs that early stopping ended is reported). The test loss, the
mean of the two tasks' MSE (noise floor 0.01), is that of the best-validation checkpoint.
Reported: the training-loss curves against steps (the paper's Figure 4), the test loss per
correlation and model, and the paired differences MMoE - OMoE and MMoE - Shared-Bottom per seed.

    python -m bench.mmoe_synthetic [--seeds 10] [--quick]
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
CORRELATIONS = (1.0, 0.9, 0.5, 0.0)
MODELS = ("shared_bottom", "omoe", "mmoe")
BASELINES = ("omoe", "shared_bottom")  # MMoE's paired comparisons, in this order
LABELS = {"shared_bottom": "Shared-Bottom", "omoe": "OMoE", "mmoe": "MMoE"}
COLOURS = {"shared_bottom": "tab:blue", "omoe": "tab:orange", "mmoe": "tab:green"}


@dataclass(frozen=True)
class Sizes:
    samples: int  # generated rows; 80% train, 10% valid, 10% test
    batch_size: int
    lr: float  # Adam, constant
    validate_every: int  # steps between validation points: the curves' resolution
    patience: int  # validation points without a lower validation loss before stopping
    max_epochs: int  # a budget early stopping should reach first
    n_experts: int
    expert_units: int  # one hidden layer per expert, as in the paper
    bottom_units: int  # Shared-Bottom: one layer as wide as all experts together
    tower_units: int


FULL = Sizes(
    samples=20_000,
    batch_size=500,  # 32 steps per epoch; batch 250 took twice the epochs to a worse optimum
    lr=3e-3,
    validate_every=16,  # two points per epoch, the second at the epoch's end
    patience=20,  # 10 epochs
    max_epochs=400,  # the slowest probe stopped at epoch 186
    n_experts=8,
    expert_units=16,
    bottom_units=128,
    tower_units=8,
)
QUICK = Sizes(2_000, 100, 3e-3, 8, 3, 8, 4, 8, 32, 4)


@dataclass(frozen=True)
class Job:
    correlation: float
    seed: int
    model: str
    sizes: Sizes

    def __str__(self) -> str:
        return f"rho={self.correlation:g} seed={self.seed} {self.model}"


def data_dir(correlation: float, seed: int, samples: int) -> Path:
    return DATA / "mmoe" / f"rho{correlation:g}_seed{seed}_n{samples}"


def make_data(key: tuple[float, int, int]) -> float:
    """Generate (once) and encode one data set; returns its measured label correlation."""
    from training.data import prepare
    from training.synthetic import generate_mmoe

    correlation, seed, samples = key
    out = data_dir(correlation, seed, samples)
    if not (out / "meta.json").is_file():
        generate_mmoe(out, correlation, samples, seed)
    prepare(dataset(out), DATA / ".cache")
    return float(json.loads((out / "meta.json").read_text())["label_correlation"])


def dataset(directory: Path) -> Any:
    from training.config import load_dataset_spec

    ds = load_dataset_spec(CONFIGS / "mmoe_synthetic.dataset.yaml")
    return ds.model_copy(
        update={s: str(directory / f"{s}.parquet") for s in ("train", "valid", "test")}
    )


def ended_by_early_stopping(steps: Sequence[int], best_step: int, patience: int) -> bool:
    """The trainer stops once ``patience`` validation points in a row fail to beat the best one,
    so a run was stopped early exactly when that many points follow its best point."""
    return sum(s > best_step for s in steps) >= patience


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
            "epochs": s.max_epochs,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "seed": job.seed,
            "validation": {"every_steps": s.validate_every},
            "early_stopping": {"metric": "valid_loss", "patience": s.patience},
            "device": "cpu",
        },
    )
    out = Path(tempfile.mkdtemp(prefix="mmoe-bench-"))
    try:
        res = fit_and_test(cfg, out, DATA / ".cache")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    test, history = res["test"], res["history"]
    steps = [h["step"] for h in history]
    train_curve = [sum(h["train_loss"].values()) / 2.0 for h in history]  # mean of the 2 MSEs
    return {
        "correlation": job.correlation,
        "seed": job.seed,
        "model": job.model,
        "test_loss": (test["y1_rmse"] ** 2 + test["y2_rmse"] ** 2) / 2.0,
        "test_rmse": {"y1": test["y1_rmse"], "y2": test["y2_rmse"]},
        "steps": steps,
        "train_curve": train_curve,
        "valid_curve": [h["valid"]["valid_loss"] / 2.0 for h in history],
        "best_step": res["best_step"],
        "best_epoch": res["best_epoch"],
        "train_loss_at_best": train_curve[steps.index(res["best_step"])],
        "steps_run": steps[-1],
        "epochs_run": res["epochs_run"],
        "stopped_early": ended_by_early_stopping(steps, res["best_step"], s.patience),
        "train_seconds": res["train_seconds"],
    }


# ------------------------------------------------------------------ statistics
def _cell(runs: list[dict[str, Any]], rho: float, model: str) -> list[dict[str, Any]]:
    return sorted(
        (r for r in runs if r["correlation"] == rho and r["model"] == model),
        key=lambda r: r["seed"],
    )


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per correlation and model: test loss, training loss at the best point, where runs ended."""
    rows = []
    for rho in CORRELATIONS:
        for m in MODELS:
            mine = _cell(runs, rho, m)
            if mine:
                rows.append(
                    {"correlation": rho, "model": m}
                    | {"test_loss": summarise([r["test_loss"] for r in mine])}
                    | {"train_loss_at_best": summarise([r["train_loss_at_best"] for r in mine])}
                    | {"best_step": summarise([r["best_step"] for r in mine])}
                    | {"stopped_early": sum(r["stopped_early"] for r in mine), "runs": len(mine)}
                )
    return rows


def paired(runs: list[dict[str, Any]], metric: str = "test_loss") -> list[dict[str, Any]]:
    """Per correlation: MMoE's ``metric`` minus each baseline's, seed by seed (same data)."""
    rows = []
    for rho in CORRELATIONS:
        mmoe = {r["seed"]: r[metric] for r in _cell(runs, rho, "mmoe")}
        for base in BASELINES:
            other = {r["seed"]: r[metric] for r in _cell(runs, rho, base)}
            seeds = sorted(mmoe.keys() & other.keys())
            if not seeds:
                continue
            diffs = [mmoe[s] - other[s] for s in seeds]
            stats = summarise(diffs)
            rows.append(
                {"correlation": rho, "metric": metric, "baseline": base}
                | {"diffs": diffs, "seeds": seeds}
                | {"diff": stats, "se": stats["std"] / math.sqrt(len(diffs))}
                | {"mmoe_wins": sum(d < 0 for d in diffs)}
            )
    return rows


# ------------------------------------------------------------------ figure
def mean_curve(mine: list[dict[str, Any]], grid: Any) -> tuple[Any, Any]:
    """Mean and standard error over runs of the training loss at the ``grid`` steps. A run that
    stopped keeps its last value, so every point averages the same seeds."""
    import numpy as np

    curves = np.array([np.interp(grid, r["steps"], r["train_curve"]) for r in mine])  # (runs, G)
    se = curves.std(0, ddof=1) / np.sqrt(len(mine)) if len(mine) > 1 else np.zeros(len(grid))
    return curves.mean(0), se


def plot(
    runs: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    label_corr: dict[float, dict[str, float]],
    every: int,
    path: Path,
) -> None:
    """Top: training loss against steps (mean, +-1 SE band); bottom: paired test-loss deltas."""
    import numpy as np

    plt = plt_agg()
    n = len(CORRELATIONS)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.5), squeeze=False, sharey="row")
    for col, rho in enumerate(CORRELATIONS):
        top, bottom = axes[0, col], axes[1, col]
        last = max((r["steps_run"] for r in runs if r["correlation"] == rho), default=0)
        grid = np.arange(every, last + 1, every)
        for m in MODELS:
            mine = _cell(runs, rho, m)
            if not mine or len(grid) == 0:
                continue
            mean, se = mean_curve(mine, grid)
            top.plot(grid, mean, color=COLOURS[m], label=LABELS[m])
            top.fill_between(grid, mean - se, mean + se, color=COLOURS[m], alpha=0.25)
        top.set_title(f"rho {rho:g} (label correlation {label_corr[rho]['mean']:.2f})")
        top.set_xlabel("step")
        top.set_yscale("log")
        top.grid(alpha=0.3)
        mine_pairs = [p for p in pairs if p["correlation"] == rho]
        for k, p in enumerate(mine_pairs):
            d = np.asarray(p["diffs"])
            bottom.scatter(k + np.linspace(-0.15, 0.15, len(d)), d, color="grey", s=14)
            bottom.errorbar(k, d.mean(), yerr=2 * p["se"], color="black", capsize=6, marker="D")
        bottom.axhline(0.0, color="tab:red", lw=1)
        ticks = [f"MMoE - {LABELS[p['baseline']]}" for p in mine_pairs]
        bottom.set_xticks(range(len(ticks)), ticks)
        bottom.set_xlim(-0.6, len(ticks) - 0.4)
        bottom.grid(alpha=0.3, axis="y")
    axes[0, 0].set_ylabel("training loss (mean MSE of 2 tasks)")
    axes[1, 0].set_ylabel("test-loss difference per seed")
    axes[0, 0].legend()
    fig.suptitle(
        "MMoE synthetic study. Top: training loss, mean over seeds +-1 SE (a stopped run keeps "
        "its last value). Bottom: paired test-loss differences\n(dots: seeds; diamond: mean "
        "+-2 SE; below 0 = MMoE better)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ command line
def tables(
    rows: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    corr: dict[float, dict[str, float]],
) -> str:
    main_table = format_table(
        [
            "rho",
            "label corr",
            "model",
            "test loss mean",
            "std",
            "train loss at best",
            "best step (mean)",
            "stopped early",
        ],
        [
            [
                f"{r['correlation']:g}",
                "{mean:.2f} ({min:.2f}-{max:.2f})".format(**corr[r["correlation"]]),
                LABELS[r["model"]],
                r["test_loss"]["mean"],
                r["test_loss"]["std"],
                r["train_loss_at_best"]["mean"],
                f"{r['best_step']['mean']:.0f}",
                f"{r['stopped_early']}/{r['runs']}",
            ]
            for r in rows
        ],
    )
    pair_table = format_table(
        ["rho", "metric", "paired difference", "mean", "std", "SE", "MMoE better in"],
        [
            [
                f"{p['correlation']:g}",
                p["metric"],
                f"MMoE - {LABELS[p['baseline']]}",
                p["diff"]["mean"],
                p["diff"]["std"],
                p["se"],
                f"{p['mmoe_wins']}/{len(p['diffs'])} seeds",
            ]
            for p in pairs
        ],
    )
    return main_table + "\n\n" + pair_table


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    args = base_parser(__doc__.split("\n")[0], seeds=10).parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    seeds = list(range(args.seeds))
    json_path, png_path = output_paths(NAME, args)

    keys = [(rho, s, sizes.samples) for rho in CORRELATIONS for s in seeds]
    print(f"{NAME}: generating/encoding {len(keys)} data sets", flush=True)
    measured = dict(zip(keys, run_jobs(make_data, keys, args.workers), strict=True))
    label_corr = {
        rho: summarise([measured[rho, s, sizes.samples] for s in seeds]) for rho in CORRELATIONS
    }
    jobs = [Job(rho, s, m, sizes) for rho in CORRELATIONS for s in seeds for m in MODELS]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)

    rows, test_pairs = summary(runs), paired(runs)
    pairs = test_pairs + paired(runs, "train_loss_at_best")
    plot(runs, test_pairs, label_corr, sizes.validate_every, png_path)
    stopped = sum(r["stopped_early"] for r in runs)
    settings = asdict(sizes) | {"seeds": seeds, "correlations": list(CORRELATIONS)}
    settings |= {"workers": args.workers, "quick": args.quick}
    payload = {"settings": settings, "label_correlation": label_corr, "stopped_early": stopped}
    payload |= {"summary": rows, "paired": pairs, "runs": runs}
    write_result(json_path, NAME, argv, started, payload)
    print(tables(rows, pairs, label_corr))
    print(f"\nruns ended by early stopping: {stopped}/{len(runs)}", end="")
    budget = [str(Job(r["correlation"], r["seed"], r["model"], sizes)) for r in runs]
    budget = [b for b, r in zip(budget, runs, strict=True) if not r["stopped_early"]]
    print(f" (the epoch budget ended: {', '.join(budget)})" if budget else "")
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
