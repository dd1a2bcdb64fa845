"""Learned-fusion models for the tests, trained and published by the real LTR pipeline.

:func:`toy_split` draws request groups whose inputs are named like the fusion namespace (ctr,
cvr, price, quality, promoted) and whose grades come from a known relevance, so a model trained
on them learns something a test can check in seconds. :func:`publish_toy` fits one trainer on it
and publishes it through the parity-gated export into a test's registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtrank.ltr_artefact import Trainer
from mtrank.registry import ModelVersion, Registry
from training.ltr.config import BprConfig, LambdaMartConfig, LtrConfig
from training.ltr.data import LtrSplit, grade_labels
from training.ltr.export import Trained, export_ltr
from training.ltr.relevance import Relevance
from training.ltr.train import FITTERS

TOY_INPUTS = ("ctr", "cvr", "price", "quality", "promoted")
SMALL_TREES = LambdaMartConfig(num_trees=30, num_leaves=7, max_depth=3, min_data_in_leaf=20)
SMALL_BPR = BprConfig(hidden_units=[8], epochs=2, batch_size=512)


def toy_split(n_groups: int = 150, size: int = 20, seed: int = 0) -> LtrSplit:
    """``n_groups`` requests of ``size`` rows; P(click) = ctr, P(buy | click) = cvr."""
    rng = np.random.default_rng(seed)
    n = n_groups * size
    ctr = rng.beta(1.0, 8.0, n)
    cvr = rng.beta(1.0, 4.0, n)
    x = np.stack([ctr, cvr, rng.lognormal(3.0, 0.8, n), rng.random(n),
                  (rng.random(n) < 0.1).astype(np.float64)], axis=1)  # fmt: skip
    click = rng.random(n) < np.minimum(1.0, 3 * ctr)  # denser than life: a test has few rows
    labels = {
        "click": click.astype(np.float64),
        "cart": (click & (rng.random(n) < 0.3)).astype(np.float64),
        "purchase": (click & (rng.random(n) < cvr)).astype(np.float64),
    }
    grades = grade_labels(labels, {"impression": 0, "click": 1, "cart": 2, "purchase": 3})
    env = {name: x[:, j] for j, name in enumerate(TOY_INPUTS)}
    return LtrSplit(
        x.astype(np.float32), TOY_INPUTS, grades, np.repeat(np.arange(n_groups), size),
        np.full(n_groups, size, dtype=np.int64), env, labels, {},
    )  # fmt: skip


def toy_config(root: Path, trainer: Trainer = "lambdamart", name: str = "fusion") -> LtrConfig:
    return LtrConfig(
        name=name, root=str(root), trainer=trainer, dataset="unused.yaml",
        ranker=None if trainer == "single_model" else "unused", lambdamart=SMALL_TREES,
        bpr=SMALL_BPR, parity_rows=500,
    )  # fmt: skip


def fit_toy(trainer: Trainer = "lambdamart", seed: int = 0) -> Trained:
    cfg = toy_config(Path("unused"), trainer)
    train = toy_split(seed=seed)
    return FITTERS[trainer](cfg, train, toy_split(40, seed=seed + 100), Relevance.fit(cfg, train))


def publish_toy(
    root: Path, trainer: Trainer = "lambdamart", name: str = "fusion"
) -> tuple[ModelVersion, Trained]:
    """A toy model of ``trainer`` published (and promoted) as ``root/name``."""
    cfg = toy_config(root, trainer, name).model_copy(update={"promote": True})
    trained = fit_toy(trainer)
    valid = toy_split(40, seed=100)
    mv = export_ltr(cfg, trained, valid.x, {"valid_ndcg@20": 0.5}, None, Registry(root))
    return mv, trained
