"""The recall training loop: config -> click sequences -> model -> retrieval loss -> checkpoint.

    mtrank train-recall training/configs/recall_dssm.yaml [--set model.output_dim=32] [--out DIR]

Model-agnostic: a model gives user vectors (``forward``) and item vectors (``item_vectors``), the
configured loss (training/recall/losses.py) turns them into one number, and nothing here knows
which architecture runs. After each epoch the validation split is scored by exact retrieval over
the whole catalog (training/recall/evaluate.py); early stopping watches
``early_stopping.metric`` (recall@100 by default) with patience counted in epochs. The best epoch
is saved to ``OUT/best.pt`` with its config, recall spec, catalog and metrics
(training/recall/checkpoint.py), ``OUT/history.json`` holds every validation point, and the
returned model is restored to the best epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from training.config import ConfigError
from training.recall.checkpoint import BEST, save_recall_checkpoint
from training.recall.config import RecallTrainConfig, load_recall_config
from training.recall.data import RecallData, prepare
from training.recall.evaluate import catalog_items, evaluate_model
from training.recall.losses import RetrievalLoss
from training.recall.models import RecallModel, build_recall_model
from training.reports import write_report

HISTORY = "history.json"


@dataclass(frozen=True)
class RecallTrainResult:
    """What a run left behind; ``metrics`` are the best validation point's."""

    best_checkpoint: Path
    history: Path
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    model: RecallModel = field(repr=False, compare=False)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def train(
    cfg: RecallTrainConfig, out_dir: Path, data: RecallData | None = None, log: bool = True
) -> RecallTrainResult:
    """Train ``cfg`` on ``data`` (prepared from ``cfg.data`` when None) into ``out_dir``."""
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    data = data if data is not None else prepare(cfg)
    if data.valid is None:
        raise ConfigError(f"{cfg.data.data_dir}: a recall run needs a valid split to stop on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_recall_model(cfg.model, data.spec).to(device)
    items = catalog_items(data.catalog, device)
    model.bind_catalog(items)
    loss_fn = RetrievalLoss(cfg.loss, data.catalog, items)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    ex = data.train

    def t(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    user_sparse, history, history_len, target = map(
        t, (ex.user_sparse, ex.history, ex.history_len, ex.target)
    )
    weight = t(1.0 + (cfg.loss.purchase_weight - 1.0) * ex.purchase.astype(np.float32))
    metric = cfg.early_stopping.metric  # hr, recall, ndcg: higher is better
    best, bad, best_epoch, step = -math.inf, 0, -1, 0
    points: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    stopped_early = False
    epoch = -1
    for epoch in range(cfg.epochs):
        model.train()
        order = t(np.random.default_rng([cfg.seed, epoch]).permutation(len(ex)))
        total, batches = 0.0, 0
        for lo in range(0, len(ex) - 1, cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            if len(idx) < 2:  # a softmax over one example has no negatives
                break
            u = model(user_sparse[idx], history[idx], history_len[idx])  # (B, D)
            loss = loss_fn(model, u, target[idx], weight[idx], gen)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            total, batches, step = total + loss.item(), batches + 1, step + 1
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        report = evaluate_model(
            model,
            data.catalog,
            data.valid,
            cfg.eval.ks,
            cfg.eval.exclude_seen,
            cfg.eval.batch_users,
        )
        value = report["metrics"][metric]
        points.append(
            {"epoch": epoch, "step": step, "train_loss": total / max(batches, 1),
             "scale": model.scale().item(), "valid": report["metrics"]}
        )  # fmt: skip
        if log:
            print(
                f"epoch {epoch}: loss {total / max(batches, 1):.4f}  valid {metric} {value:.4f}",
                file=sys.stderr,
            )
        if value > best:  # NaN never is
            best, bad, best_epoch = value, 0, epoch
            save_recall_checkpoint(
                out_dir / BEST, model, cfg, data.spec, data.catalog,
                epoch=epoch, step=step, metrics=report["metrics"], valid_users=report["users"],
            )  # fmt: skip
        else:
            bad += 1
            if bad >= cfg.early_stopping.patience:
                stopped_early = True
                break
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    seconds = time.perf_counter() - t0
    history_path = write_report({"points": points, "best_epoch": best_epoch}, out_dir / HISTORY)
    if best_epoch < 0:
        raise RuntimeError(f"no validation point improved on -inf ({metric} was NaN every time)")
    state = torch.load(out_dir / BEST, map_location=device, weights_only=True)["model_state"]
    model.load_state_dict(state)
    model.eval()
    return RecallTrainResult(
        best_checkpoint=out_dir / BEST,
        history=history_path,
        metrics=points[best_epoch]["valid"],
        best_epoch=best_epoch,
        epochs_run=epoch + 1,
        stopped_early=stopped_early,
        train_seconds=seconds,
        model=model,
    )


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrank train-recall", description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None, help="default: <out_dir>/<run name>")
    args = p.parse_args(argv)
    try:
        cfg = load_recall_config(args.config, _overrides(args.set))
    except ConfigError as e:
        print(f"mtrank train-recall: {e}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else Path(cfg.out_dir) / cfg.run_name
    result = train(cfg, out)
    print(
        json.dumps(
            {"best_checkpoint": str(result.best_checkpoint), "best_epoch": result.best_epoch,
             "epochs_run": result.epochs_run, "valid": result.metrics},
            indent=1,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
