"""Training from step one: the README's MMoE config on small data, before and after the start-up
settings of TrainConfig (output-bias initialisation, embedding penalty and optimiser, schedule).

Each job trains ``training/configs/ecommerce_mmoe.yaml`` (or ``census_mmoe.yaml`` with
``--data census``) on a data set of seed s with model seed s, validating every ``K`` steps with a
patience that never stops it. Validation has no side effect on training, so the points at the
end of each epoch are exactly what the config's own per-epoch validation sees. Reported per
variant, over seeds:

- the first epoch's validation AUC of the first task (CTR);
- the lowest AUC of any binary task over the epoch-end points and over all points;
- each binary task's test AUC for the model restored to the best point (``valid_loss``);
- the standard error of an AUC of 0.5 on the validation split (Hanley & McNeil, Radiology 1982),
  per task: the conditional tasks are judged on a few hundred clicked rows, so their AUC at one
  point is noisy.

    python -m bench.train_start [--seeds 3] [--quick] [--data ecommerce|census]
        [--impressions 100000] [--every 5] [--variants before,after,...]
"""

from __future__ import annotations

import json
import math
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
    format_table,
    make_config,
    output_paths,
    quiet,
    run_jobs,
    summarise,
    write_result,
)

NAME = "train_start"
DEFAULT_SEEDS = 3
# label -> overrides of the base config (on top of the TrainConfig defaults)
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"init_output_bias": False},
    "after": {},
    "freq_reg_0.1": {"embedding_regularization": {"type": "frequency", "weight": 0.1}},
    "freq_reg_1": {"embedding_regularization": {"type": "frequency", "weight": 1.0}},
    "freq_reg_10": {"embedding_regularization": {"type": "frequency", "weight": 10.0}},
    "emb_adam_lr_0.01": {"embedding_optimizer": {"type": "adam", "lr": 0.01}},
    "sparse_adam": {"embedding_optimizer": {"type": "sparse_adam"}},
    "adagrad_lr_0.01": {"embedding_optimizer": {"type": "adagrad", "lr": 0.01}},
    "warmup_20": {"lr_schedule": {"warmup_steps": 20}},
    "cosine": {"lr_schedule": {"decay": "cosine", "min_lr_ratio": 0.1}},
    "avg_0.99": {"weight_averaging": {"decay": 0.99}},
    "avg_0.999": {"weight_averaging": {"decay": 0.999}},
    "id_dropout_0.02": {"id_dropout": {"user_id": 0.02, "item_id": 0.02}},  # ecommerce only
}
BASE = {"ecommerce": "ecommerce_mmoe.yaml", "census": "census_mmoe.yaml"}


@dataclass(frozen=True)
class Job:
    seed: int
    variant: str
    data: str
    impressions: int
    every: int
    max_steps: int | None

    def __str__(self) -> str:
        return f"seed={self.seed} {self.variant}"


def data_dir(job: Job) -> Path:
    if job.data == "census":
        return DATA / f"census_seed{job.seed}"
    return DATA / f"ecommerce_n{job.impressions}_seed{job.seed}"


def dataset(job: Job) -> Any:
    from training.config import load_dataset_spec

    name = "census_income" if job.data == "census" else "ecommerce"
    ds = load_dataset_spec(CONFIGS / f"{name}.dataset.yaml")
    out = data_dir(job)
    return ds.model_copy(update={s: str(out / f"{s}.parquet") for s in ("train", "valid", "test")})


def prepare_data(job: Job) -> None:
    from training.data import prepare
    from training.synthetic import DEFAULT_CENSUS, generate_ecommerce, split_census

    out = data_dir(job)
    if not (out / "meta.json").is_file():
        if job.data == "census":
            split_census(DEFAULT_CENSUS, out, seed=job.seed)
        else:
            generate_ecommerce(out, job.impressions, job.seed)
    prepare(dataset(job), DATA / ".cache")


def chance_se(n_pos: float, n_neg: float) -> float:
    """Standard error of an AUC of 0.5 with these class sizes (Hanley & McNeil 1982)."""
    a, q1, q2 = 0.5, 0.5 / 1.5, 2 * 0.25 / 1.5
    var = a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)
    return math.sqrt(var / max(n_pos * n_neg, 1.0))


def run_one(job: Job) -> dict[str, Any]:
    import numpy as np

    from training.data import prepare
    from training.evaluate import evaluate
    from training.train import train

    ds = dataset(job)
    cfg = make_config(
        CONFIGS / BASE[job.data],
        ds,
        {
            **VARIANTS[job.variant],
            "seed": job.seed,
            "device": "cpu",
            "max_steps": job.max_steps,
            "validation": {"every_steps": job.every},
            "early_stopping": {"metric": "valid_loss", "patience": 10_000},
        },
    )
    data = prepare(cfg.dataset, DATA / ".cache")
    binary = [t for t in cfg.dataset.tasks if t.kind == "binary"]
    out = Path(tempfile.mkdtemp(prefix="train-start-bench-"))
    t0 = time.perf_counter()
    try:
        with quiet():
            result = train(cfg, out, data)
        seconds = time.perf_counter() - t0
        history = json.loads(result.history.read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if data.test is None or data.valid is None:
        raise ValueError(f"{cfg.dataset.name}: needs valid and test splits")
    test = evaluate(result.model, data.test, cfg.dataset.tasks)["metrics"]
    se = {}
    for t in binary:  # on the rows each task is judged on (parent-positive for conditional)
        y = np.asarray(data.valid.labels[t.name])
        if t.depends_on is not None:
            y = y[np.asarray(data.valid.labels[t.depends_on]) >= 0.5]
        se[t.name] = chance_se(float(y.sum()), float(len(y) - y.sum()))
    points = [
        {"epoch": h["epoch"], "step": h["step"], "epoch_end": h["epoch_end"]}
        | {t.name: h["valid"][f"{t.name}_auc"] for t in binary}
        for h in history
    ]
    ends = [p for p in points if p["epoch_end"]]
    first = binary[0].name
    return {
        "seed": job.seed,
        "variant": job.variant,
        "epoch1_auc": ends[0][first],
        "min_auc_epoch_ends": min(p[t.name] for p in ends for t in binary),
        "min_auc_all_points": min(p[t.name] for p in points for t in binary),
        "test_auc": {t.name: test[f"{t.name}_auc"] for t in binary},
        "chance_se_valid": se,
        "best_step": result.best_step,
        "train_seconds": seconds,
        "points": points,
    }


def summary(runs: list[dict[str, Any]], variants: list[str], tasks: list[str]) -> list[Any]:
    rows = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        rows.append(
            {"variant": v, "overrides": VARIANTS[v]}
            | {k: summarise([r[k] for r in mine]) for k in ("epoch1_auc", "train_seconds")}
            | {k: summarise([r[k] for r in mine]) for k in ("min_auc_epoch_ends",)}
            | {"min_auc_all_points": summarise([r["min_auc_all_points"] for r in mine])}
            | {"test_auc": {t: summarise([r["test_auc"][t] for r in mine]) for t in tasks}}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=DEFAULT_SEEDS)
    p.set_defaults(workers=1)
    p.add_argument("--data", choices=sorted(BASE), default="ecommerce")
    p.add_argument("--impressions", type=int, default=100_000, help="ecommerce only")
    p.add_argument("--every", type=int, default=5, help="validate every K steps")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated labels")
    args = p.parse_args(argv)
    started = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    impressions = 20_000 if args.quick else args.impressions
    max_steps = 12 if args.quick else None
    seeds = list(range(args.seeds))
    jobs = [
        Job(s, v, args.data, impressions, args.every, max_steps) for s in seeds for v in variants
    ]
    for s in seeds:
        prepare_data(jobs[s * len(variants)])
    if args.data == "census":
        suffix = "_census"
    else:
        suffix = "" if impressions == 100_000 or args.quick else f"_n{impressions}"
    if args.seeds != DEFAULT_SEEDS and not args.quick:  # another table: its own result file
        suffix += f"_seeds{args.seeds}"
    json_path, _ = output_paths(NAME + suffix, args)
    print(f"{NAME}: {len(jobs)} runs on {args.workers} worker(s)", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)
    tasks = list(runs[0]["test_auc"])
    rows = summary(runs, variants, tasks)
    settings = {
        "data": args.data,
        "impressions": impressions if args.data == "ecommerce" else None,
        "config": BASE[args.data],
        "validate_every_steps": args.every,
        "seeds": seeds,
        "max_steps": max_steps,
    }
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    table = [
        [
            r["variant"],
            f"{r['epoch1_auc']['mean']:.3f} ({r['epoch1_auc']['min']:.3f})",
            f"{r['min_auc_epoch_ends']['mean']:.3f} ({r['min_auc_epoch_ends']['min']:.3f})",
            f"{r['min_auc_all_points']['mean']:.3f} ({r['min_auc_all_points']['min']:.3f})",
            *(f"{r['test_auc'][t]['mean']:.3f}" for t in tasks),
            f"{r['train_seconds']['mean']:.0f}",
        ]
        for r in rows
    ]
    headers = ["variant", "epoch-1 AUC (min)", "min AUC epoch ends", "min AUC all points"]
    print(format_table([*headers, *(f"test {t}" for t in tasks), "s"], table))
    se = {t: round(float(sum(r["chance_se_valid"][t] for r in runs) / len(runs)), 3) for t in tasks}
    print(f"standard error of AUC 0.5 on the validation split: {se}")
    print(f"wrote {json_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
