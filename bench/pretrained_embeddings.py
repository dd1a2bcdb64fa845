"""Pretrained item embeddings: does initialising ``item_id`` help the ranking model on rare items?

Each job trains ``training/configs/ecommerce_mmoe.yaml`` (the README's config, ``embed_dim`` 16) on
one generated data set, with the ``item_id`` rows started three ways:

- ``random``: the default start;
- ``item2vec``: skip-gram vectors over the train split's click histories (``mtrank item2vec``),
  fine-tuned;
- ``item2vec_frozen``: the same vectors, kept as loaded;
- ``item2vec_scaled``: the same vectors rescaled to the random start's RMS (``scale: init``),
  fine-tuned.

``--personalization P`` generates the world with that share of impressions drawn from the users'
taste (training/synthetic.py): with P = 0 exposure follows popularity alone and co-clicks say
little about items.

Reported per variant over seeds (model seed s on the same data): test CTR and CVR AUC over all
test impressions, and over the impressions of **rare items** (fewer than ``RARE`` train impressions,
new items included: they are OOV in the ranking vocabulary but not necessarily to item2vec, which
reads only the train split too, so they stay OOV) and of **known rare items** (in the vocabulary).

The generator's users have about 40 impressions and 2 clicks in 30 days, so a "session" here is a
user's whole click history (``--session-gap`` 30 days): with the production default of 30 minutes
almost no session has two clicks.

    python -m bench.pretrained_embeddings [--seeds 3] [--impressions 1000000] [--quick]
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
    format_table,
    make_config,
    output_paths,
    quiet,
    run_jobs,
    summarise,
    write_result,
)

NAME = "pretrained_embeddings"
RARE = 10  # train impressions below which an item is rare
DATA_SEED = 0
SESSION_GAP = 30 * 86400
VARIANTS = ("random", "item2vec", "item2vec_frozen", "item2vec_scaled")


@dataclass(frozen=True)
class Job:
    seed: int
    variant: str
    impressions: int
    epochs: int
    personalization: float = 0.0

    def __str__(self) -> str:
        return f"seed={self.seed} {self.variant}"


def data_dir(impressions: int, personalization: float = 0.0) -> Path:
    knob = "" if personalization == 0.0 else f"_p{personalization:g}"
    return DATA / f"ecommerce_n{impressions}_seed{DATA_SEED}{knob}"


def vectors_path(impressions: int, personalization: float = 0.0) -> Path:
    return data_dir(impressions, personalization) / "item2vec_item_id.npz"


def dataset(impressions: int, personalization: float = 0.0) -> Any:
    from training.config import load_dataset_spec

    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    out = data_dir(impressions, personalization)
    return ds.model_copy(update={s: str(out / f"{s}.parquet") for s in ("train", "valid", "test")})


def prepare_data(impressions: int, personalization: float = 0.0) -> dict[str, Any]:
    """Generate and encode the data, and train the item2vec vectors once (seed 0)."""
    import json

    from training.data import prepare
    from training.recall.item2vec import Item2VecConfig, save, train_item2vec
    from training.synthetic import generate_ecommerce

    out = data_dir(impressions, personalization)
    if not (out / "meta.json").is_file():
        generate_ecommerce(out, impressions, DATA_SEED, personalization=personalization)
    prepare(dataset(impressions, personalization), DATA / ".cache")
    started = time.perf_counter()
    if not vectors_path(impressions, personalization).is_file():
        ids, vectors = train_item2vec(
            out / "train.parquet", Item2VecConfig(dim=16, session_gap=SESSION_GAP)
        )
        save(ids, vectors, vectors_path(impressions, personalization))
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    meta["item2vec_seconds"] = time.perf_counter() - started
    return meta


def run_one(job: Job) -> dict[str, Any]:
    import numpy as np

    from training.checkpoint import load_checkpoint
    from training.data import prepare
    from training.evaluate import predict_all
    from training.metrics import auc
    from training.train import train

    ds = dataset(job.impressions, job.personalization)
    init = {}
    if job.variant != "random":
        path = str(vectors_path(job.impressions, job.personalization))
        init = {
            "item_id": {
                "path": path,
                "freeze": job.variant.endswith("frozen"),
                "scale": "init" if job.variant.endswith("scaled") else "as_is",
            }
        }
    cfg = make_config(
        CONFIGS / "ecommerce_mmoe.yaml",
        ds,
        {
            "seed": job.seed,
            "epochs": job.epochs,
            "model.init_embeddings": init,
            "validation": {"every_steps": 100},
            "early_stopping": {"metric": "ctr_auc", "patience": 4},
            "device": "cpu",
        },
    )
    data = prepare(ds, DATA / ".cache")
    assert data.test is not None
    out = Path(tempfile.mkdtemp(prefix="pretrained-bench-"))
    try:
        t0 = time.perf_counter()
        with quiet():
            result = train(cfg, out, data)
        seconds = time.perf_counter() - t0
        model, _, spec, _ = load_checkpoint(result.best_checkpoint)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    preds, _ = predict_all(model, data.test, batch_size=8192)
    col = [f.name for f in spec.sparse].index("item_id")
    train_items = np.asarray(data.train.sparse)[:, col]
    counts = np.bincount(train_items, minlength=spec.sparse[col].vocab_size)
    test_items = np.asarray(data.test.sparse)[:, col]
    n_train = counts[test_items]  # train impressions of each test row's item (OOV: the bucket)
    oov = test_items == 0
    rare = oov | (n_train < RARE)
    known_rare = ~oov & (n_train < RARE)
    click = np.asarray(data.test.labels["ctr"])
    buy = np.asarray(data.test.truth["cf_purchase"])
    groups = {"all": np.ones(len(click), bool), "rare": rare, "known_rare": known_rare}
    test: dict[str, float] = {}
    for g, mask in groups.items():
        test[f"ctr_auc_{g}"] = auc(click[mask], preds["ctr"][mask])
        test[f"cvr_auc_entire_space_{g}"] = auc(buy[mask], preds["cvr"][mask])
        test[f"rows_{g}"] = float(mask.sum())
    return {
        "seed": job.seed,
        "variant": job.variant,
        "test": test,
        "best_step": result.best_step,
        "train_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=3)
    p.add_argument("--impressions", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--personalization", type=float, default=0.0, help="the generator's knob")
    args = p.parse_args(argv)
    started = time.perf_counter()
    impressions = 50_000 if args.quick else args.impressions
    epochs = 1 if args.quick else args.epochs
    print(f"{NAME}: data and item2vec vectors for {impressions:,} impressions", flush=True)
    p13n = args.personalization
    meta = prepare_data(impressions, p13n)
    jobs = [Job(s, v, impressions, epochs, p13n) for s in range(args.seeds) for v in VARIANTS]
    print(f"{NAME}: {len(jobs)} training runs on {args.workers} workers", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)
    keys = [k for k in runs[0]["test"] if not k.startswith("rows_")]
    rows = []
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        rows.append({"variant": v} | {k: summarise([r["test"][k] for r in mine]) for k in keys})
    suffix = "" if impressions == 1_000_000 or args.quick else f"_n{impressions}"
    suffix += "" if p13n == 0.0 else f"_p{p13n:g}"
    json_path, _ = output_paths(NAME + suffix, args)
    settings = {"impressions": impressions, "epochs": epochs, "rare_below": RARE}
    settings |= {"personalization": p13n}
    settings |= {"session_gap": SESSION_GAP, "seeds": list(range(args.seeds)), "data": meta}
    settings |= {"rows": {g: runs[0]["test"][f"rows_{g}"] for g in ("all", "rare", "known_rare")}}
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    table = [
        [r["variant"], *(f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in keys)] for r in rows
    ]
    print(format_table(["variant", *keys], table))
    print(f"test rows per group: {settings['rows']}")
    print(f"wrote {json_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
