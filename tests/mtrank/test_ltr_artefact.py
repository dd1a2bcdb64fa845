"""The LTR version contract: metadata checks name the key, checksums catch a changed file, the
fusion namespace check names what is missing, and publish/promote/resolve are atomic renames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mtrank.ltr_artefact import (
    LTR_MODEL_FILE,
    METADATA_FILE,
    LtrMetadata,
    checksums,
    fusion_names,
    missing_inputs,
    problems,
    promote,
    publish,
    resolve,
)
from mtrank.registry import Registry, RegistryError


def write_version(directory: Path, **changes: Any) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LTR_MODEL_FILE).write_bytes(b"not really a graph, but pinned all the same")
    meta: dict[str, Any] = {
        "kind": "ltr",
        "trainer": "lambdamart",
        "input_space": "fusion",
        "inputs": ["ctr", "cvr", "price"],
        "output_name": "variable",
        "grades": {"impression": 0, "click": 1, "purchase": 3},
        "label_gain": [0.0, 1.0, 2.0, 3.0],
        "sha256": checksums(directory),
    }
    meta.update(changes)
    (directory / METADATA_FILE).write_text(json.dumps(meta))
    return meta


def test_a_whole_version_has_no_problems(tmp_path: Path) -> None:
    meta = write_version(tmp_path)
    assert problems(tmp_path, meta) == []
    assert LtrMetadata.parse(meta).inputs == ["ctr", "cvr", "price"]


def test_a_changed_graph_is_named(tmp_path: Path) -> None:
    meta = write_version(tmp_path)
    with (tmp_path / LTR_MODEL_FILE).open("ab") as f:
        f.write(b"\0")
    assert problems(tmp_path, meta) == [
        f"{LTR_MODEL_FILE} does not match its sha256 in {METADATA_FILE}"
    ]


def test_a_missing_graph_is_named(tmp_path: Path) -> None:
    meta = write_version(tmp_path)
    (tmp_path / LTR_MODEL_FILE).unlink()
    assert problems(tmp_path, meta) == [f"{LTR_MODEL_FILE} is missing"]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"kind": "recall"}, "metadata.json: kind:"),
        ({"trainer": "xgboost"}, "metadata.json: trainer:"),
        ({"inputs": []}, "metadata.json: inputs:"),
        ({"inputs": ["ctr", "ctr"]}, "repeated: ['ctr']"),
        ({"grades": {"click": 99}}, "metadata.json: grades:"),
        ({"sha256": None}, "metadata.json: sha256:"),
        ({"output_name": None}, "metadata.json: output_name:"),
    ],
)
def test_bad_metadata_names_the_key(tmp_path: Path, changes: dict[str, Any], named: str) -> None:
    meta = write_version(tmp_path, **changes)
    (found,) = problems(tmp_path, meta)
    assert named in found


def test_a_single_model_baseline_is_not_servable(tmp_path: Path) -> None:
    meta = write_version(tmp_path, trainer="single_model", input_space="features")
    assert problems(tmp_path, meta, servable=False) == []
    (found,) = problems(tmp_path, meta)
    assert "input_space is 'features'" in found and "offline baseline" in found


def test_the_fusion_namespace_names_what_is_missing() -> None:
    names = fusion_names(["ctr", "cvr"], ["temperature"])
    assert {"ctr", "cvr", "price", "quality", "promoted", "temperature"} == names
    assert "rule_weight" not in names
    assert missing_inputs(["ctr", "stay", "price", "cart"], names) == ["stay", "cart"]


def test_publish_promote_resolve(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    staging = registry.staging_dir("fusion")
    write_version(staging)
    mv = publish(registry, "fusion", staging, version="v1")
    assert not staging.exists() and (mv.path / LTR_MODEL_FILE).is_file()
    with pytest.raises(RegistryError, match="no current version"):
        resolve(registry, "fusion")
    promote(registry, "fusion", "v1")
    assert resolve(registry, "fusion") == mv
    assert registry.current("fusion") == "v1"
    with pytest.raises(RegistryError, match="has no version 'v2'"):
        resolve(registry, "fusion", "v2")
    (tmp_path / "fusion" / "v1" / LTR_MODEL_FILE).rename(tmp_path / "fusion" / "v1" / "model.onnx")
    with pytest.raises(RegistryError, match="is not an LTR version"):
        resolve(registry, "fusion", "v1")
    (tmp_path / "fusion" / "v1" / "model.onnx").rename(tmp_path / "fusion" / "v1" / LTR_MODEL_FILE)
    again = registry.staging_dir("fusion")
    write_version(again)
    with pytest.raises(RegistryError, match="already exists"):
        publish(registry, "fusion", again, version="v1")
    empty = registry.staging_dir("fusion")
    with pytest.raises(RegistryError, match=f"holds no {LTR_MODEL_FILE}"):
        publish(registry, "fusion", empty, version="v3")
