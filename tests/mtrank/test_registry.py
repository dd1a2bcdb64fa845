"""The model registry: atomic publish, promote, listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrank.cli import models as models_cli
from mtrank.registry import CURRENT_FILE, MODEL_FILE, Registry, RegistryError


def _build(reg: Registry, name: str, payload: bytes = b"onnx") -> Path:
    staging = reg.staging_dir(name)
    (staging / MODEL_FILE).write_bytes(payload)
    (staging / "metadata.json").write_text(
        json.dumps({"model_type": "mmoe", "metrics": {"ctr_auc": 0.71, "stay_rmse": 2.5}})
    )
    return staging


def test_publish_promote_resolve(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    mv1 = reg.publish("shop", _build(reg, "shop"), version="v1")
    assert reg.current("shop") is None
    with pytest.raises(RegistryError, match="no current version"):
        reg.resolve("shop")
    reg.promote("shop", "v1")
    assert reg.resolve("shop").path == mv1.path
    mv2 = reg.publish("shop", _build(reg, "shop", b"other"), version="v2")
    assert reg.current("shop") == "v1"  # publishing never moves current
    reg.promote("shop", "v2")
    assert reg.resolve("shop") == mv2
    assert reg.versions("shop") == ["v1", "v2"]
    assert reg.names() == ["shop"]
    # no staging leftovers, no temporary pointer files
    leftovers = [p.name for p in reg.model_dir("shop").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_promote_unknown_version_leaves_current(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    reg.publish("shop", _build(reg, "shop"), version="v1")
    reg.promote("shop", "v1")
    with pytest.raises(RegistryError, match="no version 'v9'"):
        reg.promote("shop", "v9")
    assert (reg.model_dir("shop") / CURRENT_FILE).read_text().strip() == "v1"


def test_publish_refuses_incomplete_build_and_bad_names(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    empty = reg.staging_dir("shop")
    with pytest.raises(RegistryError, match="holds no model.onnx"):
        reg.publish("shop", empty)
    with pytest.raises(RegistryError, match="invalid model name"):
        reg.model_dir("../etc")
    with pytest.raises(RegistryError, match="invalid model version"):
        reg.resolve("shop", "../../x")


def test_versions_sort_by_creation(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    first = reg.publish("m", _build(reg, "m")).version
    second = reg.publish("m", _build(reg, "m")).version
    assert reg.versions("m")[-1] in (first, second)
    assert first[:16] <= second[:16]


def test_models_cli_list_and_promote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(tmp_path)
    reg.publish("shop", _build(reg, "shop"), version="v1")
    reg.publish("shop", _build(reg, "shop"), version="v2")
    assert models_cli.main(["--root", str(tmp_path), "promote", "shop", "v2"]) == 0
    assert models_cli.main(["--root", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "current none -> v2" in out
    assert "* v2" in out and "  v1" in out
    assert "ctr_auc=0.7100 stay_rmse=2.5000" in out
    assert models_cli.main(["--root", str(tmp_path), "promote", "shop", "nope"]) == 1
