"""Offline evaluation of a model on an encoded split: the numbers that decide what ships.

    mtrank evaluate --checkpoint runs/x/best.pt [--split test] [--out report.json]

Per task: AUC, logloss and calibration (mean prediction vs label rate, ECE) for binary tasks,
RMSE for regression, and GAUC over users when the data has groups. A task with ``depends_on``
predicts P(child | parent), so these are computed on the rows where the parent is positive. Per
funnel (a task with
``depends_on``, e.g. cvr on ctr):

- ``auc_clicked``: the child's AUC on impressions whose parent label is 1 (the classic CVR AUC);
- ``auc_entire_space``: the child's AUC on ALL impressions against the counterfactual truth
  column ``cf_<child label>`` (synthetic data knows whether a non-clicked user would have
  converted) -- the quantity ESMM claims to fix, measurable only when that truth exists;
- ``ctcvr_auc``: parent x child labels against the model's joint output when it has one (ESMM's
  ``ctcvr``), else against pParent x pChild.

The trainer calls :func:`evaluate` for validation, so early stopping can use any flat metric.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import load_checkpoint
from training.config import TaskColumn
from training.data import Encoded
from training.metrics import auc, calibration, gauc, logloss, rmse
from training.models.base import MultiTaskModel, funnel_pairs
from training.reports import write_report

log = logging.getLogger(__name__)

# flat metrics where smaller is better (everything else: larger is better)
LOWER_IS_BETTER = ("loss", "logloss", "rmse", "ece")


def lower_is_better(metric: str) -> bool:
    return metric.endswith(LOWER_IS_BETTER)


@torch.no_grad()
def predict_all(
    model: MultiTaskModel, data: Encoded, batch_size: int = 4096, device: str = "cpu"
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every output of ``model.predict`` over the split, and each task's mean loss."""
    was_training = model.training
    model.eval()
    preds: dict[str, list[np.ndarray]] = {n: [] for n in model.output_names}
    loss_sum = dict.fromkeys(model.task_names, 0.0)
    rows = dict.fromkeys(model.task_names, 0.0)  # rows each task's loss averages over
    for batch in data.batches(batch_size, shuffle=False):
        sparse = torch.from_numpy(np.asarray(batch.sparse)).to(device)  # (B, S)
        dense = torch.from_numpy(np.asarray(batch.dense)).to(device)  # (B, D)
        labels = {t: torch.from_numpy(np.asarray(v)).to(device) for t, v in batch.labels.items()}
        losses = model.compute_losses(model(sparse, dense), labels)
        for name, p in model.predict(sparse, dense).items():
            preds[name].append(p.float().cpu().numpy())
        for t, v in losses.items():
            k = model.loss_rows(t, labels)  # a conditional loss is a mean over fewer rows
            loss_sum[t] += v.item() * k
            rows[t] += k
    model.train(was_training)
    out = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in preds.items()}
    return out, {t: s / max(rows[t], 1.0) for t, s in loss_sum.items()}


def _task_report(
    task: TaskColumn, y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, bins: int
) -> dict[str, Any]:
    if task.kind == "regression":
        return {"rmse": rmse(y, p), "mean_pred": float(p.mean()), "mean_label": float(y.mean())}
    rep: dict[str, Any] = {"auc": auc(y, p), "logloss": logloss(y, p)}
    if groups is not None:
        rep["gauc"] = gauc(y, p, groups)
    rep["calibration"] = calibration(y, p, bins)
    return rep


def _funnel_report(
    parent: TaskColumn,
    child: TaskColumn,
    data: Encoded,
    preds: dict[str, np.ndarray],
    joint: str | None,
) -> dict[str, Any]:
    y_p = np.asarray(data.labels[parent.name], dtype=np.float64)  # (N,)
    y_c = np.asarray(data.labels[child.name], dtype=np.float64)  # (N,)
    p_c = preds[child.name]  # (N,)
    clicked = y_p >= 0.5
    rep: dict[str, Any] = {"parent": parent.name, "auc_clicked": auc(y_c[clicked], p_c[clicked])}
    truth = f"cf_{child.label}"
    if truth in data.truth:
        # Where the CVR is served: every impression, against the purchase that would follow a
        # click. Calibration and the bias of the mean show a selection-biased estimator.
        y_cf = np.asarray(data.truth[truth], dtype=np.float64)  # (N,)
        rep["auc_entire_space"] = auc(y_cf, p_c)
        rep["ece_entire_space"] = calibration(y_cf, p_c)["ece"]
        rep["mean_pred_entire_space"] = float(p_c.mean())
        rep["mean_truth_entire_space"] = float(y_cf.mean())
        rep["bias_entire_space"] = float(p_c.mean() - y_cf.mean())
        rep["truth_column"] = truth
    joint_pred = preds[joint] if joint is not None else preds[parent.name] * p_c  # (N,)
    rep["ctcvr_auc"] = auc(y_p * y_c, joint_pred)
    rep["ctcvr_source"] = joint if joint is not None else f"{parent.name} x {child.name}"
    return rep


def evaluate(
    model: MultiTaskModel,
    data: Encoded,
    tasks: Sequence[TaskColumn],
    batch_size: int = 4096,
    bins: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """The full report; ``report["metrics"]`` flattens it to ``<task>_<metric>`` floats."""
    preds, losses = predict_all(model, data, batch_size, device)
    groups = None if data.groups is None else np.asarray(data.groups)
    report: dict[str, Any] = {"rows": len(data.sparse), "loss": sum(losses.values())}
    report["losses"] = losses
    report["tasks"] = {}
    for t in tasks:
        y, p, g = np.asarray(data.labels[t.name]), preds[t.name], groups
        if t.depends_on is not None:
            # A conditional task predicts P(child | parent): judge it where the parent happened.
            rows = np.asarray(data.labels[t.depends_on]) >= 0.5
            y, p, g = y[rows], p[rows], None if g is None else g[rows]
        report["tasks"][t.name] = _task_report(t, y, p, g, bins)
    joints = {pc: name for name, pc in model.joint_outputs.items()}
    report["funnels"] = {
        child.name: _funnel_report(
            parent, child, data, preds, joints.get((parent.name, child.name))
        )
        for parent, child in funnel_pairs(tasks)
    }
    report["metrics"] = flat_metrics(report)
    return report


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``loss``, ``<task>_auc``, ``<task>_ece``, ``<child>_auc_clicked``, ... as plain floats."""
    flat: dict[str, float] = {"loss": float(report["loss"])}
    for task, rep in report["tasks"].items():
        for key, value in rep.items():
            if isinstance(value, int | float):
                flat[f"{task}_{key}"] = float(value)
        if "calibration" in rep:
            flat[f"{task}_ece"] = float(rep["calibration"]["ece"])
    for child, rep in report["funnels"].items():
        for key in (
            "auc_clicked",
            "auc_entire_space",
            "ece_entire_space",
            "bias_entire_space",
            "ctcvr_auc",
        ):
            if key in rep:
                flat[f"{child}_{key}"] = float(rep[key])
    return flat


class EvaluationError(RuntimeError):
    """The checkpoint and the data do not fit together (missing split, different vocabularies)."""


def evaluate_checkpoint(
    checkpoint: Path, split: str = "test", batch_size: int = 4096, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Load a checkpoint, re-encode its dataset with the same spec, and evaluate one split."""
    from training.data import prepare

    model, cfg, spec, ckpt = load_checkpoint(checkpoint)
    data = prepare(cfg.dataset, cache_dir or Path(cfg.out_dir) / ".cache")
    if data.spec.sha256() != spec.sha256():
        raise EvaluationError(
            f"{checkpoint}: the dataset now encodes differently from training (spec "
            f"{data.spec.sha256()[:12]} vs {spec.sha256()[:12]}): vocabularies changed"
        )
    encoded = {"train": data.train, "valid": data.valid, "test": data.test}.get(split)
    if encoded is None:
        raise EvaluationError(f"dataset {cfg.dataset.name!r} has no {split!r} split")
    report = evaluate(model, encoded, cfg.dataset.tasks, batch_size)
    report.update(checkpoint=str(checkpoint), split=split, epoch=ckpt.get("epoch"))
    report["model_type"] = cfg.model.type
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtrank evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--out", type=Path, default=None, help="report path (default: beside)")
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = evaluate_checkpoint(args.checkpoint, args.split, args.batch_size)
    except (EvaluationError, FileNotFoundError, ValueError) as e:
        log.error("mtrank evaluate: %s", e)
        return 1
    out = args.out or args.checkpoint.with_name(f"report_{args.split}.json")
    write_report(report, out)
    for key, value in sorted(report["metrics"].items()):
        log.info("%-28s %.5f", key, value)
    log.info("report: %s", out)
    return 0
