"""The training loop: config -> data -> model -> weighted losses -> best checkpoint.

    mtrank train --config training/configs/x.yaml [--set model.type=ple --set lr=3e-4] [--out DIR]
    torchrun --nproc_per_node 2 -m training.train --config ...      (DistributedDataParallel)

Model-agnostic on purpose: a model turns a batch into per-task losses (``compute_losses``), a
weighting strategy (training/losses.py) turns those into one backward pass, and nothing here
knows which architecture or which strategy it runs.

Before the first step every output starts at its task's base rate in the train split
(``init_output_bias``, models.base). The validation split is scored with training/evaluate.py at
the end of each epoch and, with ``validation.every_steps: K``, every K steps: each scoring is a
validation point in ``OUT/history.json``. With ``weight_averaging`` the validated (and saved,
and exported) weights are the moving average of the iterates (training/optim.py). Early stopping
watches ``early_stopping.metric`` (``valid_loss`` or any flat metric such as ``ctr_auc``) and
counts its patience in validation points. The best point is saved to ``OUT/best.pt`` with
everything needed to rebuild the model without the config file (the resolved config, the feature
spec, epoch and step, its metrics, the learned loss weights, the base rates and the output biases
they set), and the returned model is restored to it. Optimisers, the learning-rate schedule and
the embedding penalty: training/optim.py.

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

from mtrank.spec import OOV_INDEX
from training.checkpoint import BEST, save_checkpoint
from training.config import ConfigError, TrainConfig, load_train_config
from training.data import Batch, Encoded, PreparedData, label_base_rates
from training.evaluate import evaluate, lower_is_better
from training.losses import Weighting, build_weighting
from training.models import MultiTaskModel, build_model
from training.optim import (
    FrequencyRegularizer,
    WeightAverage,
    build_optimizers,
    lr_factor,
    set_lr,
    step,
)
from training.pretrained import FrozenRows, init_embeddings
from training.reports import to_json
from training.warm_start import (
    WarmStart,
    load_warm_weights,
    prepare_warm_start,
    with_checkpoint_model,
)

log = logging.getLogger(__name__)
HISTORY = "history.json"
_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


@dataclass(frozen=True)
class TrainResult:
    """What a run left behind. ``metrics`` are the best validation point's metrics."""

    best_checkpoint: Path
    history: Path
    metrics: dict[str, float]
    best_epoch: int
    best_step: int
    epochs_run: int
    validations: int
    stopped_early: bool
    # the objects restored to the best validation point (what best.pt holds), for in-process
    # callers and tests
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


class IdDropout:
    """Replaces a sparse column's value by the OOV index with a per-column probability.

    The OOV row otherwise learns only from the few train rows whose id fell under ``min_count``,
    while at serving it stands for every id the model never saw (items first listed after the
    train split). Dropping a small share of known ids trains it on the average id instead. The
    draw is seeded by the run's seed and the rank, so runs repeat exactly.
    """

    def __init__(self, probs: dict[str, float], columns: list[str], seed: int, rank: int) -> None:
        kept = {n: p for n, p in probs.items() if p > 0}
        self.cols = torch.tensor([columns.index(n) for n in kept], dtype=torch.int64)  # (K,)
        self.probs = torch.tensor(list(kept.values()), dtype=torch.float32)  # (K,)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def __call__(self, sparse: Tensor) -> Tensor:
        if len(self.cols) == 0:
            return sparse
        drop = torch.rand(len(sparse), len(self.cols), generator=self.gen) < self.probs  # (B, K)
        out = sparse.clone()
        cols = self.cols.to(sparse.device)
        out[:, cols] = out[:, cols].masked_fill(drop.to(sparse.device), OOV_INDEX)
        return out


# ---------------------------------------------------------------- the loop
class EarlyStopper:
    """Tracks the best value of one metric and how many validation points it has not improved."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric, self.patience = metric, patience
        self.minimise = lower_is_better(metric)
        self.best = math.inf if self.minimise else -math.inf
        self.bad_points = 0

    def improved(self, value: float) -> bool:
        """Record one validation point's value; True when it is the best so far (NaN never is)."""
        better = value < self.best if self.minimise else value > self.best
        if better:  # NaN compares False either way
            self.best, self.bad_points = value, 0
            return True
        self.bad_points += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_points >= self.patience


class _Window:
    """Mean task losses and loss weights over the steps since the last validation point."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = tasks
        self.reset()

    def reset(self) -> None:
        self.loss = dict.fromkeys(self.tasks, 0.0)
        self.weight = dict.fromkeys(self.tasks, 0.0)
        self.penalty, self.steps = 0.0, 0

    def add(self, losses: dict[str, float], weights: dict[str, float], penalty: float) -> None:
        for t in self.tasks:
            self.loss[t] += losses[t]
            self.weight[t] += weights[t]
        self.penalty += penalty
        self.steps += 1

    def means(self) -> tuple[dict[str, float], dict[str, float], float]:
        k = max(self.steps, 1)
        loss = {t: v / k for t, v in self.loss.items()}
        return loss, {t: v / k for t, v in self.weight.items()}, self.penalty / k


def _batches(cfg: TrainConfig, train: Encoded, epoch: int, c: Cluster) -> Iterator[Batch]:
    return train.batches(
        cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, rank=c.rank, world_size=c.world_size
    )


def planned_steps(cfg: TrainConfig, train_rows: int, world_size: int) -> int:
    """Optimiser steps of the whole run if it is not stopped early (the schedule's horizon)."""
    per_epoch = math.ceil(train_rows // world_size / cfg.batch_size)
    total = cfg.epochs * per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


def _average_grads(module: nn.Module, c: Cluster) -> None:
    """DDP averages the model's gradients; learned loss weights live outside it, so do theirs."""
    if c.world_size <= 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= c.world_size


def train(
    cfg: TrainConfig,
    out_dir: Path,
    data: PreparedData | None = None,
    init_from: Path | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data`` (prepared from ``cfg.dataset`` when None) into ``out_dir``;
    ``init_from``: warm-start from that checkpoint (training/warm_start.py)."""
    c = join_cluster(cfg.device)
    try:
        return _train(cfg, Path(out_dir), data, c, init_from)
    finally:
        if c.owns_group:
            dist.destroy_process_group()


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of ``module``'s state: the best validation point, restored at the end."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _train(
    cfg: TrainConfig, out: Path, data: PreparedData | None, c: Cluster, init_from: Path | None
) -> TrainResult:
    if data is None:
        data = _prepare(cfg, c)
    warm = None
    if init_from is not None:
        warm, data = prepare_warm_start(init_from, data)
        cfg = with_checkpoint_model(cfg, warm)
    if cfg.early_stopping.metric != "valid_loss" and data.valid is None:
        raise ConfigError(
            f"early_stopping.metric {cfg.early_stopping.metric!r} needs a valid split"
        )
    if c.main:
        out.mkdir(parents=True, exist_ok=True)
    return _Run(cfg, out, data, c, warm).run()


class _Run:
    """One training run: the set-up, the step, the validation point and the loop over epochs."""

    def __init__(
        self, cfg: TrainConfig, out: Path, data: PreparedData, c: Cluster,
        warm: WarmStart | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.out, self.data, self.c = cfg, out, data, c
        set_seed(cfg.seed)
        model = build_model(cfg, data.spec)
        if warm is not None:
            rows = load_warm_weights(model, warm)
            log.info("warm start from %s: %d embedding rows kept, new ids %s",
                     warm.checkpoint, rows, warm.added)  # fmt: skip
        self.frozen: list[FrozenRows] = []
        if cfg.model.init_embeddings:
            loaded, self.frozen = init_embeddings(model, data.spec, cfg.model.init_embeddings)
            for x in loaded:
                log.info(
                    "init_embeddings %s: %d of %d ids from %s (%s)",
                    x.field,
                    x.known,
                    x.vocab,
                    x.path,
                    "frozen" if x.freeze else "fine-tuned",
                )
        # every rank reads the whole train split, so all compute the same rates and biases
        self.base_rates = label_base_rates(data.train, cfg.dataset.tasks)
        # a warm start keeps the trained output biases (training/warm_start.py)
        init_bias = cfg.init_output_bias and warm is None
        self.output_bias = model.init_output_bias(self.base_rates) if init_bias else {}
        self.model = model.to(c.device)
        self.weighting = build_weighting(cfg, model.task_kinds).to(c.device)
        # before DDP wraps the model: a sparse embedding optimiser changes the tables' gradients
        self.opts = build_optimizers(cfg, self.model, list(self.weighting.parameters()))
        self.penalty: FrequencyRegularizer | None = None
        reg = cfg.embedding_regularization
        if reg.type == "frequency" and reg.weight > 0:
            counts = data.train.id_counts([f.vocab_size for f in data.spec.sparse])
            self.penalty = FrequencyRegularizer.for_model(self.model, counts, reg.weight)
        decay = cfg.weight_averaging.decay
        self.average = WeightAverage(self.model, decay) if decay > 0 else None
        self.net: nn.Module = self.model
        if c.world_size > 1:
            ids = [c.device.index] if c.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.id_dropout = IdDropout(
            cfg.id_dropout, [f.name for f in data.spec.sparse], cfg.seed, c.rank
        )
        self.total_steps = planned_steps(cfg, len(data.train), c.world_size)
        self.stopper = EarlyStopper(cfg.early_stopping.metric, cfg.early_stopping.patience)
        self.window = _Window(self.model.task_names)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}  # metrics, epoch, step and states of the best point
        self.step = 0

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimiser step on ``batch``; returns the task losses."""
        set_lr(self.opts, lr_factor(self.step, self.cfg.lr_schedule, self.total_steps))
        sparse, dense, labels = to_device(batch, self.c.device)
        sparse = self.id_dropout(sparse)
        losses = self.model.compute_losses(self.net(sparse, dense), labels)
        penalty = self.penalty(sparse) if self.penalty is not None else None
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        weights = self.weighting.backward(losses, self.model, penalty)
        _average_grads(self.weighting, self.c)
        step(self.opts)
        for rows in self.frozen:
            rows.restore()
        if self.average is not None:
            self.average.update(self.model)
        self.step += 1
        values = {t: v.item() for t, v in losses.items()}
        self.window.add(values, weights, 0.0 if penalty is None else penalty.item())
        return values

    @property
    def kept(self) -> MultiTaskModel:
        """The weights that are validated and saved: the moving average, or the last iterate."""
        return self.model if self.average is None else self.average.module

    def validate_point(self, epoch: int, epoch_end: bool) -> bool:
        """Score the valid split at this step and keep the best point; True: stop training."""
        cfg, c = self.cfg, self.c
        train_loss, weights, penalty = self.window.means()
        self.window.reset()
        metrics = _validate(cfg, self.kept, self.data, c, train_loss)
        if self.stopper.metric not in metrics:
            raise ConfigError(
                f"early_stopping.metric {self.stopper.metric!r} is not one of {sorted(metrics)}"
            )
        value = metrics[self.stopper.metric]
        improved = self.stopper.improved(value)
        lr = cfg.lr * lr_factor(max(self.step - 1, 0), cfg.lr_schedule, self.total_steps)
        row: dict[str, Any] = {"epoch": epoch, "step": self.step, "epoch_end": epoch_end}
        row |= {"lr": lr, "train_loss": train_loss, "loss_weights": weights}
        if self.penalty is not None:
            row["embedding_penalty"] = penalty
        self.history.append({**row, "valid": metrics, "best": improved})
        log.info(
            "epoch %d step %d  %s=%.5f%s  loss weights %s",
            epoch,
            self.step,
            self.stopper.metric,
            value,
            " (best)" if improved else "",
            {t: round(w, 4) for t, w in weights.items()},
        )
        if improved or not self.best:  # a NaN first point is still saved: best.pt must exist
            self.best = {"metrics": metrics, "epoch": epoch, "step": self.step}
            self.best |= {"model": _snapshot(self.kept), "weighting": _snapshot(self.weighting)}
            if c.main:
                save_checkpoint(
                    self.out / BEST,
                    self.kept,
                    self.weighting,
                    cfg,
                    self.data.spec,
                    epoch=epoch,
                    step=self.step,
                    metrics=metrics,
                    loss_weights=weights,
                    data_fingerprint=self.data.fingerprint,
                    base_rates=self.base_rates,
                    output_bias=self.output_bias,
                )
        if c.main:
            (self.out / HISTORY).write_text(json.dumps(to_json(self.history), indent=1))
        return self.stopper.stop

    def run_epoch(self, epoch: int) -> bool:
        """One pass over this rank's shard, validating every K steps; True: stop training."""
        cfg, c, every = self.cfg, self.c, self.cfg.validation.every_steps
        self.net.train()
        n_batches = math.ceil(len(self.data.train) // c.world_size / cfg.batch_size)
        # disable=None: draw only on a terminal (logs and CI stay readable), and only on rank 0
        bar = tqdm(
            total=n_batches, desc=f"epoch {epoch}", disable=None if c.main else True, leave=False
        )
        t0, seen, k = time.perf_counter(), 0, 0
        try:
            for batch in _batches(cfg, self.data.train, epoch, c):
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    break
                values = self.train_step(batch)
                seen, k = seen + len(batch.sparse), k + 1
                rate = seen * c.world_size / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(
                    {**{t: f"{v:.4f}" for t, v in values.items()}, "rows/s": f"{rate:.0f}"}
                )
                bar.update(1)
                if every is not None and self.step % every == 0:
                    if self.validate_point(epoch, epoch_end=k == n_batches):
                        return True
        finally:
            bar.close()
        # the steps since the last point: an epoch (or a max_steps cut) ends with a point
        return self.window.steps > 0 and self.validate_point(epoch, epoch_end=k == n_batches)

    def run(self) -> TrainResult:
        epoch, stopped = 0, False
        for epoch in range(1, self.cfg.epochs + 1):
            stopped = self.run_epoch(epoch)
            if stopped or (self.cfg.max_steps is not None and self.step >= self.cfg.max_steps):
                break
        if not self.history:  # no step was taken (an empty split): best.pt must still exist
            self.validate_point(epoch, epoch_end=True)
        self.model.load_state_dict(self.best["model"])  # the best point, as best.pt holds it
        self.weighting.load_state_dict(self.best["weighting"])
        return TrainResult(
            self.out / BEST,
            self.out / HISTORY,
            self.best["metrics"],
            self.best["epoch"],
            self.best["step"],
            epoch,
            len(self.history),
            stopped,
            self.model,
            self.weighting,
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
    parser.add_argument(
        "--init-from", type=Path, default=None, metavar="CHECKPOINT",
        help="warm-start: the checkpoint's weights, its vocabularies grown with the new ids",
    )  # fmt: skip
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
        result = train(cfg, out, init_from=args.init_from)
    except ConfigError as e:
        log.error("mtrank train: %s", e)
        return 2
    log.info(
        "best point: epoch %d step %d: %s",
        result.best_epoch,
        result.best_step,
        result.best_checkpoint,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
