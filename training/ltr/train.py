"""Train, export and publish a learned fusion (``mtrank train-ltr``).

    mtrank train-ltr --config training/configs/ltr_lambdamart.yaml [--version V] [--promote]

    config -> the ranker's outputs on the train and valid splits (training/ltr/data.py)
           -> LambdaMART (LightGBM lambdarank), BPR (torch) or the single-model baseline
           -> metrics on the valid split (training/ltr/evaluate.py)
           -> ltr.onnx, parity-gated, published as NAME/VERSION (training/ltr/export.py)

The trainer is chosen by the config's ``trainer``; each one lives in its own module and returns
a :class:`training.ltr.export.Trained`, so nothing downstream depends on which it was.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.ltr_artefact import Trainer
from mtrank.registry import ModelVersion, RegistryError
from training.config import ConfigError
from training.ltr import bpr, lambdamart
from training.ltr.config import LtrConfig, load_ltr_config
from training.ltr.data import LtrSplit, load_split, open_source
from training.ltr.evaluate import DEFAULT_K, split_metrics
from training.ltr.export import LtrExportError, Trained, bpr_to_onnx, export_ltr
from training.ltr.relevance import Relevance


def fit_lambdamart(
    cfg: LtrConfig, train: LtrSplit, valid: LtrSplit, relevance: Relevance
) -> Trained:
    """LightGBM lambdarank on ``train``'s labels (relevance applied), early-stopped on valid."""
    fitted = lambdamart.train_lambdamart(train, valid, cfg.lambdamart, relevance.gains, cfg.seed)
    booster = lambdamart.float32_exact(fitted)  # scores as fitted does; exact in ONNX
    trees = booster.num_trees()
    return Trained(
        cfg.trainer, "features" if cfg.trainer == "single_model" else "fusion", train.inputs,
        native=lambda x: lambdamart.predict(booster, x),
        graph=lambdamart.to_onnx(booster, train.x.shape[1]),
        info={"trees": trees, "importance_gain": dict(zip(
            train.inputs, booster.feature_importance("gain").tolist(),
            strict=True))},
    )  # fmt: skip


def fit_bpr(cfg: LtrConfig, train: LtrSplit, valid: LtrSplit, relevance: Relevance) -> Trained:
    """BPR on pairs of ``train`` ordered by their labels' gains (valid is not used)."""
    log: list[dict[str, float]] = []
    model = bpr.train_bpr(train, cfg.bpr, relevance.gains, cfg.seed, log)
    return Trained(
        cfg.trainer, "fusion", train.inputs, native=lambda x: bpr.predict(model, x),
        graph=bpr_to_onnx(model, train.x.shape[1]), info={"epochs": log},
    )  # fmt: skip


FITTERS: dict[Trainer, Callable[[LtrConfig, LtrSplit, LtrSplit, Relevance], Trained]] = {
    "lambdamart": fit_lambdamart,
    "single_model": fit_lambdamart,  # the same learner on the encoded features
    "bpr": fit_bpr,
}


def train_ltr(cfg: LtrConfig, base: Path) -> tuple[ModelVersion, dict[str, Any]]:
    """The whole pipeline for one config (module docstring); returns the version and a report."""
    t0 = time.perf_counter()
    source = open_source(cfg, base)
    train = load_split(cfg, source, cfg.train_split)
    valid = load_split(cfg, source, cfg.valid_split)
    relevance = Relevance.fit(cfg, train)
    t_data = time.perf_counter()
    trained = FITTERS[cfg.trainer](cfg, relevance.apply(train), relevance.apply(valid), relevance)
    t_fit = time.perf_counter()
    scores = trained.native(valid.x)
    metrics = {
        f"{cfg.valid_split}_{k}": v
        for k, v in split_metrics(scores, valid, relevance, cfg.grades, DEFAULT_K).items()
    }
    mv = export_ltr(cfg, trained, valid.x, metrics, source.ranker, relevance=relevance)
    report = {
        "model": f"{mv.name}/{mv.version}",
        "trainer": cfg.trainer,
        "inputs": list(train.inputs),
        "train_rows": len(train),
        "train_groups": int(len(train.sizes)),
        "grade_counts": {
            str(g): int(c)
            for g, c in zip(*np.unique(train.grades, return_counts=True), strict=True)
        },
        "metrics": metrics,
        "parity": mv.metadata()["parity"],
        "seconds": {
            "data": t_data - t0,
            "fit": t_fit - t_data,
            "export": time.perf_counter() - t_fit,
        },
        "promoted": cfg.promote,
    }
    return mv, report


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrank train-ltr", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--promote", action="store_true", help="point NAME/current at the version")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    try:
        cfg = load_ltr_config(args.config)
        if args.promote:
            cfg = cfg.model_copy(update={"promote": True})
        mv, report = train_ltr(cfg, args.config.parent)
    except (ConfigError, RegistryError, LtrExportError, ValueError, OSError) as e:
        sys.stderr.write(f"mtrank train-ltr: {e}\n")
        return 1
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items())
    state = "promoted to current" if cfg.promote else "not promoted"
    sys.stdout.write(
        f"published {report['model']} ({cfg.trainer} over {len(report['inputs'])} inputs, "
        f"{report['train_rows']} rows in {report['train_groups']} groups; parity "
        f"{report['parity']['max_error']:.2g}): {state}\n{metrics}\n"
    )
    return 0
