"""Recall quality on the synthetic e-commerce clicks: DSSM, CNN-DSSM, LSTM-DSSM and YouTube DNN
against the popularity and item-to-item co-occurrence baselines.

The data is ``mtrank synth ecommerce`` with ``--personalization P`` (default 0.5): a share P of
the impressions is drawn from each user's taste (a category they like, then an item by
popularity within it), the rest by global popularity. A recall benchmark on a log whose exposure
ignores the user (P = 0) measures nothing: every user is shown the same popular items, their
clicks differ only through the click probability, the generator's own ranking beats popularity by
a third (HR@100 0.249 against 0.182) and no trained model beats popularity at all
(docs/recall_offline.md; ``--personalization 0`` reproduces that run).

Each model is trained from its config in training/configs (recall_*.yaml) on one generated data
set (seed 0), early-stopped on the validation recall@100, and scored on the test split (the last
10% of impressions by time): for every user who clicks in it, an exact top-K over the whole
catalog, items clicked before the split left out, against the distinct items clicked in it
(training/recall/evaluate.py). HR, recall and NDCG at K = 50, 100, 500; each model runs with
every seed (new initialisation and batch order), the baselines are deterministic.

The last row, "generator truth", is not a model: it ranks items by the generator's own expected
clicks of the user over the test period, exposure (popularity and, at P > 0, the user's taste)
times click probability, read back from the generator's hidden state with the data seed
(training/recall/truth.py). It is the ceiling any recall model could reach on this data, and
shows how much personalisation can add over popularity at all.

    python -m bench.recall_quality [--seeds 3] [--quick] [--impressions 1000000]
        [--personalization 0.5]

Results: bench/results/recall_quality[_nN][_pP].json (and docs/img/...png); the suffixes appear
only away from the defaults (1,000,000 impressions, P = 0.5).
"""

from __future__ import annotations

import json
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
    output_paths,
    plt_agg,
    quiet,
    run_jobs,
    summarise,
    write_result,
)

NAME = "recall_quality"
DATA_SEED = 0
PERSONALIZATION = 0.5  # the default data: half of the impressions follow the user's taste
MODELS = {  # label -> config file
    "DSSM": "recall_dssm.yaml",
    "CNN-DSSM": "recall_cnn_dssm.yaml",
    "LSTM-DSSM": "recall_lstm_dssm.yaml",
    "YouTube DNN": "recall_youtube_dnn.yaml",
}
BASELINES = ("popularity", "co-occurrence")
TRUTH = "generator truth"
KS = (50, 100, 500)
METRICS = [f"{m}@{k}" for k in KS for m in ("hr", "recall", "ndcg")]


@dataclass(frozen=True)
class Job:
    seed: int
    model: str
    impressions: int
    personalization: float
    epochs: int
    max_steps: int | None

    def __str__(self) -> str:
        return f"seed={self.seed} {self.model}"


def data_dir(impressions: int, personalization: float) -> Path:
    return DATA / f"recall_ecommerce_n{impressions}_p{personalization:g}_seed{DATA_SEED}"


def result_name(impressions: int, personalization: float, quick: bool) -> str:
    """recall_quality, with _nN / _pP only where the run leaves the defaults."""
    name = NAME
    if impressions != 1_000_000 and not quick:
        name += f"_n{impressions}"
    if personalization != PERSONALIZATION:
        name += f"_p{personalization:g}"
    return name


def config(job: Job) -> Any:
    from training.recall.config import load_recall_config

    return load_recall_config(
        CONFIGS / MODELS[job.model],
        {"data.data_dir": str(data_dir(job.impressions, job.personalization)), "seed": job.seed,
         "device": "cpu", "epochs": job.epochs, "max_steps": job.max_steps, "eval.ks": list(KS)},
    )  # fmt: skip


def run_one(job: Job) -> dict[str, Any]:
    from training.recall.data import prepare
    from training.recall.evaluate import evaluate_model
    from training.recall.train import train

    cfg = config(job)
    data = prepare(cfg)
    out = Path(tempfile.mkdtemp(prefix="recall-bench-"))
    try:
        with quiet():
            result = train(cfg, out, data, log=False)
        points = json.loads(result.history.read_text())["points"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if data.test is None:
        raise ValueError(f"{cfg.data.data_dir}: no test split")
    test = evaluate_model(result.model, data.catalog, data.test, list(KS))
    history = [{"epoch": h["epoch"], "train_loss": h["train_loss"], "scale": h["scale"],
                "valid_recall@100": h["valid"]["recall@100"]} for h in points]  # fmt: skip
    return {
        "seed": job.seed,
        "model": job.model,
        "test": test["metrics"],
        "test_users": test["users"],
        "valid": result.metrics,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.train_seconds,
        "train_examples": len(data.train),
        "history": history,
    }


def baselines(impressions: int, personalization: float) -> dict[str, dict[str, Any]]:
    """Popularity, co-occurrence and the generator-truth ceiling on the test split."""
    from training.recall.baselines import CoOccurrenceRetriever, PopularityRetriever
    from training.recall.data import prepare
    from training.recall.evaluate import evaluate_retriever
    from training.recall.truth import GeneratorTruth, TruthUnavailable

    folder = data_dir(impressions, personalization)
    data = prepare(config(Job(0, "DSSM", impressions, personalization, 1, None)))
    if data.test is None:
        raise ValueError(f"{folder}: no test split")
    past = data.past["test"]
    out = {
        "popularity": evaluate_retriever(
            PopularityRetriever(past, data.catalog), data.test, list(KS)
        ),
        "co-occurrence": evaluate_retriever(
            CoOccurrenceRetriever(past, data.catalog), data.test, list(KS)
        ),
    }
    try:
        truth = GeneratorTruth.from_folder(folder, data.catalog.item_ids, "test")
    except TruthUnavailable as e:  # never report a ceiling of another world
        print(f"{NAME}: no generator-truth row: {e}", flush=True)
    else:
        out[TRUTH] = evaluate_retriever(truth, data.test, list(KS))
    return out


def summary(runs: list[dict[str, Any]], base: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in MODELS:
        mine = [r for r in runs if r["model"] == m]
        if mine:
            rows.append(
                {"model": m, "n": len(mine)}
                | {k: summarise([r["test"][k] for r in mine]) for k in METRICS}
                | {"train_seconds": summarise([r["train_seconds"] for r in mine])}
            )
    for name, rep in base.items():
        rows.append({"model": name, "n": 1} | {k: summarise([rep["metrics"][k]]) for k in METRICS})
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = plt_agg()
    keys = ("hr@100", "ndcg@100", "recall@500")
    fig, axes = plt.subplots(1, len(keys), figsize=(5.0 * len(keys), 4.2))
    for ax, key in zip(axes, keys, strict=True):
        labels = [r["model"] for r in rows]
        means = [r[key]["mean"] for r in rows]
        stds = [r[key]["std"] for r in rows]
        colors = [f"C{i}" for i in range(len(rows))]
        ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
        pop = next(r[key]["mean"] for r in rows if r["model"] == "popularity")
        ax.axhline(pop, color="grey", ls="--", lw=1, label="popularity")
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"test {key}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[dict[str, Any]]) -> str:
    keys = ["hr@50", "hr@100", "ndcg@100", "recall@100", "hr@500", "recall@500"]
    headers = ["model", *[f"{k} mean ± std" for k in keys]]
    table = [[r["model"], *[f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in keys]] for r in rows]
    return format_table(headers, table)


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=3)
    p.add_argument("--impressions", type=int, default=None, help="default 1,000,000")
    p.add_argument("--epochs", type=int, default=10, help="at most (early stopping: patience 2)")
    p.add_argument(
        "--personalization",
        type=float,
        default=PERSONALIZATION,
        help=f"share of impressions drawn from the user's taste (default {PERSONALIZATION}; "
        "0 = exposure by popularity alone, the first finding)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.personalization <= 1.0:
        p.error(f"--personalization must be in [0, 1], got {args.personalization}")
    started = time.perf_counter()
    impressions = args.impressions or (50_000 if args.quick else 1_000_000)
    max_steps = 20 if args.quick else None
    pers = args.personalization
    json_path, png_path = output_paths(result_name(impressions, pers, args.quick), args)

    from training.synthetic import generate_ecommerce

    folder = data_dir(impressions, pers)
    if not (folder / "meta.json").is_file():  # written last: a complete folder
        print(f"{NAME}: generating {impressions:,} impressions, P = {pers:g}", flush=True)
        generate_ecommerce(folder, impressions, DATA_SEED, personalization=pers)
    meta = json.loads((folder / "meta.json").read_text())
    base = baselines(impressions, pers)
    jobs = [
        Job(s, m, impressions, pers, args.epochs, max_steps)
        for s in range(args.seeds)
        for m in MODELS
    ]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)
    rows = summary(runs, base)
    title = f"Recall on synthetic e-commerce, {impressions:,} impressions, P = {pers:g} (test)"
    plot(rows, png_path, title)
    settings = {
        "impressions": impressions,
        "personalization": pers,
        "data_seed": DATA_SEED,
        "seeds": list(range(args.seeds)),
        "epochs": args.epochs,
        "max_steps": max_steps,
        "ks": list(KS),
        "exclude_seen": True,
        "workers": args.workers,
        "quick": args.quick,
        "data": meta,
        "configs": {m: str(Path("training/configs") / f) for m, f in MODELS.items()},
    }
    payload = {"settings": settings, "summary": rows, "baselines": base, "runs": runs}
    write_result(json_path, NAME, argv, started, payload)
    print(_table(rows))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
