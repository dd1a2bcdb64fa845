"""ModelRuntime and ModelManager on real ONNX graphs: numerics, validation, providers, hot swap."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mtrank.registry import METADATA_FILE, ModelVersion, Registry, sha256_file
from service.runtime import (
    CPU,
    CUDA,
    ModelLoadError,
    ModelManager,
    ModelNotLoaded,
    ModelRuntime,
    ReloadResult,
    resolve_providers,
)
from tests.support.onnx_model import build_test_model, make_spec, reference_outputs

SPEC = make_spec()
WARM = (1, 7)  # small warm-up batches keep the tests fast


def random_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    high = np.array([f.vocab_size for f in SPEC.sparse])
    sparse = rng.integers(0, high, size=(n, len(high))).astype(np.int64)  # (n, S)
    dense = rng.normal(size=(n, len(SPEC.dense))).astype(np.float32)  # (n, D)
    return sparse, dense


def test_outputs_equal_a_numpy_recomputation(tmp_path: Path) -> None:
    mv = build_test_model(tmp_path, "ranker", seed=3)
    rt = ModelRuntime.load(mv, providers="cpu", warmup_sizes=(1, 100, 1000))
    assert rt.providers == (CPU,) and rt.output_names == ("ctr", "cvr", "stay", "cart", "collect")
    sparse, dense = random_inputs(257)
    out = rt.run(sparse, dense)
    ref = reference_outputs(mv, sparse, dense)
    assert set(out) == set(ref)
    for name, values in out.items():
        assert values.shape == (257,) and values.dtype == np.float32
        np.testing.assert_allclose(values, ref[name], rtol=1e-5, atol=1e-6)
    assert rt.metadata["seed"] == 3
    empty = rt.run(sparse[:0], dense[:0])
    assert all(v.shape == (0,) for v in empty.values())


def test_default_rows_are_the_cold_start_encoding(tmp_path: Path) -> None:
    rt = ModelRuntime.load(build_test_model(tmp_path, "m"), warmup_sizes=WARM)
    sparse, dense = rt.default_inputs(3)
    assert sparse.tolist() == [[0] * 5] * 3
    np.testing.assert_allclose(dense[0], [(np.log1p(20.0) - 3) / 1.5, 0.0, -0.5, 0.0], rtol=1e-6)


def _rewrite_spec(mv: ModelVersion, outputs: tuple[str, ...]) -> None:
    make_spec(outputs).save(mv.path)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("input_name", "input 'sparse_ids' is missing"),
        ("truncated", "onnxruntime cannot load model.onnx"),
        ("missing_output", "output 'cvr' is missing"),
        ("bad_spec", "cannot read spec.json"),
        ("checksum", "does not match onnx_sha256"),
        ("spec_checksum", "does not match spec_sha256"),
        ("dense_width", "input 'dense_values' has shape"),
    ],
)
def test_incompatible_or_corrupt_models_are_refused(
    tmp_path: Path, breakage: str, message: str
) -> None:
    if breakage == "input_name":
        mv = build_test_model(tmp_path, "m", sparse_input="ids")
    elif breakage == "missing_output":
        mv = build_test_model(tmp_path, "m", outputs=("ctr",))
        _rewrite_spec(mv, ("ctr", "cvr"))
    else:
        mv = build_test_model(tmp_path, "m")
    if breakage == "truncated":
        data = mv.model_path.read_bytes()
        mv.model_path.write_bytes(data[: len(data) // 2])
    elif breakage == "bad_spec":
        (mv.path / "spec.json").write_text('{"sparse": [')
    elif breakage == "checksum":
        meta = mv.metadata() | {"onnx_sha256": "0" * 64}
        (mv.path / METADATA_FILE).write_text(json.dumps(meta))
    elif breakage == "spec_checksum":
        meta = mv.metadata() | {"spec_sha256": make_spec(("ctr",)).sha256()}
        (mv.path / METADATA_FILE).write_text(json.dumps(meta))
    elif breakage == "dense_width":
        spec = SPEC.model_copy(update={"dense": SPEC.dense[:3]})
        spec.save(mv.path)
    with pytest.raises(ModelLoadError, match=message):
        ModelRuntime.load(mv, warmup_sizes=WARM)


def test_matching_checksums_are_accepted(tmp_path: Path) -> None:
    mv = build_test_model(tmp_path, "m")
    meta = mv.metadata() | {
        "onnx_sha256": sha256_file(mv.model_path),
        "spec_sha256": SPEC.sha256(),
    }
    (mv.path / METADATA_FILE).write_text(json.dumps(meta))
    assert ModelRuntime.load(mv, warmup_sizes=WARM).model == mv


def test_auto_picks_cuda_when_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_providers("auto") == [CPU]  # this machine: CPU-only build
    assert resolve_providers("cpu") == [CPU]
    with pytest.raises(ModelLoadError, match="not available"):
        resolve_providers("cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert resolve_providers("auto") == [CUDA, CPU]
    assert resolve_providers(["cuda"]) == [CUDA, CPU]  # CPU stays as the fallback
    assert resolve_providers("CUDAExecutionProvider, cpu") == [CUDA, CPU]
    # The session gets CUDA first; this CPU-only build falls back (and says so).
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        rt = ModelRuntime.load(build_test_model(tmp_path, "m"), warmup_sizes=WARM)
    assert rt.providers == (CPU,)


# ---------------------------------------------------------------- ModelManager
def manager(root: Path, names: list[str], seen: list[ReloadResult] | None = None) -> ModelManager:
    return ModelManager(
        root,
        names,
        providers="cpu",
        warmup_sizes=WARM,
        on_reload=seen.append if seen is not None else None,
    )


def test_hot_swap_keeps_the_old_bundle_on_failure(tmp_path: Path) -> None:
    seen: list[ReloadResult] = []
    mgr = manager(tmp_path, ["ranker"], seen)
    with pytest.raises(ModelNotLoaded):
        mgr.current()
    v1 = build_test_model(tmp_path, "ranker", seed=1)
    assert mgr.reload(raise_on_error=True).result == "success"
    first = mgr.current()
    assert first.versions == {"ranker": v1.version}
    assert mgr.reload().result == "unchanged" and mgr.current() is first

    v2 = build_test_model(tmp_path, "ranker", seed=2)
    assert mgr.reload().result == "success"
    second = mgr.current()
    assert second.versions == {"ranker": v2.version} and second is not first
    sparse, dense = random_inputs(5)
    # a request holding the old bundle still scores with v1, consistently
    np.testing.assert_allclose(
        first.run(sparse, dense)["ctr"], reference_outputs(v1, sparse, dense)["ctr"], rtol=1e-5
    )
    np.testing.assert_allclose(
        second.run(sparse, dense)["ctr"], reference_outputs(v2, sparse, dense)["ctr"], rtol=1e-5
    )

    v3 = build_test_model(tmp_path, "ranker", seed=3)
    v3.model_path.write_bytes(v3.model_path.read_bytes()[:100])  # a broken export promoted
    failed = mgr.reload()
    assert failed.result == "failure" and "cannot load model.onnx" in (failed.error or "")
    assert failed.versions == {"ranker": v2.version}
    assert failed.requested == {"ranker": v3.version}
    assert mgr.current() is second  # still serving v2
    assert mgr.reloads == {"success": 2, "failure": 1, "unchanged": 1}
    assert mgr.last_error == failed.error
    assert [r.result for r in seen] == ["success", "unchanged", "success", "failure"]
    with pytest.raises(ModelLoadError):
        mgr.reload(raise_on_error=True)
    Registry(tmp_path).promote("ranker", v1.version)  # rollback
    assert mgr.reload().result == "success" and mgr.current().versions == {"ranker": v1.version}


def test_several_models_merge_outputs_and_refuse_duplicates(tmp_path: Path) -> None:
    a = build_test_model(tmp_path, "a", outputs=("ctr", "cvr"), seed=1)
    b = build_test_model(tmp_path, "b", outputs=("stay",), seed=2)
    mgr = manager(tmp_path, ["a", "b"])
    mgr.reload(raise_on_error=True)
    bundle = mgr.current()
    assert bundle.output_names == ("ctr", "cvr", "stay")
    assert bundle.versions == {"a": a.version, "b": b.version}
    sparse, dense = random_inputs(9)
    out = bundle.run(sparse, dense)
    ref = reference_outputs(a, sparse, dense) | reference_outputs(b, sparse, dense)
    assert set(out) == {"ctr", "cvr", "stay"}
    for name in out:
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5)

    build_test_model(tmp_path, "c", outputs=("cvr",))
    with pytest.raises(ModelLoadError, match="output 'cvr' is produced by both 'a' and 'c'"):
        manager(tmp_path, ["a", "c"]).reload(raise_on_error=True)
    other = SPEC.model_copy(update={"dense": SPEC.dense[:2], "outputs": SPEC.outputs[4:]})
    build_test_model(tmp_path, "d", spec=other)
    with pytest.raises(ModelLoadError, match="take different features"):
        manager(tmp_path, ["a", "d"]).reload(raise_on_error=True)


def test_watch_picks_up_new_versions_and_reports_a_broken_one_once(tmp_path: Path) -> None:
    build_test_model(tmp_path, "ranker", seed=1)
    mgr = manager(tmp_path, ["ranker"])
    mgr.reload(raise_on_error=True)

    async def until(check: object, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():  # type: ignore[operator]
            assert asyncio.get_running_loop().time() < deadline, "watch did not react in time"
            await asyncio.sleep(0.02)

    async def go() -> None:
        task = asyncio.create_task(mgr.watch(interval_s=0.02))
        try:
            v2 = build_test_model(tmp_path, "ranker", seed=2)
            await until(lambda: mgr.current().versions == {"ranker": v2.version})
            broken = build_test_model(tmp_path, "ranker", seed=3)
            broken.model_path.write_bytes(b"not onnx")
            await until(lambda: mgr.reloads["failure"] == 1)
            await asyncio.sleep(0.2)  # ten more intervals
            assert mgr.reloads["failure"] == 1  # not retried while current is unchanged
            assert mgr.current().versions == {"ranker": v2.version}
            v4 = build_test_model(tmp_path, "ranker", seed=4)
            await until(lambda: mgr.current().versions == {"ranker": v4.version})
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
