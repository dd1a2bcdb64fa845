"""LambdaMART: gradient-boosted trees on the lambdarank objective, through LightGBM.

LambdaMART (Burges, "From RankNet to LambdaRank to LambdaMART: An Overview", MSR-TR-2010-82)
boosts regression trees on "lambdas": pairwise RankNet gradients within a group, each scaled by
the change in NDCG that swapping the pair would cause. LightGBM's ``objective=lambdarank``
implements it; groups are the requests (training/ltr/data.py), labels the integer grades (or
value levels: training/ltr/relevance.py) and ``label_gain`` the gain of each label. Early
stopping watches NDCG@K on the validation groups.

NDCG divides each group's lambdas by the group's ideal DCG, so every group with a pair weighs
the same: a request where a 500-unit item was bought counts no more than one where a 5-unit
item was. ``group_weight: ideal_dcg`` weighs each group by its ideal DCG, which makes the
objective DCG, i.e. value-weighted across groups; with value-graded purchases that is what GMV
needs (docs/benchmarks.md, learned fusion).

The booster is exported with onnxmltools (``convert_lightgbm``) to one ``TreeEnsembleRegressor``
(ai.onnx.ml), which onnxruntime runs without LightGBM installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightgbm as lgb
import numpy as np
import onnx
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType

from mtrank.ltr_artefact import INPUT_NAME
from training.ltr.config import LambdaMartConfig
from training.ltr.data import LtrSplit, informative_rows
from training.ltr.relevance import ideal_dcg

ONNX_OPSET = 15  # the highest default-domain opset onnxmltools' LightGBM converter supports


def params(cfg: LambdaMartConfig, gains: list[float], seed: int) -> dict[str, object]:
    """LightGBM parameters for ``cfg`` (deterministic for one seed and thread count)."""
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [cfg.eval_at],
        "label_gain": gains,
        "lambdarank_truncation_level": cfg.truncation_level,
        "num_leaves": cfg.num_leaves,
        "max_depth": cfg.max_depth,
        "learning_rate": cfg.learning_rate,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "feature_fraction": cfg.feature_fraction,
        "num_threads": cfg.num_threads,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


def group_weights(part: LtrSplit, gains: list[float], k: int) -> np.ndarray:
    """(n,) each row's group's ideal DCG@k, scaled to mean 1 over rows.

    LightGBM multiplies a row's lambda by its weight, and lambdarank's lambdas are NDCG changes
    (DCG changes divided by the group's ideal DCG); weighting by the ideal DCG turns them back
    into DCG changes, so groups count in proportion to their best gain.
    """
    idcg = ideal_dcg(np.asarray(gains)[part.grades], part.sizes, k)  # (G,)
    w = np.repeat(idcg, part.sizes)  # (n,)
    out: np.ndarray = w / w.mean() if len(w) and w.mean() > 0 else np.ones(len(w))
    return out


def _dataset(
    split: LtrSplit, cfg: LambdaMartConfig, gains: list[float],
    reference: lgb.Dataset | None = None,
) -> lgb.Dataset:  # fmt: skip
    keep = informative_rows(split.grades, split.sizes)  # groups without a pair teach nothing
    part = split.subset(keep)
    weight = None
    if cfg.group_weight == "ideal_dcg":
        weight = group_weights(part, gains, cfg.truncation_level)
    return lgb.Dataset(part.x, part.grades, group=part.sizes, weight=weight, reference=reference,
                       feature_name=[f"f{j}" for j in range(part.x.shape[1])],
                       free_raw_data=True)  # fmt: skip


def train_lambdamart(
    train: LtrSplit, valid: LtrSplit | None, cfg: LambdaMartConfig, gains: list[float], seed: int
) -> lgb.Booster:
    """Fit on ``train``'s groups; early-stop on ``valid``'s NDCG@``cfg.eval_at`` if given."""
    train_set = _dataset(train, cfg, gains)
    valid_sets: list[lgb.Dataset] = []
    callbacks: list[Callable[..., Any]] = []
    if valid is not None and cfg.early_stopping_rounds > 0:
        valid_sets.append(_dataset(valid, cfg, gains, reference=train_set))
        callbacks.append(lgb.early_stopping(cfg.early_stopping_rounds, verbose=False))
    booster = lgb.train(params(cfg, gains, seed), train_set, num_boost_round=cfg.num_trees,
                        valid_sets=valid_sets, callbacks=callbacks)  # fmt: skip
    return booster


def float32_exact(booster: lgb.Booster) -> lgb.Booster:
    """The booster cut to its best iteration, every threshold lowered to the largest float32 at
    or below it.

    LightGBM compares an input with a float64 threshold; the ONNX tree ensemble compares float32
    with the threshold rounded to float32. A threshold between two adjacent float32 values that
    rounds up sends an input equal to the upper one left in ONNX and right in LightGBM (seen:
    a 0.06 difference on one validation row). For a float32 input x, ``x <= t`` holds exactly
    when ``x <= t32`` with t32 the largest float32 <= t, so the rewritten booster scores every
    float32 input as the original does, and its float32 thresholds are exact in ONNX.
    """
    if booster.best_iteration and booster.best_iteration < booster.num_trees():
        booster = lgb.Booster(
            model_str=booster.model_to_string(num_iteration=booster.best_iteration)
        )
    lines = booster.model_to_string().split("\n")
    for i, line in enumerate(lines):
        if line.startswith("threshold="):
            t = np.array(line[len("threshold=") :].split(), dtype=np.float64)
            t32 = t.astype(np.float32)
            t32 = np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-np.inf)), t32)
            lines[i] = "threshold=" + " ".join(repr(float(v)) for v in t32)
    # tree_sizes holds each tree's length in bytes, which the new numbers change; without it
    # LightGBM parses the trees one after the other
    lines = [line for line in lines if not line.startswith("tree_sizes=")]
    return lgb.Booster(model_str="\n".join(lines))


def predict(booster: lgb.Booster, x: np.ndarray) -> np.ndarray:
    """Native LightGBM scores (n,) float64 with the trees early stopping kept."""
    out: np.ndarray = np.asarray(
        booster.predict(x, num_iteration=booster.best_iteration or None, num_threads=1),
        dtype=np.float64,
    )
    return out


def to_onnx(booster: lgb.Booster, n_inputs: int) -> onnx.ModelProto:
    """The booster as one TreeEnsembleRegressor: float32 ``inputs`` [N, F] -> float32 [N, 1].

    Convert a :func:`float32_exact` booster: the converter exports every tree it holds and rounds
    thresholds to float32.
    """
    model: onnx.ModelProto = convert_lightgbm(
        booster, initial_types=[(INPUT_NAME, FloatTensorType([None, n_inputs]))],
        target_opset=ONNX_OPSET, zipmap=False,
    )  # fmt: skip
    return model
