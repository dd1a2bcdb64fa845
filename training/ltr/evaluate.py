"""Evaluate an LTR version and formula baselines per request group of a split.

    mtrank evaluate-ltr --config training/configs/ltr_lambdamart.yaml [--version V]
                        [--split test] [--k 20] [--fusion FILE ...] [--out report.json]

Every ranker scores the same split (groups = users, as in training: training/ltr/data.py): the
published LTR graph run with onnxruntime, ``ctr`` alone, the default fusion formula and any fusion
files given (e.g. one written by ``mtrank tune-fusion``). Metrics, each a mean over groups:

* ``ndcg@K``: NDCG with the logged label's gain (the grades, or value levels, and the gains the
  version was trained with: training/ltr/relevance.py);
* ``gmv@K``: the logged GMV (purchase x price) of the top K;
* ``ndcg@K_truth`` and ``gmv@K_truth`` where the split has the generator's truth columns:
  NDCG with the expected gain of the plain grade, and the expected GMV (P(click) x P(buy | click) x
  price) of the top K (training/ltr/truth.py).

A user holds few rows of one split, so a top-K metric over a user's rows sees most of them; the
offline benchmark (bench/ltr_fusion.py) therefore also ranks counterfactual requests of 100
candidates built from the generator's truth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mtrank.fusion import DEFAULT_FORMULA, DEFAULT_PARAMS, FusionConfig, load_fusion_file
from mtrank.ltr_artefact import LTR_MODEL_FILE, LtrMetadata, problems, resolve
from mtrank.registry import Registry, RegistryError
from training.config import ConfigError
from training.ltr.config import LtrConfig, load_ltr_config
from training.ltr.data import LtrSplit, load_split, open_source
from training.ltr.metrics import ndcg_at_k, top_k_value
from training.ltr.relevance import Relevance
from training.ltr.truth import TruthUnavailable, expected_gain

DEFAULT_K = 20


def split_metrics(
    scores: np.ndarray, split: LtrSplit, relevance: Relevance, grades: dict[str, int], k: int
) -> dict[str, float]:
    """The module's metrics of one ranker's ``scores`` (n,) on ``split`` (plain grades)."""
    gain_of = np.asarray(relevance.gains, dtype=np.float64)
    out = {f"ndcg@{k}": ndcg_at_k(scores, gain_of[relevance.labels(split)], split.groups, k)}
    price = split.env.get("price")
    if price is not None and "purchase" in split.labels:
        out[f"gmv@{k}"] = top_k_value(scores, split.labels["purchase"] * price, split.groups, k)
    ctr, cvr = split.truth.get("true_ctr"), split.truth.get("true_cvr")
    if ctr is not None and cvr is not None:
        try:
            gain = expected_gain(ctr, cvr, grades, relevance.base_gains)
            out[f"ndcg@{k}_truth"] = ndcg_at_k(scores, gain, split.groups, k)
        except TruthUnavailable:
            pass  # a grade on an event the truth cannot take into account
        if price is not None:
            out[f"gmv@{k}_truth"] = top_k_value(scores, ctr * cvr * price, split.groups, k)
    return out


def formula_scores(config: FusionConfig, env: dict[str, np.ndarray], n: int) -> np.ndarray:
    """A fusion formula's scores over a split's env (exactly the service's evaluation)."""
    return config.compile(env).evaluate(env, n)


def baseline_configs(fusion_files: list[Path]) -> dict[str, FusionConfig]:
    """``ctr`` alone, the default formula, and each fusion file by its file name."""
    configs = {
        "ctr only": FusionConfig(formula="ctr"),
        "default formula": FusionConfig(formula=DEFAULT_FORMULA, params=DEFAULT_PARAMS),
    }
    configs.update({f"fusion {p.name}": load_fusion_file(p) for p in fusion_files})
    return configs


def ltr_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path / LTR_MODEL_FILE), sess_options=options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


def evaluate_ltr(
    cfg: LtrConfig, base: Path, version: str | None, split_name: str, k: int,
    fusion_files: list[Path],
) -> dict[str, Any]:  # fmt: skip
    """Score ``split_name`` with the LTR version and the baselines; the JSON-ready report."""
    mv = resolve(Registry(cfg.root), cfg.name, version)
    raw = mv.metadata()
    found = problems(mv.path, raw, servable=False)
    if found:
        raise ConfigError(f"{mv.path}: " + "; ".join(found))
    meta = LtrMetadata.parse(raw)
    context = list(raw.get("config", {}).get("context", []))
    fusion = meta.input_space == "fusion"
    run_cfg = cfg.model_copy(update={
        "trainer": meta.trainer, "inputs": meta.inputs if fusion else None,
        "context": context if fusion else [], "grades": meta.grades,
        "label_gain": meta.label_gain,
    })  # fmt: skip
    source = open_source(run_cfg, base)
    split = load_split(run_cfg, source, split_name)
    if list(split.inputs) != meta.inputs:
        raise ConfigError(f"{mv.path}: inputs {meta.inputs} but the data gives {split.inputs}")
    (out,) = ltr_session(mv.path).run(None, {meta.input_name: split.x})
    scores = {f"ltr {meta.trainer} {mv.version}": np.asarray(out, np.float64).reshape(-1)}
    if source.session is not None:
        for label, fc in baseline_configs(fusion_files).items():
            scores[label] = formula_scores(fc, split.env, len(split))
    relevance = Relevance.from_metadata(meta.grades, meta.label_gain, raw.get("relevance"))
    rankers = {
        label: split_metrics(s, split, relevance, meta.grades, k) for label, s in scores.items()
    }
    return {
        "model": f"{mv.name}/{mv.version}",
        "trainer": meta.trainer,
        "ranker": None if source.ranker is None else source.ranker.model_dump(),
        "split": split_name,
        "rows": len(split),
        "groups": int(len(split.sizes)),
        "k": k,
        "rankers": rankers,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrank evaluate-ltr", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path, help="the LTR config it was trained by")
    p.add_argument("--version", default=None, help="LTR version (default: NAME/current)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--k", type=int, default=DEFAULT_K)
    p.add_argument("--fusion", type=Path, action="append", default=[],
                   help="a fusion file to compare with (repeatable)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    try:
        cfg = load_ltr_config(args.config)
        report = evaluate_ltr(cfg, args.config.parent, args.version, args.split, args.k,
                              args.fusion)  # fmt: skip
    except (ConfigError, RegistryError, ValueError, OSError) as e:
        sys.stderr.write(f"mtrank evaluate-ltr: {e}\n")
        return 1
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    names = sorted({m for r in report["rankers"].values() for m in r})
    width = max(len(r) for r in report["rankers"])
    lines = [f"{report['model']} on {report['split']} ({report['rows']} rows, "
             f"{report['groups']} groups)", " " * width + "  " + "  ".join(names)]  # fmt: skip
    for label, m in report["rankers"].items():
        cells = "  ".join(f"{m.get(n, float('nan')):>{len(n)}.4f}" for n in names)
        lines.append(f"{label.ljust(width)}  {cells}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
