"""ONNX export of the LTR trainers: onnxruntime must reproduce the native scores, the parity gate
must refuse a graph that does not, and what is published must be a whole, loadable version."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from mtrank.ltr_artefact import LTR_MODEL_FILE, METADATA_FILE, problems
from mtrank.registry import Registry
from tests.support.ltr import TOY_INPUTS, fit_toy, publish_toy, toy_config, toy_split
from training.ltr.export import PARITY_TOLERANCE, LtrExportError, check_parity, onnx_scores
from training.ltr.metrics import ndcg_at_k


@pytest.mark.parametrize("trainer", ["lambdamart", "bpr"])
def test_onnx_scores_equal_the_native_model(trainer: str) -> None:
    trained = fit_toy(trainer)  # type: ignore[arg-type]
    x = toy_split(60, seed=7).x
    far = np.concatenate([x, x * 50.0, np.zeros_like(x[:4])]).astype(np.float32)
    got, want = onnx_scores(trained.graph, far), trained.native(far)
    assert got.shape == want.shape == (len(far),)
    assert np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))) <= PARITY_TOLERANCE
    assert np.std(want) > 0  # the model is not a constant: the comparison means something


@pytest.mark.parametrize("trainer", ["lambdamart", "bpr"])
def test_trained_models_rank_better_than_chance(trainer: str) -> None:
    trained = fit_toy(trainer)  # type: ignore[arg-type]
    test = toy_split(100, seed=11)
    gain = np.asarray([0.0, 1.0, 2.0, 3.0])[test.grades]
    learned = ndcg_at_k(trained.native(test.x), gain, test.groups, 20)
    shuffled = ndcg_at_k(np.random.default_rng(0).random(len(test)), gain, test.groups, 20)
    assert learned > shuffled + 0.05


def test_the_parity_gate_refuses_a_graph_that_differs() -> None:
    trained = fit_toy("lambdamart")
    graph = onnx.ModelProto()
    graph.CopyFrom(trained.graph)
    (node,) = [n for n in graph.graph.node if n.op_type == "TreeEnsembleRegressor"]
    for attr in node.attribute:
        if attr.name == "target_weights":  # every leaf value, nudged by 1e-3
            attr.floats[:] = [w + 1e-3 for w in attr.floats]
    broken = replace(trained, graph=graph)
    x = toy_split(20, seed=3).x
    assert check_parity(trained, x, 100)["max_error"] <= PARITY_TOLERANCE
    with pytest.raises(LtrExportError, match="ONNX parity failed"):
        check_parity(broken, x, 100)


def test_a_failed_gate_publishes_nothing(tmp_path: Path) -> None:
    from training.ltr.export import export_ltr

    trained = fit_toy("bpr")
    broken = replace(trained, native=lambda x: trained.native(x) + 1.0)
    with pytest.raises(LtrExportError):
        export_ltr(toy_config(tmp_path, "bpr"), broken, toy_split(20).x, {}, None)
    assert Registry(tmp_path).current("fusion") is None
    model_dir = tmp_path / "fusion"
    assert not model_dir.exists() or list(model_dir.iterdir()) == []  # no staging left either


@pytest.mark.parametrize("trainer", ["lambdamart", "bpr", "single_model"])
def test_a_published_version_is_whole(tmp_path: Path, trainer: str) -> None:
    mv, trained = publish_toy(tmp_path, trainer)  # type: ignore[arg-type]
    meta = json.loads((mv.path / METADATA_FILE).read_text())
    assert problems(mv.path, meta, servable=trainer != "single_model") == []
    assert meta["kind"] == "ltr" and meta["trainer"] == trainer
    assert meta["inputs"] == list(TOY_INPUTS)
    assert meta["input_space"] == ("features" if trainer == "single_model" else "fusion")
    assert meta["grades"] == {"impression": 0, "click": 1, "cart": 2, "purchase": 3}
    assert meta["label_gain"] == [0.0, 1.0, 2.0, 3.0]
    assert meta["parity"]["max_error"] <= PARITY_TOLERANCE
    assert Registry(tmp_path).current("fusion") == mv.version
    graph = onnx.load(str(mv.path / LTR_MODEL_FILE))
    x = toy_split(10, seed=5).x
    assert np.allclose(onnx_scores(graph, x), trained.native(x), atol=1e-5)


def test_thresholds_between_adjacent_float32_values_stay_exact() -> None:
    """Two feature values one float32 apart: LightGBM splits between them in float64, and the
    threshold rounded to float32 lands on one of them. As fitted, ONNX then sends that value
    down the other branch; :func:`float32_exact` makes both agree without changing a score."""
    import lightgbm as lgb

    from training.ltr import lambdamart

    lo = np.float32(0.1)
    hi = np.nextafter(lo, np.float32(1.0))
    x = np.repeat(np.array([[lo], [hi]], dtype=np.float32), 200, axis=0)
    y = np.repeat([0, 1], 200)
    order = np.random.default_rng(0).permutation(400)
    params = {"objective": "lambdarank", "verbosity": -1, "min_data_in_leaf": 5,
              "min_data_in_bin": 1, "num_threads": 1}  # fmt: skip
    fitted = lgb.train(params, lgb.Dataset(x[order], y[order], group=np.full(20, 20)), 3)
    probe = np.array([[lo], [hi]], dtype=np.float32)
    native = lambdamart.predict(fitted, probe)
    assert native[1] > native[0]  # the split separates them
    as_fitted = onnx_scores(lambdamart.to_onnx(fitted, 1), probe)
    assert np.max(np.abs(as_fitted - native)) > 0.1  # the hazard is real
    exact = lambdamart.float32_exact(fitted)
    np.testing.assert_array_equal(lambdamart.predict(exact, probe), native)
    np.testing.assert_allclose(onnx_scores(lambdamart.to_onnx(exact, 1), probe), native, atol=1e-6)
