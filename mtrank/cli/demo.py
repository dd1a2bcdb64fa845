"""``mtrank demo``: the main job on a fresh machine — a served model, whatever it takes.

    mtrank demo [--host 127.0.0.1] [--port 8000] [--root models] [--name ecommerce]
                [--recall-name recall] [--no-recall]

1. If ``models/NAME`` has no current version: generate synthetic e-commerce logs
   (``data/NAME``), train the MMoE of ``training/configs/ecommerce_mmoe.yaml`` on them, and export
   it into the registry (parity-checked, promoted).
2. If no feature snapshot matches the served model's spec: build one from the logs' user and
   item tables (regenerating the deterministic synthetic tables if they were deleted).
3. Unless ``--no-recall``: if ``models/RECALL`` has no current version, train the DSSM of
   ``training/configs/recall_dssm.yaml`` on the same logs (so the item ids it recalls are the
   ones the snapshot holds) and publish it with a flat (exact) index, promoted; if it has no user
   histories, build them from the logs (``mtrank features build-history``).
4. Serve it with ``mtrank serve`` on the embedded feature and history stores (no Redis needed),
   ``/rank`` and, with step 3, ``/recall`` and ``/recommend``, printing the URL and
   ready-to-paste ``curl`` lines.

Steps 1-3 need the ``train`` extra (torch); a machine that already has the models, a snapshot and
the histories serves with the ``serve`` extra alone. Every step says what it does; nothing is
skipped silently.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mtrank.history import HISTORY_DIR, latest_history
from mtrank.registry import Registry
from mtrank.spec import FeatureSpec

SEED = 0
HISTORY_MAX_LEN = 50  # clicks kept per user: the tower reads the last 20, the filter all of them


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _configs_dir() -> Path:
    import training

    return Path(training.__file__).resolve().parent / "configs"


def ensure_data(data_dir: Path, impressions: int) -> None:
    if (data_dir / "items.parquet").is_file() and (data_dir / "train.parquet").is_file():
        _say(f"using synthetic logs in {data_dir}")
        return
    from training.synthetic import generate_ecommerce

    _say(f"generating {impressions:,} synthetic e-commerce impressions into {data_dir} ...")
    meta = generate_ecommerce(data_dir, impressions, SEED)
    _say(f"  {meta.get('n_users', '?')} users, {meta.get('n_items', '?')} items")


def ensure_model(reg: Registry, name: str, data_dir: Path, epochs: int) -> None:
    if reg.current(name) is not None:
        _say(f"serving existing model {name}/{reg.current(name)} from {reg.root}")
        return
    from training.config import load_train_config
    from training.export import export
    from training.train import train

    splits = {f"dataset.{s}": str(data_dir / f"{s}.parquet") for s in ("train", "valid", "test")}
    out = Path("runs") / f"demo-{name}"
    cfg = load_train_config(
        _configs_dir() / "ecommerce_mmoe.yaml",
        # Smaller batches and a higher rate than the 1M-row config: ~100k rows get enough steps.
        {
            **splits,
            "epochs": epochs,
            "batch_size": 512,
            "lr": 0.003,
            "out_dir": str(out),
            "seed": SEED,
        },  # fmt: skip
    )
    _say(f"no model under {reg.root}/{name}: training an MMoE ({epochs} epochs) ...")
    t0 = time.perf_counter()
    result = train(cfg, out)
    m = result.metrics
    _say(
        f"  trained in {time.perf_counter() - t0:.0f}s: valid ctr AUC {m.get('ctr_auc', 0):.3f}, "
        f"cvr AUC (clicked) {m.get('cvr_auc', 0):.3f}"
    )
    mv = export(result.best_checkpoint, name, reg.root)
    _say(f"  exported and promoted {name}/{mv.version} (ONNX parity checked)")


def ensure_snapshot(reg: Registry, name: str, data_dir: Path, impressions: int) -> None:
    spec = FeatureSpec.load(reg.resolve(name).path)
    found = reg.latest_snapshot(name, spec.sha256())
    if found is not None:
        _say(f"using feature snapshot {found}")
        return
    ensure_data(data_dir, impressions)
    from training.features import build_snapshot, read_table

    snap = build_snapshot(
        spec, read_table(data_dir / "users.parquet"), read_table(data_dir / "items.parquet")
    )
    path = snap.save(reg.snapshot_dir(name) / f"{snap.version}.npz")
    _say(
        f"built feature snapshot: {len(snap.user_ids)} users, {len(snap.item_ids)} items -> {path}"
    )


def needs_recall(reg: Registry, name: str) -> bool:
    """Whether the recall model or its histories are missing (and must come from the logs)."""
    return reg.current(name) is None or latest_history(reg.model_dir(name) / HISTORY_DIR) is None


def ensure_recall(reg: Registry, name: str, data_dir: Path, epochs: int) -> None:
    if reg.current(name) is not None:
        _say(f"serving existing recall model {name}/{reg.current(name)} from {reg.root}")
        return
    from training.recall.config import load_recall_config
    from training.recall.publish import publish_recall
    from training.recall.train import train

    out = Path("runs") / f"demo-{name}"
    # The committed config at its own sizes; only the data and the epoch budget differ. The path
    # is absolute: a relative data_dir in an override is not re-based on the YAML's folder.
    cfg = load_recall_config(
        _configs_dir() / "recall_dssm.yaml",
        {"data.data_dir": str(data_dir.resolve()), "epochs": epochs, "out_dir": str(out),
         "seed": SEED},
    )  # fmt: skip
    _say(f"no recall model under {reg.root}/{name}: training a DSSM ({epochs} epochs at most) ...")
    t0 = time.perf_counter()
    result = train(cfg, out, log=False)
    m = result.metrics
    _say(
        f"  trained in {time.perf_counter() - t0:.0f}s: valid recall@100 "
        f"{m.get('recall@100', 0):.3f}, recall@500 {m.get('recall@500', 0):.3f}"
    )
    mv = publish_recall(result.best_checkpoint, reg.root, name, index="flat", promote=True)
    count = mv.metadata()["index"]["count"]
    _say(f"  published and promoted {name}/{mv.version} (flat index of {count} items)")


def ensure_history(reg: Registry, name: str, data_dir: Path) -> None:
    directory = reg.model_dir(name) / HISTORY_DIR
    found = latest_history(directory)
    if found is not None:
        _say(f"using user histories {found}")
        return
    from training.recall.history import build_history

    hist = build_history(data_dir, max_len=HISTORY_MAX_LEN)
    path = hist.save(directory / f"{hist.version}.npz")
    _say(f"built user histories: {len(hist.user_ids)} users, {len(hist.items)} clicks -> {path}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrank demo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root", type=Path, default=Path("models"), help="model registry")
    p.add_argument("--name", default="ecommerce", help="model name")
    p.add_argument("--data", type=Path, default=Path("data/ecommerce"), help="synthetic logs")
    p.add_argument("--impressions", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=2, help="ranking model epochs")
    p.add_argument("--recall-name", default="recall", help="recall model name")
    p.add_argument("--recall-epochs", type=int, default=5, help="recall model epochs (at most)")
    p.add_argument("--no-recall", action="store_true", help="no recall model: /rank only")
    p.add_argument("--no-serve", action="store_true", help="prepare everything, do not serve")
    args = p.parse_args(argv)
    reg = Registry(args.root)
    try:
        recall = not args.no_recall
        if reg.current(args.name) is None or (recall and needs_recall(reg, args.recall_name)):
            ensure_data(args.data, args.impressions)
        ensure_model(reg, args.name, args.data, args.epochs)
        ensure_snapshot(reg, args.name, args.data, args.impressions)
        if recall:
            ensure_recall(reg, args.recall_name, args.data, args.recall_epochs)
            ensure_history(reg, args.recall_name, args.data)
    except ModuleNotFoundError as e:
        print(
            f"[demo] training a model needs the 'train' extra ({e.name} is missing): "
            "pip install 'mtrank[train]' (make demo does this)",
            file=sys.stderr,
        )
        return 2
    if args.no_serve:
        _say("ready; not serving (--no-serve)")
        return 0
    # The embedded store is the default: no MTRANK_REDIS_URL means the snapshot file in memory.
    os.environ.setdefault("MTRANK_MODEL_DIR", str(args.root))
    os.environ.setdefault("MTRANK_MODEL_NAMES", args.name)
    stores = "feature store"
    if recall:  # histories: the newest file under models/RECALL/histories/
        os.environ.setdefault("MTRANK_RECALL_MODEL", args.recall_name)
        stores = "feature and history stores"
    _say(f"starting the service on the embedded {stores} (set MTRANK_REDIS_URL for Redis)")
    from service.cli import main as serve

    return serve(["--host", args.host, "--port", str(args.port)])
