"""``mtrank train-ltr`` and ``mtrank evaluate-ltr`` end to end, on the session's trained world:
synthetic logs, a ranker trained and exported by the real pipeline, the LTR trained over its
ONNX outputs, published, served by the service's LtrRuntime and evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.trained import TrainedWorld
from mtrank.cli import main as mtrank_main
from mtrank.fusion import DEFAULT_FORMULA, DEFAULT_PARAMS, FusionConfig, save_fusion_file
from mtrank.ltr_artefact import resolve
from mtrank.registry import Registry
from service.fusion_model import LtrLoadError, LtrRuntime
from training.config import ConfigError
from training.ltr.config import load_ltr_config
from training.ltr.data import load_split, open_source

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "training" / "configs"


def write_config(world: TrainedWorld, tmp_path: Path, committed: str, **changes: object) -> Path:
    """training/configs/<committed>.yaml pointed at the world, at test size."""
    (tmp_path / "dataset.yaml").write_text(
        yaml.safe_dump(world.cfg.dataset.model_dump(mode="json"))
    )
    data = yaml.safe_load((CONFIGS / f"{committed}.yaml").read_text())
    data.update(root=str(world.root), dataset="dataset.yaml",
                cache_dir=str(world.data.path.parent), parity_rows=2000)  # fmt: skip
    if data.get("ranker") is not None:
        data["ranker"] = world.model.name
    data.update(changes)
    path = tmp_path / f"{committed}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_serve_and_evaluate_lambdamart(
    trained_world: TrainedWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(trained_world, tmp_path, "ltr_lambdamart", name="cli_lambdamart")
    report_path = tmp_path / "train.json"
    args = ["train-ltr", "--config", str(config), "--promote", "--report", str(report_path)]
    assert mtrank_main(args) == 0
    assert "promoted to current" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["train_rows"] == len(trained_world.data.train)
    assert report["parity"]["max_error"] <= 1e-5
    assert 0.0 < report["metrics"]["valid_ndcg@20"] <= 1.0

    # the published version is what the service loads, and it scores the offline env exactly
    cfg = load_ltr_config(config)
    mv = resolve(Registry(trained_world.root), "cli_lambdamart")
    runtime = LtrRuntime.load(mv)
    assert runtime.inputs == ("ctr", "cvr", "cart", "collect", "stay", "price", "quality",
                              "promoted")  # fmt: skip
    valid = load_split(cfg, open_source(cfg, config.parent), "valid")
    served = runtime.score(valid.env, len(valid))
    np.testing.assert_allclose(runtime.score_features(valid.x), served)
    assert np.unique(served).size > 10

    fusion = tmp_path / "tuned.yaml"
    save_fusion_file(FusionConfig(formula=DEFAULT_FORMULA, params=DEFAULT_PARAMS | {"beta": 5.0}),
                     fusion)  # fmt: skip
    out = tmp_path / "eval.json"
    rc = mtrank_main(["evaluate-ltr", "--config", str(config), "--split", "test", "--fusion",
                      str(fusion), "--out", str(out)])  # fmt: skip
    assert rc == 0
    rankers = json.loads(out.read_text())["rankers"]
    assert set(rankers) == {f"ltr lambdamart {mv.version}", "ctr only", "default formula",
                            "fusion tuned.yaml"}  # fmt: skip
    for metrics in rankers.values():
        assert set(metrics) == {"ndcg@20", "gmv@20", "ndcg@20_truth", "gmv@20_truth"}
        assert all(0.0 <= v for v in metrics.values())
    assert rankers["ctr only"] != rankers["default formula"]


def test_train_bpr_and_the_single_model_baseline(
    trained_world: TrainedWorld, tmp_path: Path
) -> None:
    bpr = write_config(trained_world, tmp_path, "ltr_bpr", name="cli_bpr",
                       bpr={"hidden_units": [8], "epochs": 1})  # fmt: skip
    assert mtrank_main(["train-ltr", "--config", str(bpr), "--promote"]) == 0
    LtrRuntime.load(resolve(Registry(trained_world.root), "cli_bpr"))

    single = write_config(trained_world, tmp_path, "ltr_single_model", name="cli_single",
                          lambdamart={"num_trees": 20})  # fmt: skip
    assert mtrank_main(["train-ltr", "--config", str(single), "--promote"]) == 0
    mv = resolve(Registry(trained_world.root), "cli_single")
    assert mv.metadata()["input_space"] == "features"
    assert mv.metadata()["inputs"][:2] == ["user_id", "age_bucket"]
    with pytest.raises(LtrLoadError, match="offline baseline"):
        LtrRuntime.load(mv)
    assert mtrank_main(["evaluate-ltr", "--config", str(single), "--split", "valid"]) == 0


def test_config_errors_name_the_key(
    trained_world: TrainedWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_config(trained_world, tmp_path, "ltr_lambdamart", grades={"click": 1})
    assert mtrank_main(["train-ltr", "--config", str(bad)]) == 1
    assert "grades: needs the key 'impression'" in capsys.readouterr().err
    unknown = write_config(trained_world, tmp_path, "ltr_lambdamart", inputs=["ctr", "gmv"])
    assert mtrank_main(["train-ltr", "--config", str(unknown)]) == 1
    assert "inputs: ['gmv'] are neither outputs of the ranker" in capsys.readouterr().err
    typo = write_config(trained_world, tmp_path, "ltr_lambdamart", lambdamart={"num_tree": 5})
    with pytest.raises(ConfigError, match=r"lambdamart.num_tree: unknown key"):
        load_ltr_config(typo)
