"""CVR without selection bias on the synthetic e-commerce funnel: ESMM (Ma et al., SIGIR 2018),
ESCM² (Wang et al., SIGIR 2022) and IPS / DR-JL (Wang et al., ICML 2019) against BASE.

The generator (training.synthetic.generate_ecommerce) knows, for every impression, whether the
user would have bought had they clicked (``cf_purchase``), so the CVR model can be scored where it
is served: on the ENTIRE impression space, not only on clicked impressions. Clicks favour
clickbait and promoted items while purchases favour quality, so the clicked sample is biased;
``--selection-bias`` scales how strongly (1 is the default world).

Models (tasks ctr and cvr only, as in the papers; same embeddings, shared bottom and towers):

- BASE: CTR on all impressions, CVR on clicked impressions only.
- ESMM: pCTCVR = pCTR x pCVR supervised on all impressions; pCVR never directly.
- ESCM²-IPS / ESCM²-DR: ESMM plus the inverse-propensity (doubly robust) counterfactual CVR risk.
- IPS / DR-JL: BASE with the clicked-only CVR loss replaced by the IPS (doubly robust) risk.

Metrics on the test split (the last 10% of impressions by time): entire-space CVR AUC (against
cf_purchase), its calibration (ECE) and bias (mean pCVR - mean cf_purchase), CVR AUC on clicked
impressions, CTCVR AUC and CTR AUC. Each seed is a new initialisation on one data set (seed 0);
the validation split is scored every ``VALID_EVERY`` steps and models are early-stopped on the
validation CTCVR AUC, which production could observe too (cf_purchase is never used for training
or model selection).

    python -m bench.esmm_ecommerce [--seeds 5] [--quick] [--impressions 1000000] [--epochs 5]
        [--drop user_id,item_id] [--selection-bias 1.0]
    python -m bench.esmm_ecommerce --sweep 0,1,2 --impressions 300000 --seeds 3   # the knob plot
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
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
    "ESCM2-IPS": ("escm2_ips", "shared_bottom"),
    "ESCM2-DR": ("escm2_dr", "shared_bottom"),
    "IPS": ("ips", "shared_bottom"),
    "DR-JL": ("dr_jl", "shared_bottom"),
}
SWEEP_VARIANTS = ("BASE", "ESMM", "ESCM2-IPS", "ESCM2-DR", "DR-JL")
METRICS = {  # flat metric from training/evaluate.py -> column title
    "cvr_auc_entire_space": "CVR AUC (entire space)",
    "cvr_ece_entire_space": "CVR ECE (entire space)",
    "cvr_bias_entire_space": "CVR bias (entire space)",
    "cvr_auc_clicked": "CVR AUC (clicked)",
    "cvr_ctcvr_auc": "CTCVR AUC",
    "ctr_auc": "CTR AUC",
}
VALID_EVERY = 100  # steps between validation points (about 4 per epoch at 1M impressions)


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
    selection_bias: float = 1.0  # the generator's knob (1: the default world)
    hidden_confounding: float = 0.0  # the unlogged per-impression confounder (0: none)
    weight_averaging: float | None = None  # weight_averaging.decay; None: the config default
    embedding_penalty: float | None = None  # frequency-aware embedding penalty λ; None: default


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


def data_dir(s: Sizes) -> Path:
    knob = "" if s.selection_bias == 1.0 else f"_sb{s.selection_bias:g}"
    knob += "" if s.hidden_confounding == 0.0 else f"_hc{s.hidden_confounding:g}"
    return DATA / f"ecommerce_n{s.impressions}_seed{DATA_SEED}{knob}"


def dataset(s: Sizes) -> Any:
    """ecommerce.dataset.yaml with the ctr and cvr tasks only, on the generated files, less the
    sparse columns in ``s.drop``."""
    from training.config import load_dataset_spec

    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    out = data_dir(s)
    return ds.model_copy(
        update={k: str(out / f"{k}.parquet") for k in ("train", "valid", "test")}
        | {"tasks": [t for t in ds.tasks if t.name in ("ctr", "cvr")]}
        | {"sparse": [c for c in ds.sparse if c.name not in s.drop]}
    )


def prepare_data(s: Sizes) -> dict[str, Any]:
    """Generate (once) and encode the data set; returns its meta (rates, sizes)."""
    import json

    from training.data import prepare
    from training.synthetic import generate_ecommerce

    out = data_dir(s)
    if not (out / "meta.json").is_file():
        generate_ecommerce(
            out,
            s.impressions,
            DATA_SEED,
            selection_bias=s.selection_bias,
            hidden_confounding=s.hidden_confounding,
        )
    prepare(dataset(s), DATA / ".cache")
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return meta


def config(job: Job) -> Any:
    s = job.sizes
    kind, bottom = VARIANTS[job.variant]
    return make_config(
        CONFIGS / "ecommerce_esmm.yaml",
        dataset(s),
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
            "early_stopping": {"metric": "cvr_ctcvr_auc", "patience": 6},
            "validation": {"every_steps": VALID_EVERY},
            "device": "cpu",
        }
        | ({} if s.weight_averaging is None else {"weight_averaging.decay": s.weight_averaging})
        | (
            {}
            if s.embedding_penalty is None
            else {"embedding_regularization": {"type": "frequency", "weight": s.embedding_penalty}}
        ),
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
        "selection_bias": job.sizes.selection_bias,
        "hidden_confounding": job.sizes.hidden_confounding,
        "test": {k: res["test"].get(k) for k in METRICS},
        "best_epoch": res["best_epoch"],
        "best_step": res["best_step"],
        "epochs_run": res["epochs_run"],
        "train_seconds": res["train_seconds"],
        "history": [
            {"epoch": h["epoch"], "step": h["step"], **{k: h["valid"].get(k) for k in METRICS}}
            for h in res["history"]
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


def _panels(
    keys: tuple[str, ...], path: Path, title: str, draw: Callable[[Any, str], None]
) -> None:
    """One panel per metric key, ``draw(ax, key)`` fills each; shared legend, title and file."""
    plt = plt_agg()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8))
    for ax, key in zip(axes, keys, strict=True):
        draw(ax, key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation entire-space CVR AUC and CTCVR AUC per validation point (mean over seeds)."""
    import numpy as np

    def draw(ax: Any, key: str) -> None:
        for k, v in enumerate(VARIANTS):
            curves = [[h[key] for h in r["history"]] for r in runs if r["variant"] == v]
            if not curves:
                continue
            steps = [h["step"] for h in next(r for r in runs if r["variant"] == v)["history"]]
            n = min(len(c) for c in curves)  # early stopping ends seeds at different points
            mean = np.mean([c[:n] for c in curves], axis=0)
            ax.plot(steps[:n], mean, color=f"C{k}", label=v, marker=".", ms=3)
        ax.set_xlabel("training step")
        ax.set_title(f"validation {METRICS[key]}", fontsize=10)

    _panels(("cvr_auc_entire_space", "cvr_ctcvr_auc"), path, title, draw)


KNOB_LABELS = {
    "selection_bias": "selection bias (item clickbait; 1 = default world)",
    "hidden_confounding": "hidden confounding (unlogged per-impression draw; 0 = default world)",
}


def plot_sweep(
    runs: list[dict[str, Any]], knob: str, knobs: list[float], path: Path, title: str
) -> None:
    """Entire-space CVR AUC and bias against a generator knob (mean ± std over seeds)."""
    import numpy as np

    def draw(ax: Any, key: str) -> None:
        for k, v in enumerate(SWEEP_VARIANTS):
            stats = [
                [r["test"][key] for r in runs if r["variant"] == v and r[knob] == b] for b in knobs
            ]
            mean = [np.mean(x) for x in stats]
            std = [np.std(x, ddof=1) if len(x) > 1 else 0.0 for x in stats]
            ax.errorbar(knobs, mean, yerr=std, color=f"C{k}", label=v, marker="o", capsize=3)
        ax.set_xlabel(KNOB_LABELS[knob])
        ax.set_title(f"test {METRICS[key]}", fontsize=10)

    _panels(("cvr_auc_entire_space", "cvr_bias_entire_space"), path, title, draw)


def _table(rows: list[dict[str, Any]]) -> str:
    headers = ["model"] + [f"{METRICS[k]} mean ± std" for k in METRICS]
    table = [
        [r["variant"]] + [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS] for r in rows
    ]
    return format_table(headers, table)


def sweep(args: Any, sizes: Sizes, argv: list[str], started: float) -> int:
    """One table per knob value, every value in one run; the plot of the knob."""
    knob, knobs = args.sweep_knob, [float(x) for x in args.sweep.split(",")]
    name = f"{NAME}_sweep_n{sizes.impressions}"
    name += "" if knob == "selection_bias" else f"_{knob}"
    json_path, png_path = output_paths(name, args)
    metas, jobs = {}, []
    for b in knobs:
        at = replace(sizes, **{knob: b})
        print(f"{NAME}: generating/encoding {at.impressions:,} impressions, {knob} {b:g}")
        metas[b] = prepare_data(at)
        jobs += [Job(s, v, at) for s in range(args.seeds) for v in SWEEP_VARIANTS]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)
    label = KNOB_LABELS[knob].split(" (")[0].capitalize()
    title = f"{label} sweep, {sizes.impressions:,} impressions"
    plot_sweep(runs, knob, knobs, png_path, title)
    tables = {}
    for b in knobs:
        rows = summary([r for r in runs if r[knob] == b])
        tables[str(b)] = rows
        print(f"\n{knob} {b:g} (data: {metas[b]['rates']})\n{_table(rows)}")
    settings = vars(sizes) | {"knob": knob, "knobs": knobs, "seeds": list(range(args.seeds))}
    settings |= {"data_seed": DATA_SEED, "workers": args.workers, "data": metas}
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": tables, "runs": runs}
    )
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=5)
    p.add_argument("--impressions", type=int, default=None, help="default 1,000,000")
    p.add_argument("--epochs", type=int, default=None, help="default 5")
    p.add_argument("--drop", default="", help="sparse columns to leave out, e.g. user_id,item_id")
    p.add_argument("--selection-bias", type=float, default=1.0, help="the generator's knob")
    p.add_argument(
        "--hidden-confounding", type=float, default=0.0, help="the generator's hidden confounder"
    )
    p.add_argument("--sweep", default="", help="knob values, e.g. 0,1,2: the sweep and its plot")
    p.add_argument("--sweep-knob", choices=sorted(KNOB_LABELS), default="selection_bias")
    p.add_argument(
        "--weight-averaging", type=float, default=None, help="weight_averaging.decay (ablation)"
    )
    p.add_argument(
        "--embedding-penalty", type=float, default=None, help="frequency penalty λ (ablation)"
    )
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
    if args.weight_averaging is not None:
        sizes = replace(sizes, weight_averaging=args.weight_averaging)
        name += f"_wa{args.weight_averaging:g}"
    if args.embedding_penalty is not None:
        sizes = replace(sizes, embedding_penalty=args.embedding_penalty)
        name += f"_fr{args.embedding_penalty:g}"
    if args.sweep:
        return sweep(args, sizes, argv, started)
    if args.selection_bias != 1.0:
        sizes = replace(sizes, selection_bias=args.selection_bias)
        name += f"_sb{args.selection_bias:g}"
    if args.hidden_confounding != 0.0:
        sizes = replace(sizes, hidden_confounding=args.hidden_confounding)
        name += f"_hc{args.hidden_confounding:g}"
    seeds = list(range(args.seeds))
    json_path, png_path = output_paths(name, args)

    print(f"{NAME}: generating/encoding {sizes.impressions:,} impressions", flush=True)
    # once, here: the workers only open the cache
    meta = prepare_data(sizes)
    jobs = [Job(s, v, sizes) for s in seeds for v in VARIANTS]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)

    rows = summary(runs)
    plot(runs, png_path, f"Synthetic e-commerce, {sizes.impressions:,} impressions")
    curves_title = f"Validation every {VALID_EVERY} steps, {sizes.impressions:,} impressions"
    plot_curves(runs, png_path.with_name(png_path.stem + "_curves.png"), curves_title)
    settings = vars(sizes) | {"seeds": seeds, "data_seed": DATA_SEED, "workers": args.workers}
    settings |= {"quick": args.quick, "data": meta}
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    print(_table(rows))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
