"""ModelRuntime and ModelManager on the model the training pipeline exported: numerics,
validation, providers, hot swap. Broken models are copies of the real export with one thing broken.

The provider tests hold whichever onnxruntime build is installed: where they need a GPU build,
they make ``get_available_providers`` list CUDA and make the session report what a GPU build
would (CUDA started, or silently dropped); the graph itself always runs on the real CPU session.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mtrank.registry import METADATA_FILE, MODEL_FILE, Registry, sha256_file
from mtrank.spec import FeatureSpec
from service.app import create_app
from service.providers import CPU, CUDA, ProviderError, resolve_providers
from service.runtime import (
    ModelLoadError,
    ModelManager,
    ModelNotLoaded,
    ModelRuntime,
    ReloadResult,
)
from tests.service.conftest import World
from tests.support.app_client import AppClient
from tests.support.exported import ExportedModels, onnx_outputs, random_inputs

WARM = (1, 7)  # small warm-up batches keep the tests fast


def test_outputs_equal_onnxruntime_on_the_exported_graph(
    tmp_path: Path, exported_models: ExportedModels
) -> None:
    mv = exported_models.publish(tmp_path, "ranker")
    rt = ModelRuntime.load(mv, providers="cpu", warmup_sizes=(1, 100, 1000))
    spec = exported_models.spec
    assert rt.providers == (CPU,) and rt.output_names == tuple(spec.task_names)
    sparse, dense = random_inputs(spec, 257)
    out = rt.run(sparse, dense)
    ref = onnx_outputs(mv, sparse, dense)
    assert set(out) == set(ref) == {"ctr", "cvr", "cart", "collect", "stay"}
    for name, values in out.items():
        assert values.shape == (257,) and values.dtype == np.float32
        np.testing.assert_allclose(values, ref[name], rtol=1e-5, atol=1e-6)
        assert np.ptp(values) > 0, name  # the rows are told apart
    assert rt.metadata == mv.metadata() and rt.metadata["model_type"] == "mmoe"
    empty = rt.run(sparse[:0], dense[:0])
    assert all(v.shape == (0,) for v in empty.values())


def test_default_rows_are_the_cold_start_encoding(
    tmp_path: Path, exported_models: ExportedModels
) -> None:
    rt = ModelRuntime.load(exported_models.publish(tmp_path, "m"), warmup_sizes=WARM)
    sparse, dense = rt.default_inputs(3)
    assert sparse.tolist() == [[0] * len(rt.spec.sparse)] * 3  # every field's OOV row
    raw = [(np.log1p(f.default) if f.log1p else f.default, f) for f in rt.spec.dense]
    np.testing.assert_allclose(dense[0], [(x - f.mean) / f.std for x, f in raw], rtol=1e-6)


def restamp(version_dir: Path) -> None:
    """Record the files' checksums in metadata.json, as an export of these very files would."""
    meta = json.loads((version_dir / METADATA_FILE).read_text())
    meta["onnx_sha256"] = sha256_file(version_dir / MODEL_FILE)
    meta["spec_sha256"] = FeatureSpec.load(version_dir).sha256()
    (version_dir / METADATA_FILE).write_text(json.dumps(meta))


def rename_graph_input(old: str, new: str) -> Callable[[Path], None]:
    def mutate(version_dir: Path) -> None:
        model = onnx.load(str(version_dir / MODEL_FILE))
        for value in model.graph.input:
            value.name = new if value.name == old else value.name
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name == old:
                    node.input[k] = new
        onnx.save(model, str(version_dir / MODEL_FILE))
        restamp(version_dir)

    return mutate


def drop_graph_output(name: str) -> Callable[[Path], None]:
    def mutate(version_dir: Path) -> None:
        model = onnx.load(str(version_dir / MODEL_FILE))
        keep = [o for o in model.graph.output if o.name != name]
        del model.graph.output[:]
        model.graph.output.extend(keep)
        onnx.save(model, str(version_dir / MODEL_FILE))
        restamp(version_dir)

    return mutate


def truncate_graph(version_dir: Path) -> None:
    """Half a model.onnx whose checksum was recorded anyway (past the checksum check)."""
    data = (version_dir / MODEL_FILE).read_bytes()
    (version_dir / MODEL_FILE).write_bytes(data[: len(data) // 2])
    restamp(version_dir)


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
    tmp_path: Path, exported_models: ExportedModels, breakage: str, message: str
) -> None:
    spec = exported_models.spec
    if breakage == "input_name":
        mv = exported_models.publish(
            tmp_path, "m", mutate=rename_graph_input(spec.sparse_input, "ids")
        )
    elif breakage == "missing_output":
        mv = exported_models.publish(tmp_path, "m", mutate=drop_graph_output("cvr"))
    elif breakage == "truncated":
        mv = exported_models.publish(tmp_path, "m", mutate=truncate_graph)
    elif breakage == "dense_width":  # a spec.json (with its checksum) that lost a dense field
        mv = exported_models.publish(
            tmp_path, "m", spec=spec.model_copy(update={"dense": spec.dense[:3]})
        )
    else:
        mv = exported_models.publish(tmp_path, "m")
    if breakage == "bad_spec":
        (mv.path / "spec.json").write_text('{"sparse": [')
    elif breakage == "checksum":
        meta = mv.metadata() | {"onnx_sha256": "0" * 64}
        (mv.path / METADATA_FILE).write_text(json.dumps(meta))
    elif breakage == "spec_checksum":
        other = spec.model_copy(update={"outputs": spec.outputs[:1]})
        meta = mv.metadata() | {"spec_sha256": other.sha256()}
        (mv.path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=message):
        ModelRuntime.load(mv, warmup_sizes=WARM)


def test_the_exporters_checksums_are_checked_and_accepted(
    tmp_path: Path, exported_models: ExportedModels
) -> None:
    mv = exported_models.publish(tmp_path, "m")
    meta = mv.metadata()
    assert meta["onnx_sha256"] == sha256_file(mv.model_path)
    assert meta["spec_sha256"] == FeatureSpec.load(mv.path).sha256()
    assert ModelRuntime.load(mv, warmup_sizes=WARM).model == mv


# ---------------------------------------------------------------- execution providers
class _ReportingSession:
    """A real CPU session that reports ``providers`` from get_providers(), as a GPU build would."""

    def __init__(self, real: ort.InferenceSession, providers: list[str]) -> None:
        self._real, self._providers = real, providers

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def gpu_build(monkeypatch: pytest.MonkeyPatch, starts: Sequence[str]) -> list[list[str]]:
    """onnxruntime as a CUDA build: CUDA is available, and of the requested providers only those
    in ``starts`` start (the others are dropped without an error, as ORT does). Returns the
    provider lists sessions were asked for."""
    real = ort.InferenceSession
    asked: list[list[str]] = []

    def session(path: str, sess_options: Any = None, providers: Any = None) -> Any:
        asked.append(list(providers))
        cpu = real(path, sess_options=sess_options, providers=[CPU])
        return _ReportingSession(cpu, [p for p in providers if p in starts])

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    return asked


def test_provider_names_resolve_against_the_installed_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert resolve_providers("cpu") == [CPU]  # every build has CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])  # a CPU-only build
    assert resolve_providers("auto") == [CPU]
    with pytest.raises(ProviderError, match=r"\['CUDAExecutionProvider'\] are not available"):
        resolve_providers("cuda")
    with pytest.raises(ProviderError, match="not available"):
        resolve_providers(" , ")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])  # a CUDA build
    assert resolve_providers("auto") == [CUDA, CPU]
    assert resolve_providers(" AUTO ") == [CUDA, CPU]
    assert resolve_providers(["cuda"]) == [CUDA, CPU]  # CPU stays as the fallback
    assert resolve_providers("CUDAExecutionProvider, cpu") == [CUDA, CPU]
    assert resolve_providers("cpu") == [CPU]


def test_cpu_runs_on_the_real_session(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exported_models: ExportedModels
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    mv = exported_models.publish(tmp_path, "m")
    for providers in ("auto", "cpu"):
        rt = ModelRuntime.load(mv, providers=providers, warmup_sizes=WARM)
        assert rt.provider == CPU and rt.providers == (CPU,)


def test_explicit_cuda_that_cannot_start_stops_the_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exported_models: ExportedModels
) -> None:
    asked = gpu_build(monkeypatch, starts=[CPU])  # e.g. no driver: ORT keeps only CPU
    mv = exported_models.publish(tmp_path, "m")
    with pytest.raises(ModelLoadError, match="'CUDAExecutionProvider'.* could not start") as e:
        ModelRuntime.load(mv, providers="cuda", warmup_sizes=WARM)
    assert f"model m/{mv.version}" in str(e.value) and "MTRANK_ORT_PROVIDERS=auto" in str(e.value)
    assert asked == [[CUDA, CPU]]
    # At start-up the manager raises it (the service does not start) ...
    mgr = ModelManager(tmp_path, ["m"], providers="cuda", warmup_sizes=WARM)
    with pytest.raises(ModelLoadError, match="could not start"):
        mgr.reload(raise_on_error=True)
    assert not mgr.loaded


def test_auto_falls_back_to_cpu_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exported_models: ExportedModels,
) -> None:
    asked = gpu_build(monkeypatch, starts=[CPU])
    seen: list[ReloadResult] = []
    exported_models.publish(tmp_path, "m")
    mgr = ModelManager(tmp_path, ["m"], providers="auto", warmup_sizes=WARM, on_reload=seen.append)
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        mgr.reload(raise_on_error=True)
    assert asked == [[CUDA, CPU]]
    assert any(
        "['CUDAExecutionProvider'] could not start, running on CPUExecutionProvider" in r.message
        for r in caplog.records
    )
    assert mgr.current().providers == {"m": CPU}
    assert seen[-1].result == "success" and seen[-1].providers == {"m": CPU}


def test_a_started_provider_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exported_models: ExportedModels
) -> None:
    gpu_build(monkeypatch, starts=[CUDA, CPU])
    mv = exported_models.publish(tmp_path, "m")
    for providers in ("auto", "cuda"):
        rt = ModelRuntime.load(mv, providers=providers, warmup_sizes=WARM)
        assert rt.provider == CUDA and rt.providers == (CUDA, CPU)
    sparse, dense = random_inputs(exported_models.spec, 4)
    np.testing.assert_allclose(
        rt.run(sparse, dense)["ctr"], onnx_outputs(mv, sparse, dense)["ctr"], rtol=1e-5
    )
    mgr = ModelManager(tmp_path, ["m"], providers="cuda", warmup_sizes=WARM)
    assert mgr.reload(raise_on_error=True).providers == {"m": CUDA}
    assert mgr.reload().providers == {"m": CUDA}  # unchanged: still says what serves


def test_the_service_does_not_start_on_a_cuda_that_did_not(
    monkeypatch: pytest.MonkeyPatch, world: World
) -> None:
    gpu_build(monkeypatch, starts=[CPU])
    with pytest.raises(ModelLoadError, match=r"\['CUDAExecutionProvider'\] were requested"):
        AppClient(create_app(world.settings(ort_providers="cuda")))
    client = AppClient(create_app(world.settings(ort_providers="auto")))  # falls back, and says so
    try:
        assert [m["provider"] for m in client.get("/models").json()] == [CPU]
        labels = {"name": world.model.name, "version": world.model.version, "provider": CPU}
        assert client.app.state.metrics.registry.get_sample_value("mtrank_model_info", labels) == 1
    finally:
        client.close()


# ---------------------------------------------------------------- ModelManager
def manager(root: Path, names: list[str], seen: list[ReloadResult] | None = None) -> ModelManager:
    return ModelManager(
        root,
        names,
        providers="cpu",
        warmup_sizes=WARM,
        on_reload=seen.append if seen is not None else None,
    )


def test_hot_swap_keeps_the_old_bundle_on_failure(
    tmp_path: Path, exported_models: ExportedModels
) -> None:
    seen: list[ReloadResult] = []
    mgr = manager(tmp_path, ["ranker"], seen)
    with pytest.raises(ModelNotLoaded):
        mgr.current()
    v1 = exported_models.publish(tmp_path, "ranker")
    assert mgr.reload(raise_on_error=True).result == "success"
    first = mgr.current()
    assert first.versions == {"ranker": v1.version}
    assert mgr.reload().result == "unchanged" and mgr.current() is first

    v2 = exported_models.publish(tmp_path, "ranker", alternate=True)  # other weights
    assert mgr.reload().result == "success"
    second = mgr.current()
    assert second.versions == {"ranker": v2.version} and second is not first
    sparse, dense = random_inputs(exported_models.spec, 5)
    want1, want2 = onnx_outputs(v1, sparse, dense)["ctr"], onnx_outputs(v2, sparse, dense)["ctr"]
    assert not np.allclose(want1, want2, rtol=1e-3)  # so each bundle's scores tell who scored
    # a request holding the old bundle still scores with v1, consistently
    np.testing.assert_allclose(first.run(sparse, dense)["ctr"], want1, rtol=1e-5)
    np.testing.assert_allclose(second.run(sparse, dense)["ctr"], want2, rtol=1e-5)

    v3 = exported_models.publish(tmp_path, "ranker", mutate=truncate_graph)  # a broken export
    failed = mgr.reload()
    assert failed.result == "failure" and "cannot load model.onnx" in (failed.error or "")
    assert failed.versions == {"ranker": v2.version}
    assert failed.requested == {"ranker": v3.version}
    assert mgr.current() is second  # still serving v2
    assert failed.providers == {"ranker": CPU}  # of what still serves
    assert [r.result for r in seen] == ["success", "unchanged", "success", "failure"]
    with pytest.raises(ModelLoadError):
        mgr.reload(raise_on_error=True)
    Registry(tmp_path).promote("ranker", v1.version)  # rollback
    assert mgr.reload().result == "success" and mgr.current().versions == {"ranker": v1.version}


def test_several_models_merge_outputs_and_refuse_duplicates(
    tmp_path: Path, exported_models: ExportedModels
) -> None:
    # Copies of the real exports whose spec.json serves only some of the graph's outputs.
    a = exported_models.publish(tmp_path, "a", outputs=("ctr", "cvr"))
    b = exported_models.publish(tmp_path, "b", alternate=True, outputs=("stay",))
    mgr = manager(tmp_path, ["a", "b"])
    mgr.reload(raise_on_error=True)
    bundle = mgr.current()
    assert bundle.output_names == ("ctr", "cvr", "stay")
    assert bundle.versions == {"a": a.version, "b": b.version}
    sparse, dense = random_inputs(exported_models.spec, 9)
    out = bundle.run(sparse, dense)
    of_a, of_b = onnx_outputs(a, sparse, dense), onnx_outputs(b, sparse, dense)
    ref = {"ctr": of_a["ctr"], "cvr": of_a["cvr"], "stay": of_b["stay"]}
    assert set(out) == {"ctr", "cvr", "stay"}
    for name in out:
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5)
    assert not np.allclose(of_a["stay"], of_b["stay"], rtol=1e-3)  # b's stay, not a's

    exported_models.publish(tmp_path, "c", outputs=("cvr",))
    with pytest.raises(ModelLoadError, match="output 'cvr' is produced by both 'a' and 'c'"):
        manager(tmp_path, ["a", "c"]).reload(raise_on_error=True)
    # Another normalisation of one dense field: the snapshot of one cannot feed the other.
    spec = exported_models.spec
    moved = spec.dense[0].model_copy(update={"mean": spec.dense[0].mean + 1.0})
    other = spec.model_copy(
        update={"dense": [moved, *spec.dense[1:]], "outputs": [spec.outputs[-1]]}
    )
    assert other.task_names == ["stay"]
    exported_models.publish(tmp_path, "d", spec=other)
    with pytest.raises(ModelLoadError, match="take different features"):
        manager(tmp_path, ["a", "d"]).reload(raise_on_error=True)


def test_watch_picks_up_new_versions_and_reports_a_broken_one_once(
    tmp_path: Path, exported_models: ExportedModels
) -> None:
    exported_models.publish(tmp_path, "ranker")
    seen: list[ReloadResult] = []
    mgr = manager(tmp_path, ["ranker"], seen)
    mgr.reload(raise_on_error=True)

    def failures() -> int:
        return sum(r.result == "failure" for r in seen)

    async def until(check: object, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():  # type: ignore[operator]
            assert asyncio.get_running_loop().time() < deadline, "watch did not react in time"
            await asyncio.sleep(0.02)

    async def go() -> None:
        task = asyncio.create_task(mgr.watch(interval_s=0.02))
        try:
            v2 = exported_models.publish(tmp_path, "ranker", alternate=True)
            await until(lambda: mgr.current().versions == {"ranker": v2.version})
            exported_models.publish(tmp_path, "ranker", mutate=truncate_graph)
            await until(lambda: failures() == 1)
            await asyncio.sleep(0.2)  # ten more intervals
            assert failures() == 1  # not retried while current is unchanged
            assert mgr.current().versions == {"ranker": v2.version}
            v4 = exported_models.publish(tmp_path, "ranker")
            await until(lambda: mgr.current().versions == {"ranker": v4.version})
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
