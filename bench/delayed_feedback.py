"""Delayed conversions under daily retraining: naive, a waiting window, DFM (Chapelle, KDD 2014)
and ES-DFM (Yang et al., AAAI 2021) judged against the eventual conversions.

The world is the synthetic e-commerce funnel with conversion delays
(``generate_ecommerce(conversion_delays=True)``): every purchase follows its click after an
exponential delay whose mean depends on the item category, from 1 hour to 14 days. The
benchmark keeps the clicked impressions (a CVR model's data) and replays the log: for each of the
last ``days`` days D of the 30-day history, a model is trained from scratch on every click before
D with the conversions as they stood at the start of D (``training.synthetic.observe_conversions``
on the same draws), and scored on the clicks of day D against their EVENTUAL label, ``purchase``,
which no method ever trains on (except the oracle, a ceiling).

Methods (model BASE, ``model.delayed_feedback``; training/models/delayed.py):

- naive: a click without a conversion yet is a negative;
- window 3d: only clicks at least 3 days old enter the CVR loss;
- DFM: conversion probability and an exponential delay, learnt jointly;
- ES-DFM: elapsed-time sampling (wait 15 minutes) with importance weights from two heads that
  learn from clicks at least 14 days old;
- oracle: the eventual labels of the same clicks (not deployable: the ceiling).

Metrics per day, then averaged over the days of a seed: CVR AUC, calibration (ECE, 10 bins) and
the bias of the mean prediction (mean pCVR - mean eventual conversion). The headline table is the
mean ± std over seeds; each seed is a new world and a new initialisation.

    python -m bench.delayed_feedback [--seeds 5] [--quick] [--days 8] [--impressions 2000000]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    CONFIGS,
    DATA,
    argv_of,
    base_parser,
    format_table,
    output_paths,
    plt_agg,
    quiet,
    run_jobs,
    summarise,
    write_result,
)

NAME = "delayed_feedback"
METHODS: dict[str, dict[str, Any] | None] = {  # label -> model.delayed_feedback; None: oracle
    "naive": {"method": "naive"},
    "window 3d": {"method": "window", "window_days": 3.0},
    "window 7d": {"method": "window", "window_days": 7.0},
    "DFM": {"method": "dfm"},
    "ES-DFM": {
        "method": "es_dfm",
        "elapsed_hours": 0.25,
        "complete_after_days": 14.0,
        "stream_days": 14.0,  # = Sizes.train_days (checked in config())
    },
    "oracle": None,
}
METRICS = {"auc": "CVR AUC", "ece": "CVR ECE", "bias": "bias of mean pCVR"}
# Left out: ~1 click per user and ~2 per item in a 14-day window, so with them every method
# overfits within the epochs DFM's delay head needs (AUC 0.77 instead of 0.86 at 5 epochs).
ID_COLUMNS = ("user_id", "item_id")
# Clicks grouped by how slowly their category converts (its mean delay, days): where naive's
# missing conversions are, and so where a correction has to show.
DELAY_GROUPS = {"mean delay <= 6 h": (0.0, 0.25), "mean delay >= 3 d": (3.0, float("inf"))}
DAY = 86400


@dataclass(frozen=True)
class Sizes:
    impressions: int
    days: int  # evaluation days: the last ``days`` of the 30-day history
    train_days: int  # each model learns from the clicks of the ``train_days`` days before
    epochs: int
    batch_size: int
    lr: float
    embed_dim: int
    bottom_units: tuple[int, ...]
    tower_units: int
    weight_averaging: float  # weight_averaging.decay: steadier outputs from day to day


FULL = Sizes(2_000_000, 8, 14, 5, 512, 2e-3, 8, (64, 32), 16, 0.998)
QUICK = Sizes(300_000, 2, 14, 3, 512, 3e-3, 4, (16,), 8, 0.0)


@dataclass(frozen=True)
class Job:
    seed: int
    method: str
    sizes: Sizes

    def __str__(self) -> str:
        return f"seed={self.seed} {self.method}"


# ------------------------------------------------------------------ the world
def world_dir(seed: int, s: Sizes) -> Path:
    return DATA / f"delayed_n{s.impressions}_seed{seed}"


def dataset(seed: int, s: Sizes) -> Any:
    """The clicked impressions with ecommerce.dataset.yaml's features; cvr is the purchase as
    observed at the generator's cut-off, with its timing columns (each day relabels them)."""
    from training.config import DatasetSpec, TaskColumn, load_dataset_spec

    base = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    return DatasetSpec(
        name=f"delayed_seed{seed}",
        format="parquet",
        train=str(world_dir(seed, s) / "clicks.parquet"),
        sparse=[c for c in base.sparse if c.name not in ID_COLUMNS],
        dense=base.dense,
        tasks=[
            TaskColumn(name="ctr", label="click"),
            TaskColumn(
                name="cvr",
                label="purchase_observed",
                depends_on="ctr",
                elapsed="elapsed_days",
                delay="purchase_delay_days",
            ),
        ],
        funnel_policy="error",
    )


def make_world(seed: int, s: Sizes) -> dict[str, Any]:
    """Generate (once) the world of ``seed``, keep its clicks, encode them; returns its meta."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.data import prepare
    from training.synthetic import generate_ecommerce

    out = world_dir(seed, s)
    if not (out / "clicks.parquet").is_file():
        generate_ecommerce(out, s.impressions, seed, conversion_delays=True)
        parts = [pq.read_table(out / f"{split}.parquet") for split in ("train", "valid", "test")]
        table = pa.concat_tables(parts)
        clicks = table.filter(pc.equal(table.column("click"), 1))
        pq.write_table(clicks, out / "clicks.parquet")
        for split in ("train", "valid", "test"):  # the impressions are not needed again
            (out / f"{split}.parquet").unlink()
    prepare(dataset(seed, s), DATA / ".cache")
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return meta


# ------------------------------------------------------------------ one method on one world
def config(job: Job) -> Any:
    from training.config import TrainConfig

    s = job.sizes
    delayed = METHODS[job.method]
    if delayed is not None and delayed.get("stream_days", s.train_days) != s.train_days:
        raise ValueError(f"{job.method}: stream_days must equal train_days ({s.train_days})")
    return TrainConfig.model_validate(
        {
            "dataset": dataset(job.seed, s).model_dump(),
            "model": {
                "type": "base",
                "embed_dim": s.embed_dim,
                "bottom_units": list(s.bottom_units),
                "tower_units": [s.tower_units],
                "delayed_feedback": delayed or {"method": "naive"},
            },
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "weight_averaging": {"decay": s.weight_averaging},
            "seed": job.seed,
            "device": "cpu",
        }
    )


def day_labels(
    method: str, ts: np.ndarray, purchase: np.ndarray, delay: np.ndarray, cutoff: float
) -> dict[str, np.ndarray]:
    """The labels a model trained at ``cutoff`` sees: the log as it stood then (the oracle: the
    eventual purchases), with the timing columns as the data pipeline stores them."""
    from training.config import timing_key
    from training.synthetic import observe_conversions

    seen = observe_conversions(ts, purchase, delay, cutoff)
    observed = seen["purchase_observed"]
    cvr = purchase if METHODS[method] is None else observed
    return {
        "ctr": np.ones(len(ts), np.float32),
        "cvr": cvr.astype(np.float32),
        timing_key("cvr", "elapsed"): seen["elapsed_days"].astype(np.float32),
        timing_key("cvr", "delay"): np.where(observed, delay, 0.0).astype(np.float32),
    }


def score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from training.metrics import auc, calibration

    return {
        "auc": auc(y, p),
        "ece": float(calibration(y, p)["ece"]),
        "bias": float(p.mean() - y.mean()),
        "mean_pred": float(p.mean()),
        "mean_label": float(y.mean()),
    }


def group_sums(speed: np.ndarray, y: np.ndarray, p: np.ndarray) -> dict[str, dict[str, float]]:
    """Rows, summed prediction and summed eventual label per delay group (pooled later)."""
    out = {}
    for name, (lo, hi) in DELAY_GROUPS.items():
        sel = (speed >= lo) & (speed <= hi)
        out[name] = {
            "n": float(sel.sum()),
            "pred": float(p[sel].sum()),
            "label": float(y[sel].sum()),
        }
    return out


def relative_bias(run: dict[str, Any], group: str) -> float:
    """Mean prediction / mean eventual label - 1 over a run's evaluation days, for one group."""
    pred = sum(d["groups"][group]["pred"] for d in run["days"])
    label = sum(d["groups"][group]["label"] for d in run["days"])
    return pred / label - 1.0 if label > 0 else float("nan")


def run_one(job: Job) -> dict[str, Any]:
    """Train and score ``job.method`` on each evaluation day of ``job.seed``'s world."""
    import pyarrow.parquet as pq
    import torch

    from training.data import Encoded, LabelReport, PreparedData, prepare
    from training.train import train

    s = job.sizes
    cfg = config(job)
    data = prepare(cfg.dataset, DATA / ".cache")
    world = world_dir(job.seed, s)
    names = ["ts", "purchase", "true_delay_days", "category"]
    cols = pq.read_table(world / "clicks.parquet", columns=names)
    ts = cols.column("ts").to_numpy().astype(np.float64)  # (N,) seconds, in time order
    purchase = cols.column("purchase").to_numpy() > 0  # (N,) the eventual label
    delay = np.nan_to_num(cols.column("true_delay_days").to_numpy(zero_copy_only=False))
    means = json.loads((world / "meta.json").read_text())["conversion_delays"]
    speed = np.asarray(means["mean_days_by_category"])[cols.column("category").to_numpy()]  # (N,)
    if len(ts) != len(data.train) or np.any(np.diff(ts) < 0):
        raise RuntimeError("clicks.parquet and its encoding disagree, or are not in time order")
    start = float(ts[0] // DAY * DAY)
    n_days = int((ts[-1] - start) // DAY) + 1
    days = []
    for d in range(n_days - s.days, n_days):
        cutoff, end = start + d * DAY, start + (d + 1) * DAY
        # the clicks of the train_days before the cut-off; ES-DFM's stream also holds the late
        # conversions of earlier clicks, and its weight heads learn from those clicks
        stream = (METHODS[job.method] or {}).get("stream_days") is not None
        first = 0 if stream else int(np.searchsorted(ts, cutoff - s.train_days * DAY))
        n_train, n_end = int(np.searchsorted(ts, cutoff)), int(np.searchsorted(ts, end))
        rows = slice(first, n_train)  # the clicks of the train_days days before the cut-off
        labels = day_labels(job.method, ts[rows], purchase[rows], delay[rows], cutoff)
        train_split = Encoded(data.train.sparse[rows], data.train.dense[rows], labels, None, {})
        day_data = PreparedData(
            data.spec, train_split, None, None, LabelReport("error"), data.fingerprint, data.path
        )
        out = Path(tempfile.mkdtemp(prefix="delayed-bench-"))
        t0 = time.perf_counter()
        try:
            with quiet():
                model = train(cfg, out, day_data).model
        finally:
            shutil.rmtree(out, ignore_errors=True)
        seconds = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            sparse = torch.from_numpy(np.asarray(data.train.sparse[n_train:n_end]))
            dense = torch.from_numpy(np.asarray(data.train.dense[n_train:n_end]))
            p = model.predict(sparse, dense)["cvr"].double().numpy()  # (n,)
        y = purchase[n_train:n_end].astype(np.float64)
        days.append(
            {"day": d, "train_rows": n_train - first, "test_rows": n_end - n_train}
            | {"train_observed_rate": float(labels["cvr"].mean()), "train_seconds": seconds}
            | score(y, p)
            | {"groups": group_sums(speed[n_train:n_end], y, p)}
        )
    mean = {k: float(np.mean([r[k] for r in days])) for k in (*METRICS, "train_seconds")}
    return {"seed": job.seed, "method": job.method, "mean": mean, "days": days}


# ------------------------------------------------------------------ report
def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: each metric's mean ± std over seeds, and the paired difference to naive on
    the same world (AUC gain, |bias| reduction), which the worlds' own spread does not blur."""
    naive = {r["seed"]: r["mean"] for r in runs if r["method"] == "naive"}
    rows = []
    for m in METHODS:
        mine = [r for r in runs if r["method"] == m]
        if not mine:
            continue
        row = {"method": m} | {k: summarise([r["mean"][k] for r in mine]) for k in METRICS}
        row["train_seconds"] = summarise([r["mean"]["train_seconds"] for r in mine])
        paired = [(r["mean"], naive[r["seed"]]) for r in mine if r["seed"] in naive]
        row["auc_gain_vs_naive"] = summarise([a["auc"] - b["auc"] for a, b in paired])
        row["abs_bias_cut_vs_naive"] = summarise(
            [abs(b["bias"]) - abs(a["bias"]) for a, b in paired]
        )
        row["relative_bias"] = {
            g: summarise([relative_bias(r, g) for r in mine]) for g in DELAY_GROUPS
        }
        rows.append(row)
    return rows


def group_table(rows: list[dict[str, Any]]) -> str:
    headers = ["method"] + [f"relative bias, {g}" for g in DELAY_GROUPS]
    body = [
        [r["method"]]
        + [
            f"{r['relative_bias'][g]['mean']:+.3f} ± {r['relative_bias'][g]['std']:.3f}"
            for g in DELAY_GROUPS
        ]
        for r in rows
    ]
    return format_table(headers, body)


def table(rows: list[dict[str, Any]]) -> str:
    keys = [*METRICS, "auc_gain_vs_naive", "abs_bias_cut_vs_naive"]
    titles = [*METRICS.values(), "AUC - naive's (paired)", "naive's |bias| - |bias| (paired)"]
    headers = ["method"] + [f"{t} mean ± std" for t in titles]
    body = [
        [r["method"]] + [f"{r[k]['mean']:+.4f} ± {r[k]['std']:.4f}" for k in keys] for r in rows
    ]
    return format_table(headers, body)


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per metric: its value on each evaluation day, mean over seeds ± std; a last
    panel: the relative bias of the mean prediction by delay group."""
    plt = plt_agg()
    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4.8 * (len(METRICS) + 1), 3.9))
    for ax, key in zip(axes, METRICS, strict=False):
        for k, m in enumerate(METHODS):
            mine = [r for r in runs if r["method"] == m]
            if not mine:
                continue
            days = [d["day"] for d in mine[0]["days"]]
            vals = np.array([[d[key] for d in r["days"]] for r in mine])  # (seeds, days)
            mean = vals.mean(axis=0)
            std = vals.std(axis=0, ddof=1) if len(mine) > 1 else np.zeros_like(mean)
            style = "--" if METHODS[m] is None else "-"
            ax.plot(days, mean, style, color=f"C{k}", label=m, marker=".")
            ax.fill_between(days, mean - std, mean + std, color=f"C{k}", alpha=0.15)
        if key == "bias":
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(sorted({d["day"] for r in runs for d in r["days"]}))
        ax.set_xlabel("evaluation day of the log (trained on the clicks before it)")
        ax.set_title(METRICS[key], fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    present = [m for m in METHODS if any(r["method"] == m for r in runs)]
    width = 0.8 / max(len(present), 1)
    for k, m in enumerate(present):
        vals = [[relative_bias(r, g) for r in runs if r["method"] == m] for g in DELAY_GROUPS]
        mean = [float(np.mean(v)) for v in vals]
        std = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in vals]
        x = np.arange(len(DELAY_GROUPS)) + (k - (len(present) - 1) / 2) * width
        ax.bar(x, mean, width, yerr=std, color=f"C{list(METHODS).index(m)}", label=m, capsize=2)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(DELAY_GROUPS)), list(DELAY_GROUPS))
    ax.set_title("mean pCVR / mean eventual CVR - 1, by category", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(path: Path, args: Any) -> int:
    """Recompute a stored run's summary and plot from its per-day results (no training)."""
    record = json.loads(path.read_text())
    runs, st = record["runs"], record["settings"]
    record["summary"] = summary(runs)
    path.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    png = output_paths(path.stem, args)[1]
    title = (
        f"Delayed conversions, daily retraining: {len(st['seeds'])} seeds x {st['days']} days, "
        f"{st['impressions']:,} impressions"
    )
    plot(runs, png, title)
    print(
        f"{table(record['summary'])}\n\n{group_table(record['summary'])}\nrewrote {path} and {png}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=5)
    p.add_argument("--impressions", type=int, default=None, help="default 2,000,000")
    p.add_argument("--days", type=int, default=None, help="evaluation days (default 8)")
    p.add_argument("--methods", default=",".join(METHODS), help="a subset, comma-separated")
    p.add_argument(
        "--replot", type=Path, default=None, help="a result JSON: redo its summary and plot only"
    )
    args = p.parse_args(argv)
    if args.replot is not None:
        return replot(args.replot, args)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    started = time.perf_counter()
    s = QUICK if args.quick else FULL
    name = NAME
    if args.impressions is not None and args.impressions != s.impressions:
        s = Sizes(**(vars(s) | {"impressions": args.impressions}))
        name += f"_n{args.impressions}"
    if args.days is not None and args.days != s.days:
        s = Sizes(**(vars(s) | {"days": args.days}))
        name += f"_d{args.days}"
    seeds = list(range(args.seeds))
    json_path, png_path = output_paths(name, args)
    metas = {}
    for seed in seeds:
        print(f"{NAME}: world of seed {seed}: {s.impressions:,} impressions", flush=True)
        metas[seed] = make_world(seed, s)
    jobs = [Job(seed, m, s) for seed in seeds for m in methods]
    print(f"{NAME}: {len(jobs)} jobs of {s.days} trainings each on {args.workers} workers")
    runs = run_jobs(run_one, jobs, args.workers)
    rows = summary(runs)
    title = (
        f"Delayed conversions, daily retraining: {len(seeds)} seeds x {s.days} days, "
        f"{s.impressions:,} impressions"
    )
    plot(runs, png_path, title)
    print(f"\n{table(rows)}\n\n{group_table(rows)}")
    settings = vars(s) | {"seeds": seeds, "methods": METHODS, "workers": args.workers}
    settings |= {"data": {str(k): v for k, v in metas.items()}}
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
