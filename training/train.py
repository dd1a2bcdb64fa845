"""The training loop: config -> data -> model -> weighted losses -> best checkpoint.

    mtrank train --config training/configs/x.yaml [--set model.type=ple --set lr=3e-4] [--out DIR]
    torchrun --nproc_per_node 2 -m training.train --config ...      (DistributedDataParallel)

Model-agnostic on purpose: a model turns a batch into per-task losses (``compute_losses``), a
weighting strategy (training/losses.py) turns those into one backward pass, and nothing here
knows which architecture or which strategy it runs. Each epoch is validated with
training/evaluate.py; early stopping watches ``early_stopping.metric`` (``valid_loss`` or any flat
metric such as ``ctr_auc``). The best epoch is saved to ``OUT/best.pt`` with everything needed to
rebuild the model without the config file: the resolved config, the feature spec, the epoch,
its metrics and the learned loss weights.

Under torchrun (``WORLD_SIZE`` > 1) every rank trains on its own shard (``batches(rank=,
world_size=)``; shards have equal length, so ranks take the same number of steps), DDP averages
gradients (gloo on CPU, nccl on CUDA), every rank validates on the whole validation split (so all
ranks take the same early-stopping decision without talking), and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.checkpoint import BEST, save_checkpoint
from training.config import ConfigError, TrainConfig, load_train_config
from training.data import Batch, Encoded, PreparedData
from training.evaluate import evaluate, lower_is_better
from training.losses import Weighting, build_weighting
from training.models import MultiTaskModel, build_model
from training.reports import to_json

log = logging.getLogger(__name__)
HISTORY = "history.json"
_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


@dataclass(frozen=True)
class TrainResult:
    """What a run left behind. ``metrics`` are the best epoch's validation metrics."""

    best_checkpoint: Path
    history: Path
    metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    # the objects at the END of training (not the best epoch): for in-process callers and tests
    model: MultiTaskModel = field(repr=False, compare=False)
    weighting: Weighting = field(repr=False, compare=False)


@dataclass(frozen=True)
class Cluster:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- set-up
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch: the same seed gives the same weights on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def join_cluster(device_choice: str) -> Cluster:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1, else a one-process cluster."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world <= 1:
        return Cluster(device=device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Cluster(dist.get_rank(), dist.get_world_size(), device, owns)


def to_device(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    sparse = torch.from_numpy(np.asarray(batch.sparse)).to(device)  # (B, S) int64
    dense = torch.from_numpy(np.asarray(batch.dense)).to(device)  # (B, D) float32
    labels = {t: torch.from_numpy(np.asarray(y)).to(device) for t, y in batch.labels.items()}
    return sparse, dense, labels


# ---------------------------------------------------------------- the loop
class EarlyStopper:
    """Tracks the best value of one metric and how many epochs it has not improved."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric, self.patience = metric, patience
        self.minimise = lower_is_better(metric)
        self.best = math.inf if self.minimise else -math.inf
        self.bad_epochs = 0

    def improved(self, value: float) -> bool:
        """Record one epoch's value; True when it is the best so far (NaN never is)."""
        better = value < self.best if self.minimise else value > self.best
        if better:  # NaN compares False either way
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience


def _batches(cfg: TrainConfig, train: Encoded, epoch: int, c: Cluster) -> Iterator[Batch]:
    return train.batches(
        cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, rank=c.rank, world_size=c.world_size
    )


def _run_epoch(
    cfg: TrainConfig,
    net: nn.Module,
    model: MultiTaskModel,
    weighting: Weighting,
    opt: torch.optim.Optimizer,
    train: Encoded,
    epoch: int,
    c: Cluster,
    step: int,
) -> tuple[dict[str, float], dict[str, float], int]:
    """One pass over this rank's shard: mean task losses, mean loss weights, the new step."""
    net.train()
    loss_sum = dict.fromkeys(model.task_names, 0.0)
    weight_sum = dict.fromkeys(model.task_names, 0.0)
    n_steps, seen, t0 = 0, 0, time.perf_counter()
    total = math.ceil(len(train) // c.world_size / cfg.batch_size)
    # disable=None: draw only on a terminal (logs and CI stay readable), and only on rank 0
    bar = tqdm(total=total, desc=f"epoch {epoch}", disable=None if c.main else True, leave=False)
    for batch in _batches(cfg, train, epoch, c):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        sparse, dense, labels = to_device(batch, c.device)
        losses = model.compute_losses(net(sparse, dense), labels)
        opt.zero_grad(set_to_none=True)
        weights = weighting.backward(losses, model)
        _average_grads(weighting, c)
        opt.step()
        step, n_steps, seen = step + 1, n_steps + 1, seen + len(batch.sparse)
        values = {t: v.item() for t, v in losses.items()}
        for t, v in values.items():
            loss_sum[t] += v
            weight_sum[t] += weights[t]
        rate = seen * c.world_size / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix({**{t: f"{v:.4f}" for t, v in values.items()}, "rows/s": f"{rate:.0f}"})
        bar.update(1)
    bar.close()
    k = max(n_steps, 1)
    return {t: s / k for t, s in loss_sum.items()}, {t: s / k for t, s in weight_sum.items()}, step


def _average_grads(module: nn.Module, c: Cluster) -> None:
    """DDP averages the model's gradients; learned loss weights live outside it, so do theirs."""
    if c.world_size <= 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= c.world_size


def train(cfg: TrainConfig, out_dir: Path, data: PreparedData | None = None) -> TrainResult:
    """Train ``cfg`` on ``data`` (prepared from ``cfg.dataset`` when None) into ``out_dir``."""
    c = join_cluster(cfg.device)
    try:
        return _train(cfg, Path(out_dir), data, c)
    finally:
        if c.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, out: Path, data: PreparedData | None, c: Cluster) -> TrainResult:
    if data is None:
        data = _prepare(cfg, c)
    if cfg.early_stopping.metric != "valid_loss" and data.valid is None:
        raise ConfigError(
            f"early_stopping.metric {cfg.early_stopping.metric!r} needs a valid split"
        )
    if c.main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    model = build_model(cfg, data.spec).to(c.device)
    weighting = build_weighting(cfg, model.task_kinds).to(c.device)
    net: nn.Module = model
    if c.world_size > 1:
        ids = [c.device.index] if c.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    params = list(model.parameters()) + list(weighting.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    stopper = EarlyStopper(cfg.early_stopping.metric, cfg.early_stopping.patience)
    history: list[dict[str, Any]] = []
    best_metrics: dict[str, float] = {}
    best_epoch, step, stopped = 0, 0, False
    for epoch in range(1, cfg.epochs + 1):
        train_loss, weights, step = _run_epoch(
            cfg, net, model, weighting, opt, data.train, epoch, c, step
        )
        metrics = _validate(cfg, model, data, c, train_loss)
        if stopper.metric not in metrics:
            raise ConfigError(
                f"early_stopping.metric {stopper.metric!r} is not one of {sorted(metrics)}"
            )
        value = metrics[stopper.metric]
        improved = stopper.improved(value)
        row = {"epoch": epoch, "step": step, "train_loss": train_loss, "loss_weights": weights}
        history.append({**row, "valid": metrics, "best": improved})
        log.info(
            "epoch %d  %s=%.5f%s  loss weights %s",
            epoch,
            stopper.metric,
            value,
            " (best)" if improved else "",
            {t: round(w, 4) for t, w in weights.items()},
        )
        if improved or best_epoch == 0:  # a NaN first epoch is still saved: best.pt must exist
            best_metrics, best_epoch = metrics, epoch
            if c.main:
                save_checkpoint(
                    out / BEST,
                    model,
                    weighting,
                    cfg,
                    data.spec,
                    epoch=epoch,
                    step=step,
                    metrics=metrics,
                    loss_weights=weights,
                    data_fingerprint=data.fingerprint,
                )
        if c.main:
            (out / HISTORY).write_text(json.dumps(to_json(history), indent=1))
        if stopper.stop or (cfg.max_steps is not None and step >= cfg.max_steps):
            stopped = stopper.stop
            break
    return TrainResult(
        out / BEST, out / HISTORY, best_metrics, best_epoch, len(history), stopped, model, weighting
    )


def _prepare(cfg: TrainConfig, c: Cluster) -> PreparedData:
    """Encode the dataset; under DDP rank 0 builds the cache first and the others reuse it."""
    from training.data import prepare

    cache = Path(cfg.out_dir) / ".cache"
    if c.world_size > 1 and not c.main:
        dist.barrier()  # wait for rank 0 to finish writing the cache
    data = prepare(cfg.dataset, cache)
    if c.world_size > 1 and c.main:
        dist.barrier()
    return data


def _validate(
    cfg: TrainConfig,
    model: MultiTaskModel,
    data: PreparedData,
    c: Cluster,
    train_loss: dict[str, float],
) -> dict[str, float]:
    """Flat validation metrics with ``valid_loss``; without a valid split, the train loss."""
    if data.valid is None:
        return {"valid_loss": sum(train_loss.values())}
    report = evaluate(
        model,
        data.valid,
        cfg.dataset.tasks,
        batch_size=max(cfg.batch_size, 4096),
        device=str(c.device),
    )
    metrics = dict(report["metrics"])
    metrics["valid_loss"] = metrics.pop("loss")
    return metrics


# ---------------------------------------------------------------- command line
def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings -> {dotted key: YAML-typed value} (``lr=1e-3`` is a float)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        value = yaml.safe_load(raw)
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        out[key.strip()] = value
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtrank train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default from config)")
    args = parser.parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun, one rank reports
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        cfg = load_train_config(args.config, parse_overrides(args.set))
    except ConfigError as e:
        log.error("mtrank train: %s", e)
        return 2
    out = args.out or Path(cfg.out_dir) / f"{cfg.dataset.name}_{cfg.model.type}"
    try:
        result = train(cfg, out)
    except ConfigError as e:
        log.error("mtrank train: %s", e)
        return 2
    log.info("best epoch %d: %s", result.best_epoch, result.best_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
