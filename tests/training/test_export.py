"""ONNX export: parity gate on every architecture, atomic publish, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from harness.trained import TrainedWorld, ecommerce_config
from mtrank.registry import Registry, sha256_file
from mtrank.spec import FeatureSpec
from training import export as export_module
from training.checkpoint import load_checkpoint
from training.export import ExportError, export, parity_error, parity_inputs
from training.train import train


@pytest.fixture(scope="module", params=["esmm", "ple", "mmoe_attention"])
def other_checkpoint(
    request: pytest.FixtureRequest,
    trained_world: TrainedWorld,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A few training steps of another architecture on the same prepared data."""
    out = tmp_path_factory.mktemp(request.param)
    cfg = ecommerce_config(trained_world.data_dir, request.param, out_dir=out,
                           max_steps=8, epochs=1)  # fmt: skip
    return train(cfg, out, trained_world.data).best_checkpoint


def _onnx_vs_torch(ckpt: Path, mv_path: Path, rows: int = 1000) -> dict[str, float]:
    model, _, _, _ = load_checkpoint(ckpt)
    spec = FeatureSpec.load(mv_path)
    sparse, dense = parity_inputs(spec, rows, seed=123)
    assert (sparse == 0).all(axis=1).any(), "parity rows must include fully out-of-vocabulary rows"
    with torch.no_grad():
        want = model.predict(torch.from_numpy(sparse), torch.from_numpy(dense))
    sess = ort.InferenceSession(str(mv_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sparse_ids": sparse, "dense_values": dense})
    names = [o.name for o in sess.get_outputs()]
    return {n: parity_error(g, want[n].numpy()) for n, g in zip(names, got, strict=True)}


def test_mmoe_export_matches_torch_and_records_metadata(trained_world: TrainedWorld) -> None:
    mv = trained_world.model
    diffs = _onnx_vs_torch(trained_world.checkpoint, mv.path)
    assert set(diffs) == {"ctr", "cvr", "cart", "collect", "stay"}
    assert max(diffs.values()) <= 1e-5
    meta = mv.metadata()
    assert meta["onnx_sha256"] == sha256_file(mv.model_path)
    assert meta["spec_sha256"] == trained_world.spec.sha256()
    assert meta["parity"]["rows"] >= 1000
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
    assert meta["model_type"] == "mmoe"
    assert meta["metrics"]["ctr_auc"] > 0.5
    assert set(meta["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert meta["data_fingerprint"] == trained_world.data.fingerprint
    assert [o["name"] for o in meta["outputs"]] == trained_world.spec.task_names
    # dynamic batch axis: any batch size runs
    sess = ort.InferenceSession(str(mv.model_path), providers=["CPUExecutionProvider"])
    for b in (1, 7, 333):
        out = sess.run(None, {"sparse_ids": np.zeros((b, len(trained_world.spec.sparse)), np.int64),
                              "dense_values": np.zeros((b, len(trained_world.spec.dense)),
                                                       np.float32)})  # fmt: skip
        assert all(o.shape == (b,) for o in out)


def test_other_architectures_export_with_parity(other_checkpoint: Path, tmp_path: Path) -> None:
    mv = export(other_checkpoint, "arch", tmp_path)
    diffs = _onnx_vs_torch(other_checkpoint, mv.path)
    assert max(diffs.values()) <= 1e-5
    if mv.metadata()["model_type"] == "esmm":
        assert "ctcvr" in diffs  # ESMM serves ctr, cvr and ctcvr
    assert Registry(tmp_path).current("arch") == mv.version


def test_parity_error_is_absolute_for_probabilities_relative_for_large_values() -> None:
    assert parity_error(np.array([0.5, 0.2]), np.array([0.5, 0.2 + 3e-6])) == pytest.approx(3e-6)
    assert parity_error(np.array([100.0]), np.array([100.001])) == pytest.approx(1e-5, rel=1e-3)
    assert parity_error(np.array([3.0]), np.array([2.0])) == pytest.approx(0.5)


def test_failed_parity_publishes_nothing_and_keeps_current(
    trained_world: TrainedWorld, tmp_path: Path
) -> None:
    reg = Registry(tmp_path)
    good = export(trained_world.checkpoint, "shop", tmp_path)
    with pytest.raises(ExportError, match="parity check failed"):
        export(trained_world.checkpoint, "shop", tmp_path, tolerance=-1.0)
    assert reg.current("shop") == good.version
    assert reg.versions("shop") == [good.version]
    assert [p.name for p in reg.model_dir("shop").iterdir() if p.name.startswith(".")] == []


def test_export_crash_after_writing_leaves_no_version(
    trained_world: TrainedWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path)
    good = export(trained_world.checkpoint, "shop", tmp_path)

    def boom(*args: object, **kwargs: object) -> dict[str, object]:
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_metadata", boom)
    with pytest.raises(OSError, match="disk full"):
        export(trained_world.checkpoint, "shop", tmp_path)
    assert reg.versions("shop") == [good.version]
    assert reg.current("shop") == good.version
    assert not any(p.name.startswith(".staging") for p in reg.model_dir("shop").iterdir())


def test_export_cli_no_promote(trained_world: TrainedWorld, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rc = export_module.main(["--checkpoint", str(trained_world.checkpoint), "--name", "cli",
                             "--root", str(tmp_path), "--no-promote"])  # fmt: skip
    assert rc == 0
    assert "parity: max |diff|" in capsys.readouterr().out
    reg = Registry(tmp_path)
    assert reg.current("cli") is None
    assert len(reg.versions("cli")) == 1
    meta = json.loads((reg.model_dir("cli") / reg.versions("cli")[0] / "metadata.json").read_text())
    assert meta["name"] == "cli"


def test_int8_variant_is_published_with_its_measured_accuracy_change(
    trained_world: TrainedWorld, tmp_path: Path
) -> None:
    from service.runtime import ModelLoadError, ModelRuntime

    mv = export(trained_world.checkpoint, "q", tmp_path, quantize=True)
    info = mv.metadata()["variants"]["int8"]
    assert info["file"] == "model.int8.onnx"
    assert sha256_file(mv.path / "model.int8.onnx") == info["sha256"]
    tasks = {"ctr_auc", "cvr_auc", "cart_auc", "collect_auc", "stay_rmse"}
    assert set(info["metrics_fp32"]) == set(info["metrics_int8"]) == tasks
    for k in tasks:
        assert info["change"][k] == pytest.approx(info["metrics_int8"][k] - info["metrics_fp32"][k])
    # the fp32 figure is the served model's own: recompute it independently
    split = trained_world.data.valid
    assert split is not None and info["eval_rows"] == min(50_000, len(split))
    fp32 = ModelRuntime.load(mv, providers="cpu")
    int8 = ModelRuntime.load(mv, providers="cpu", variant="int8")
    rows = split.take(slice(0, info["eval_rows"]))
    got = fp32.run(rows.sparse, rows.dense)["ctr"]
    from training.metrics import auc

    assert auc(rows.labels["ctr"], got) == pytest.approx(info["metrics_fp32"]["ctr_auc"], abs=1e-9)
    q = int8.run(rows.sparse, rows.dense)["ctr"]
    assert 0.0 < float(np.max(np.abs(q - got))) < 0.05  # quantised, and close
    assert int8.session is not fp32.session
    with pytest.raises(ModelLoadError, match="no 'int8' variant"):
        ModelRuntime.load(trained_world.model, providers="cpu", variant="int8")
    (mv.path / "model.int8.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelLoadError, match="does not match its sha256"):
        ModelRuntime.load(mv, providers="cpu", variant="int8")
