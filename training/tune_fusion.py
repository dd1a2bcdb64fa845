"""Tune the output weights of the fused score offline (the seeds' "output weight" grid search).

    mtrank tune-fusion --config training/configs/tune_fusion.yaml [--out fusion.yaml] [--plot p.png]

The served model (ONNX, from the registry — exactly what the service runs) scores a validation
split; every trial evaluates the fusion formula with one parameter setting through the service's
own :class:`mtrank.fusion.Formula` and measures the objectives per request group (the user, as a
stand-in for a page view). Search is a grid (every combination of listed values) or random
sampling of ranges; the default parameters are always trial 0, so the result is never worse than
the default on the objective. The best setting is written as a fusion file the service loads as
is (``scenes.NAME.fusion_file``), and the trade-off between the first two reported objectives is
plotted with its Pareto front.

Objectives: ``ndcg@K:GAIN`` with GAIN ``click``, ``purchase`` or ``gmv`` (purchase x price), and
``auc:LABEL`` (AUC of the fused score against a label). Item attributes the formula reads
(price, quality, promoted) are recovered from the encoded features by inverting the spec's
normalisation; ``rule_weight`` is 1 offline (rules are business policy, not tuned here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.fusion import (
    DEFAULT_FORMULA,
    DEFAULT_PARAMS,
    RULE_WEIGHT,
    Formula,
    FusionConfig,
    save_fusion_file,
)
from mtrank.registry import Registry
from mtrank.spec import FeatureSpec
from mtrank.yamlio import load_yaml_model
from training.config import ConfigError, load_dataset_spec
from training.data import Encoded, prepare
from training.metrics import auc


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float
    high: float
    log: bool = False


class TuneConfig(BaseModel):
    """What to search, on which data, against which objective."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    root: str = "models"
    dataset: str = Field(description="dataset spec YAML, relative to this file")
    split: str = "valid"
    cache_dir: str = "data/cache"
    formula: str = DEFAULT_FORMULA
    defaults: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_PARAMS))
    params: dict[str, list[float] | Range]
    search: str = Field("random", pattern="^(grid|random)$")
    trials: int = Field(200, ge=1)
    seed: int = 0
    objective: str = "ndcg@10:gmv"
    report: list[str] = ["ndcg@10:gmv", "auc:click"]


# ---------------------------------------------------------------- objectives (pure)
def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, groups: np.ndarray, k: int) -> float:
    """Mean NDCG@k over groups with a positive gain; ties in score break by row order."""
    order = np.lexsort((np.arange(len(scores)), -scores, groups))  # by group, score desc
    g_sorted, gain_sorted = groups[order], gains[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g_sorted)) + 1]  # first row of each group
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    discount = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    dcg = np.add.reduceat(gain_sorted * discount, starts)
    ideal_order = np.lexsort((-gains, groups))  # same groups, gains desc
    ideal = np.add.reduceat(gains[ideal_order] * discount, starts)
    ok = ideal > 0
    return float(np.mean(dcg[ok] / ideal[ok])) if ok.any() else float("nan")


@dataclass(frozen=True)
class EvalData:
    """One split with everything an objective or the formula needs, as float64 columns."""

    env: dict[str, np.ndarray]  # model outputs + item attributes + rule_weight
    labels: dict[str, np.ndarray]  # click, purchase, ... by label column name
    groups: np.ndarray

    @property
    def n(self) -> int:
        return len(self.groups)


def objective_value(name: str, scores: np.ndarray, data: EvalData) -> float:
    kind, _, target = name.partition(":")
    if kind == "auc":
        return auc(_gain(target, data), scores)
    if kind.startswith("ndcg@"):
        return ndcg_at_k(scores, _gain(target, data), data.groups, int(kind[5:]))
    raise ConfigError(f"unknown objective {name!r}: use ndcg@K:GAIN or auc:LABEL")


def _gain(target: str, data: EvalData) -> np.ndarray:
    if target == "gmv":
        gmv: np.ndarray = data.labels["purchase"] * data.env["price"]
        return gmv
    if target not in data.labels:
        raise ConfigError(f"objective target {target!r} not among {sorted(data.labels)} or gmv")
    return data.labels[target]


# ---------------------------------------------------------------- data
def raw_attribute(spec: FeatureSpec, encoded: Encoded, name: str) -> np.ndarray:
    """Invert the spec's encoding of one item attribute (dense: un-normalise; sparse: vocab)."""
    for j, f in enumerate(spec.dense):
        if f.name == name:
            x = np.asarray(encoded.dense[:, j], dtype=np.float64) * f.std + f.mean
            out: np.ndarray = np.expm1(x) if f.log1p else x
            return out
    for j, sf in enumerate(spec.sparse):
        if sf.name == name:
            table = np.array([0.0] + [_as_float(v) for v in sf.vocab])
            decoded: np.ndarray = table[np.asarray(encoded.sparse[:, j])]
            return decoded
    raise ConfigError(f"formula attribute {name!r} is not a feature of the model")


def _as_float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return 0.0


def load_eval_data(cfg: TuneConfig, base: Path) -> EvalData:
    ds = load_dataset_spec(base / cfg.dataset)
    data = prepare(ds, Path(cfg.cache_dir))
    split: Encoded | None = getattr(data, cfg.split)
    if split is None or split.groups is None:
        raise ConfigError(f"split {cfg.split!r} is missing or has no user column for grouping")
    mv = Registry(cfg.root).resolve(cfg.model)
    spec = FeatureSpec.load(mv.path)
    if (
        spec.model_copy(update={"outputs": []}).sha256()
        != data.spec.model_copy(update={"outputs": []}).sha256()
    ):
        raise ConfigError(f"{mv.path}: the model was not trained on this dataset's encoding")
    session = ort.InferenceSession(str(mv.model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(split), 65536):
        rows = slice(start, start + 65536)
        feeds = {
            spec.sparse_input: np.ascontiguousarray(split.sparse[rows]),
            spec.dense_input: np.ascontiguousarray(split.dense[rows]),
        }
        for n, v in zip(names, session.run(None, feeds), strict=True):
            outs[n].append(v.astype(np.float64))
    env = {n: np.concatenate(v) for n, v in outs.items()}
    for attr in ITEM_ATTRIBUTES.formula_names:
        env[attr] = raw_attribute(spec, split, attr)
    env[RULE_WEIGHT] = np.ones(len(split))
    labels = {t.label: np.asarray(split.labels[t.name], np.float64) for t in ds.tasks}
    return EvalData(env=env, labels=labels, groups=np.asarray(split.groups))


# ---------------------------------------------------------------- search
def candidates(cfg: TuneConfig) -> list[dict[str, float]]:
    """Trial settings: the defaults first, then the grid or random samples."""
    names = sorted(cfg.params)
    trials: list[dict[str, float]] = [{**cfg.defaults}]
    if cfg.search == "grid":
        axes = []
        for n in names:
            space = cfg.params[n]
            if isinstance(space, Range):
                raise ConfigError(f"params.{n}: grid search needs a list of values")
            axes.append(space)
        for combo in itertools.product(*axes):
            trials.append({**cfg.defaults, **dict(zip(names, combo, strict=True))})
        return trials[: cfg.trials + 1]
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.trials):
        trial = dict(cfg.defaults)
        for n in names:
            space = cfg.params[n]
            if isinstance(space, Range):
                if space.log:
                    lo, hi = np.log(space.low), np.log(space.high)
                    trial[n] = float(np.exp(rng.uniform(lo, hi)))
                else:
                    trial[n] = float(rng.uniform(space.low, space.high))
            else:
                trial[n] = float(space[int(rng.integers(len(space)))])
        trials.append(trial)
    return trials


def run_search(cfg: TuneConfig, data: EvalData) -> list[dict[str, Any]]:
    inputs = set(data.env)
    results = []
    report = list(dict.fromkeys([cfg.objective, *cfg.report]))
    for i, params in enumerate(candidates(cfg)):
        formula: Formula = FusionConfig(formula=cfg.formula, params=params).compile(inputs)
        scores = formula.evaluate(data.env, data.n)
        values = {name: objective_value(name, scores, data) for name in report}
        results.append({"trial": i, "params": params, "objectives": values})
    return results


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Mask of points not dominated by any other (both coordinates maximised)."""
    n = len(points)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(points >= points[i], axis=1) & np.any(points > points[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def plot_tradeoff(results: list[dict[str, Any]], x: str, y: str, best: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = np.array([[r["objectives"][x], r["objectives"][y]] for r in results])
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(pts[:, 0], pts[:, 1], s=10, alpha=0.4, label="trials")
    f = pts[front][np.argsort(pts[front][:, 0])]
    ax.plot(f[:, 0], f[:, 1], "-o", color="tab:red", ms=4, label="Pareto front")
    ax.scatter(pts[0, 0], pts[0, 1], marker="s", s=60, color="black", label="default params")
    ax.scatter(pts[best, 0], pts[best, 1], marker="*", s=160, color="gold", edgecolor="k",
               label="best")  # fmt: skip
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("fusion parameter search")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tune(cfg: TuneConfig, base: Path, out: Path, plot: Path | None) -> dict[str, Any]:
    data = load_eval_data(cfg, base)
    results = run_search(cfg, data)
    best = max(range(len(results)), key=lambda i: results[i]["objectives"][cfg.objective])
    save_fusion_file(FusionConfig(formula=cfg.formula, params=results[best]["params"]), out)
    summary = {
        "objective": cfg.objective,
        "default": results[0]["objectives"],
        "best": results[best],
        "trials": len(results),
        "rows": data.n,
        "fusion_file": str(out),
    }
    out.with_suffix(".trials.json").write_text(json.dumps({**summary, "results": results}))
    if plot is not None:
        report = list(dict.fromkeys([cfg.objective, *cfg.report]))
        if len(report) >= 2:
            plot_tradeoff(results, report[0], report[1], best, plot)
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtrank tune-fusion", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("models/fusion.yaml"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the trade-off")
    args = parser.parse_args(argv)
    try:
        cfg = load_yaml_model(
            args.config, TuneConfig, ConfigError, "tune-fusion config",
            "expected a mapping at the top level",
        )  # fmt: skip
        summary = tune(cfg, args.config.parent, args.out, args.plot)
    except (ConfigError, ValueError) as e:
        print(f"mtrank tune-fusion: {e}", file=sys.stderr)
        return 1
    d, b = summary["default"][cfg.objective], summary["best"]["objectives"][cfg.objective]
    print(
        f"{summary['trials']} trials on {summary['rows']} rows; {cfg.objective}: "
        f"default {d:.4f} -> best {b:.4f}"
    )
    print(f"best params: {summary['best']['params']}")
    print(f"wrote {args.out}")
    return 0
