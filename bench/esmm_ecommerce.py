"""ESMM vs BASE on the synthetic e-commerce funnel, like Table 2 of Ma et al., SIGIR 2018 (ESMM).

The generator (training.synthetic.generate_ecommerce) knows, for every impression, whether the
user would have bought had they clicked (``cf_purchase``), so the CVR model can be scored where it
is served: on the ENTIRE impression space, not only on clicked impressions. Clicks favour
clickbait and promoted items while purchases favour quality, so the clicked sample is biased,
which is the sample-selection bias ESMM addresses.

Models (tasks ctr and cvr only, as in the paper; same embeddings, bottom and towers):

- BASE: CTR on all impressions, CVR on clicked impressions only.
- ESMM: pCTCVR = pCTR x pCVR supervised on all impressions; pCVR never directly.
- ESMM on an MMoE bottom (``esmm_bottom: mmoe``).

Metrics on the test split (the last 10% of impressions by time): CVR AUC on the entire space
(against cf_purchase), CVR AUC on clicked impressions, CTCVR AUC (click x purchase against
pCTR x pCVR) and CTR AUC. Each seed is a new initialisation on one data set (seed 0); models are
early-stopped on the validation CTCVR AUC, which production could observe too (cf_purchase is
never used for training or model selection).

    python -m bench.esmm_ecommerce [--seeds 5] [--quick] [--impressions 1000000] [--epochs 5]
        [--drop user_id,item_id]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
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

NAME = "esmm_ecommerce"
DATA_SEED = 0
VARIANTS = {  # label -> (model.type, model.esmm_bottom)
    "BASE": ("base", "shared_bottom"),
    "ESMM": ("esmm", "shared_bottom"),
    "ESMM-MMoE": ("esmm", "mmoe"),
}
METRICS = {  # flat metric from training/evaluate.py -> column title
    "cvr_auc_entire_space": "CVR AUC (entire space)",
    "cvr_auc_clicked": "CVR AUC (clicked)",
    "cvr_ctcvr_auc": "CTCVR AUC",
    "ctr_auc": "CTR AUC",
}


@dataclass(frozen=True)
class Sizes:
    impressions: int
    epochs: int
    batch_size: int
    lr: float
    embed_dim: int
    bottom_units: tuple[int, ...]  # shared bottom (BASE, ESMM)
    n_experts: int  # ESMM-MMoE
    expert_units: tuple[int, ...]
    tower_units: int
    max_steps: int | None = None
    drop: tuple[str, ...] = ()  # sparse columns left out (an ablation)


FULL = Sizes(
    impressions=1_000_000,
    epochs=5,
    batch_size=2048,
    lr=1e-3,
    embed_dim=16,
    bottom_units=(128, 64),
    n_experts=4,
    expert_units=(64, 32),
    tower_units=32,
)
QUICK = Sizes(50_000, 1, 2048, 1e-3, 8, (32,), 2, (16,), 8)


@dataclass(frozen=True)
class Job:
    seed: int
    variant: str
    sizes: Sizes

    def __str__(self) -> str:
        return f"seed={self.seed} {self.variant}"


def data_dir(impressions: int) -> Path:
    return DATA / f"ecommerce_n{impressions}_seed{DATA_SEED}"


def dataset(impressions: int, drop: tuple[str, ...] = ()) -> Any:
    """ecommerce.dataset.yaml with the ctr and cvr tasks only, on the generated files, less the
    sparse columns in ``drop``."""
    from training.config import load_dataset_spec

    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    out = data_dir(impressions)
    return ds.model_copy(
        update={s: str(out / f"{s}.parquet") for s in ("train", "valid", "test")}
        | {"tasks": [t for t in ds.tasks if t.name in ("ctr", "cvr")]}
        | {"sparse": [c for c in ds.sparse if c.name not in drop]}
    )


def prepare_data(impressions: int, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Generate (once) and encode the data set; returns its meta (rates, sizes)."""
    import json

    from training.data import prepare
    from training.synthetic import generate_ecommerce

    out = data_dir(impressions)
    if not (out / "meta.json").is_file():
        generate_ecommerce(out, impressions, DATA_SEED)
    prepare(dataset(impressions, drop), DATA / ".cache")
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return meta


def config(job: Job) -> Any:
    s = job.sizes
    kind, bottom = VARIANTS[job.variant]
    return make_config(
        CONFIGS / "ecommerce_esmm.yaml",
        dataset(s.impressions, s.drop),
        {
            "model.type": kind,
            "model.esmm_bottom": bottom,
            "model.embed_dim": s.embed_dim,
            "model.bottom_units": list(s.bottom_units),
            "model.n_experts": s.n_experts,
            "model.expert_units": list(s.expert_units),
            "model.tower_units": [s.tower_units],
            "tasks": {"ctr": {"loss_weight": 1.0}, "cvr": {"loss_weight": 1.0}},
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "seed": job.seed,
            "max_steps": s.max_steps,
            "early_stopping": {"metric": "cvr_ctcvr_auc", "patience": 2},
            "device": "cpu",
        },
    )


def run_one(job: Job) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="esmm-bench-"))
    try:
        res = fit_and_test(config(job), out, DATA / ".cache")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "seed": job.seed,
        "variant": job.variant,
        "test": {k: res["test"].get(k) for k in METRICS},
        "best_epoch": res["best_epoch"],
        "epochs_run": res["epochs_run"],
        "train_seconds": res["train_seconds"],
        "history": [
            {"epoch": h["epoch"], **{k: h["valid"].get(k) for k in METRICS}} for h in res["history"]
        ],
    }


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        if mine:
            rows.append(
                {"variant": v}
                | {k: summarise([r["test"][k] for r in mine]) for k in METRICS}
                | {"train_seconds": summarise([r["train_seconds"] for r in mine])}
            )
    return rows


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per metric: the test value of every seed for each variant (line: mean)."""
    import numpy as np

    plt = plt_agg()
    keys = list(METRICS)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.8))
    for ax, key in zip(axes, keys, strict=True):
        for k, v in enumerate(VARIANTS):
            vals = [r["test"][key] for r in runs if r["variant"] == v]
            if not vals:
                continue
            jitter = np.linspace(-0.15, 0.15, len(vals))
            ax.scatter(k + jitter, vals, s=18, color=f"C{k}")
            ax.hlines(np.mean(vals), k - 0.3, k + 0.3, color=f"C{k}")
        ax.set_xticks(range(len(VARIANTS)), list(VARIANTS))
        ax.set_title(METRICS[key], fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=5)
    p.add_argument("--impressions", type=int, default=None, help="default 1,000,000")
    p.add_argument("--epochs", type=int, default=None, help="default 5")
    p.add_argument("--drop", default="", help="sparse columns to leave out, e.g. user_id,item_id")
    args = p.parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    # a non-default size is an ablation: it gets its own result files
    name = NAME
    if args.impressions is not None and args.impressions != sizes.impressions:
        sizes = replace(sizes, impressions=args.impressions)
        name += f"_n{args.impressions}"
    if args.epochs is not None and args.epochs != sizes.epochs:
        sizes = replace(sizes, epochs=args.epochs)
        name += f"_e{args.epochs}"
    if args.drop:
        sizes = replace(sizes, drop=tuple(args.drop.split(",")))
        name += "_no_" + "_".join(sizes.drop)
    seeds = list(range(args.seeds))
    json_path, png_path = output_paths(name, args)

    print(f"{NAME}: generating/encoding {sizes.impressions:,} impressions", flush=True)
    meta = prepare_data(
        sizes.impressions, sizes.drop
    )  # once, here: the workers only open the cache
    jobs = [Job(s, v, sizes) for s in seeds for v in VARIANTS]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)

    rows = summary(runs)
    plot(runs, png_path, f"Synthetic e-commerce, {sizes.impressions:,} impressions")
    settings = vars(sizes) | {"seeds": seeds, "data_seed": DATA_SEED, "workers": args.workers}
    settings |= {"quick": args.quick, "data": meta}
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    headers = ["model"] + [f"{METRICS[k]} mean ± std" for k in METRICS]
    table = [
        [r["variant"]] + [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS] for r in rows
    ]
    print(format_table(headers, table))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
