"""The service's learned fusion: LtrRuntime scores exactly what the trained model scores, takes
its inputs by name from the fusion env, and refuses any version that is not whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mtrank.ltr_artefact import LTR_MODEL_FILE, METADATA_FILE, checksums
from mtrank.registry import ModelVersion
from service.fusion_model import LtrLoadError, LtrRuntime
from tests.support.ltr import TOY_INPUTS, publish_toy, toy_split
from training.ltr.export import Trained


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelVersion, Trained]]:
    root = tmp_path_factory.mktemp("ltr_registry")
    return {t: publish_toy(root, t, name=t) for t in ("lambdamart", "bpr", "single_model")}  # type: ignore[arg-type]


def env_of(x: np.ndarray) -> dict[str, Any]:
    return {name: x[:, j].astype(np.float64) for j, name in enumerate(TOY_INPUTS)}


@pytest.mark.parametrize("trainer", ["lambdamart", "bpr"])
def test_scores_equal_the_native_model(
    published: dict[str, tuple[ModelVersion, Trained]], trainer: str
) -> None:
    mv, trained = published[trainer]
    runtime = LtrRuntime.load(mv)
    assert runtime.inputs == TOY_INPUTS and runtime.version == mv.version
    x = toy_split(25, seed=9).x
    got = runtime.score(env_of(x), len(x))
    assert got.dtype == np.float64 and got.shape == (len(x),)
    np.testing.assert_allclose(got, trained.native(x), atol=1e-5, rtol=1e-5)
    assert np.std(got) > 0


def test_features_follow_the_input_order_and_broadcast_scalars(
    published: dict[str, tuple[ModelVersion, Trained]],
) -> None:
    runtime = LtrRuntime.load(published["lambdamart"][0])
    env = {"ctr": np.array([0.1, 0.2, 0.3]), "cvr": 0.5, "price": np.array([10.0, 20.0, 30.0]),
           "quality": 1.0, "promoted": np.array([0.0, 1.0, 0.0]), "stay": 9.0}  # fmt: skip
    f = runtime.features(env, 3)
    assert f.dtype == np.float32 and f.shape == (3, 5)
    np.testing.assert_array_equal(f[:, 1], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(f[:, 2], [10.0, 20.0, 30.0])
    assert runtime.explain_inputs(f, 1) == pytest.approx(
        {"ctr": 0.2, "cvr": 0.5, "price": 20.0, "quality": 1.0, "promoted": 1.0}
    )
    assert runtime.score(dict.fromkeys(TOY_INPUTS, 0.5), 0).shape == (0,)  # no run for n = 0
    assert runtime.score_features(np.empty((0, 5), np.float32)).shape == (0,)


def test_missing_inputs_are_named(published: dict[str, tuple[ModelVersion, Trained]]) -> None:
    runtime = LtrRuntime.load(published["bpr"][0])
    with pytest.raises(KeyError, match=r"\['cvr', 'promoted'\]"):
        runtime.features({"ctr": 0.1, "price": 1.0, "quality": 1.0}, 2)
    env = env_of(toy_split(1, 4).x) | {"price": np.ones(3)}
    with pytest.raises(ValueError, match="'price' has shape"):
        runtime.features(env, 4)


def test_non_finite_scores_rank_last(published: dict[str, tuple[ModelVersion, Trained]]) -> None:
    runtime = LtrRuntime.load(published["bpr"][0])
    env = env_of(toy_split(1, 3).x) | {"price": np.array([1.0, np.nan, 2.0])}
    scores = runtime.score(env, 3)
    assert np.isfinite(scores[[0, 2]]).all() and scores[1] == -np.inf


def copy_version(mv: ModelVersion, dest: Path) -> ModelVersion:
    shutil.copytree(mv.path, dest)
    return ModelVersion(mv.name, mv.version, dest)


def edit_metadata(mv: ModelVersion, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((mv.path / METADATA_FILE).read_text())
    change(meta)
    (mv.path / METADATA_FILE).write_text(json.dumps(meta))


def write_graph(mv: ModelVersion, graph: onnx.ModelProto) -> None:
    """Replace the graph and re-pin it: a deliberate, consistent but wrong version."""
    onnx.save(graph, str(mv.path / LTR_MODEL_FILE))
    edit_metadata(mv, lambda m: m.update(sha256=checksums(mv.path)))


def identity_graph(cols: int, out_shape: list[Any], in_name: str = "inputs") -> onnx.ModelProto:
    x = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["n", cols])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, out_shape)
    node = helper.make_node("ReduceSum", [in_name], ["score"], keepdims=0, axes=[1])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 11)])  # fmt: skip


def test_a_tampered_graph_is_refused(
    published: dict[str, tuple[ModelVersion, Trained]], tmp_path: Path
) -> None:
    mv = copy_version(published["lambdamart"][0], tmp_path / "v")
    with (mv.path / LTR_MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(LtrLoadError, match=f"{LTR_MODEL_FILE} does not match its sha256"):
        LtrRuntime.load(mv)


def test_the_single_model_baseline_is_refused(
    published: dict[str, tuple[ModelVersion, Trained]],
) -> None:
    with pytest.raises(LtrLoadError, match="offline baseline"):
        LtrRuntime.load(published["single_model"][0])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m.update(kind="ranker"), "metadata.json: kind"),
        (lambda m: m.update(inputs=["ctr", "cvr"]), "inputs name 2 columns"),
        (lambda m: m.update(input_name="x"), "input_name is 'x'"),
        (lambda m: m.update(output_name="label"), "output_name is 'label'"),
        (lambda m: m.pop("grades"), "metadata.json: grades"),
    ],
)
def test_metadata_that_does_not_fit_the_graph_is_refused(
    published: dict[str, tuple[ModelVersion, Trained]], tmp_path: Path,
    change: Callable[[dict[str, Any]], None], named: str,
) -> None:  # fmt: skip
    mv = copy_version(published["bpr"][0], tmp_path / "v")
    edit_metadata(mv, change)
    with pytest.raises(LtrLoadError, match=named) as e:
        LtrRuntime.load(mv)
    assert mv.version in str(e.value)


def test_a_graph_with_the_wrong_shape_is_refused(
    published: dict[str, tuple[ModelVersion, Trained]], tmp_path: Path
) -> None:
    mv = copy_version(published["bpr"][0], tmp_path / "wide")
    write_graph(mv, identity_graph(7, ["n"]))
    edit_metadata(mv, lambda m: m.update(output_name="score"))
    with pytest.raises(LtrLoadError, match=r"is tensor\(float\) \['n', 7\]"):
        LtrRuntime.load(mv)
    mv2 = copy_version(published["bpr"][0], tmp_path / "matrix")
    write_graph(mv2, identity_graph(5, ["n", 2]))
    with pytest.raises(LtrLoadError, match=r"expected float32 \[N\] or \[N, 1\]"):
        LtrRuntime.load(mv2)
    ok = copy_version(published["bpr"][0], tmp_path / "sum")
    write_graph(ok, identity_graph(5, ["n"]))
    x = toy_split(1, 3).x
    np.testing.assert_allclose(LtrRuntime.load(ok).score(env_of(x), 3), x.sum(axis=1), rtol=1e-6)


def test_unreadable_metadata_is_refused(
    published: dict[str, tuple[ModelVersion, Trained]], tmp_path: Path
) -> None:
    mv = copy_version(published["bpr"][0], tmp_path / "v")
    (mv.path / METADATA_FILE).write_text("{not json")
    with pytest.raises(LtrLoadError, match="cannot read metadata.json"):
        LtrRuntime.load(mv)


def test_the_service_runs_a_tree_ensemble_without_lightgbm_or_torch(
    published: dict[str, tuple[ModelVersion, Trained]],
) -> None:
    """The serve extra has no LightGBM, onnxmltools or torch: onnxruntime alone runs the
    ai.onnx.ml TreeEnsembleRegressor (checked in a process where importing them fails)."""
    mv, trained = published["lambdamart"]
    x = toy_split(1, 6, seed=4).x
    code = (
        "import sys, json, numpy as np\n"
        "for m in ('lightgbm', 'onnxmltools', 'torch', 'sklearn', 'training'):\n"
        "    sys.modules[m] = None  # any import of them raises ImportError\n"
        "from pathlib import Path\n"
        "from mtrank.registry import ModelVersion\n"
        "from service.fusion_model import LtrRuntime\n"
        f"mv = ModelVersion({mv.name!r}, {mv.version!r}, Path({str(mv.path)!r}))\n"
        "rt = LtrRuntime.load(mv)\n"
        f"x = np.array({x.tolist()!r}, dtype=np.float32)\n"
        "print(json.dumps(rt.score_features(x).tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2], check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(json.loads(out.stdout), trained.native(x), atol=1e-5)
