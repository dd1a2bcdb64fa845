"""Offline fusion tuning: objectives against hand values, and a search that beats the defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.trained import CONFIGS, TrainedWorld
from mtrank.fusion import load_fusion_file
from service.ranking_config import load_ranking_config
from training import tune_fusion
from training.tune_fusion import TuneConfig, ndcg_at_k, pareto_front


def test_ndcg_against_hand_values() -> None:
    # group 0: gains [3, 0, 1] ranked by scores [0.1, 0.9, 0.5] -> order 1, 2, 0
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8])
    gains = np.array([3.0, 0.0, 1.0, 0.0, 0.0])
    groups = np.array([0, 0, 0, 1, 1])  # group 1 has no gain: left out of the mean
    dcg = 0.0 / np.log2(2) + 1.0 / np.log2(3) + 3.0 / np.log2(4)
    idcg = 3.0 / np.log2(2) + 1.0 / np.log2(3)
    assert ndcg_at_k(scores, gains, groups, 10) == pytest.approx(dcg / idcg)
    # k=2 cuts the third position
    assert ndcg_at_k(scores, gains, groups, 2) == pytest.approx((1.0 / np.log2(3)) / idcg)
    # a perfect ranking scores 1
    assert ndcg_at_k(gains, gains, groups, 3) == pytest.approx(1.0)


def test_pareto_front_keeps_only_non_dominated_points() -> None:
    pts = np.array([[1.0, 1.0], [2.0, 0.5], [0.5, 2.0], [0.9, 0.9], [2.0, 0.4]])
    assert pareto_front(pts).tolist() == [True, True, True, False, False]


def test_grid_search_lists_defaults_then_every_combination() -> None:
    cfg = TuneConfig(model="m", dataset="d.yaml", params={"alpha": [0.0, 1.0], "a": [0.5]},
                     search="grid", defaults={"alpha": 0.1, "a": 0.3})  # fmt: skip
    trials = tune_fusion.candidates(cfg)
    assert trials == [{"alpha": 0.1, "a": 0.3}, {"alpha": 0.0, "a": 0.5}, {"alpha": 1.0, "a": 0.5}]


def test_tuning_beats_the_default_parameters_and_writes_a_loadable_file(
    trained_world: TrainedWorld, tmp_path: Path
) -> None:
    raw = yaml.safe_load((CONFIGS / "tune_fusion.yaml").read_text())
    splits = {s: str(trained_world.data_dir / f"{s}.parquet") for s in ("train", "valid", "test")}
    ds = yaml.safe_load((CONFIGS / "ecommerce.dataset.yaml").read_text()) | splits
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(ds))
    raw |= {"root": str(trained_world.root), "dataset": "ds.yaml", "trials": 40,
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    cfg_path = tmp_path / "tune.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out, plot = tmp_path / "fusion.yaml", tmp_path / "pareto.png"
    assert (
        tune_fusion.main(["--config", str(cfg_path), "--out", str(out), "--plot", str(plot)]) == 0
    )

    summary = json.loads(out.with_suffix(".trials.json").read_text())
    default = summary["default"]["ndcg@10:gmv"]
    best = summary["best"]["objectives"]["ndcg@10:gmv"]
    assert best > default  # the search improved the objective over the shipped defaults
    assert summary["trials"] == 41 and summary["rows"] == len(trained_world.data.valid or [])
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"

    fusion = load_fusion_file(out)  # exactly what the service loads
    assert fusion.params == pytest.approx(summary["best"]["params"])
    ranking = tmp_path / "ranking.yaml"
    ranking.write_text(yaml.safe_dump({"scenes": {"default": {"fusion_file": out.name}}}))
    names = [*trained_world.spec.task_names]
    cfg = load_ranking_config(ranking, names)
    assert cfg.scene("default").fusion == fusion


def test_unknown_objective_is_an_error(trained_world: TrainedWorld) -> None:
    data = tune_fusion.EvalData(env={"price": np.ones(3)}, labels={"click": np.ones(3)},
                                groups=np.zeros(3, dtype=np.int64))  # fmt: skip
    with pytest.raises(ValueError, match="unknown objective"):
        tune_fusion.objective_value("mrr:click", np.ones(3), data)
    with pytest.raises(ValueError, match="not among"):
        tune_fusion.objective_value("auc:like", np.ones(3), data)
