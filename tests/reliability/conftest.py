"""Fixtures of the reliability tests: a model registry, private Redis servers, real `mtrank serve`.

Model creation lives in ONE fixture, :func:`served_model`: the MMoE the training pipeline
exported (``trained_world`` in tests/conftest.py) with a snapshot of its records
(:func:`harness.stack.build_model_source`). Everything else (new versions for hot reload,
corrupt copies) is derived from whatever it produced, by copying the version directory.

Each stack (:mod:`harness.stack`) is a private ``redis-server`` on a free port (no persistence)
holding the snapshot, plus ``mtrank serve --workers 2`` on another free port, both on 127.0.0.1.
The stacks, request bodies and constants live in harness/ because the soak benchmark runs them
too; what only the tests need (fixtures, broken model copies, hostile formulas) stays here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from harness.stack import ModelSource, Stack, StackFactory, build_model_source
from harness.trained import TrainedWorld
from mtrank.registry import METADATA_FILE, MODEL_FILE, ModelVersion, Registry
from mtrank.spec import FeatureSpec


@pytest.fixture(scope="session")
def served_model(
    trained_world: TrainedWorld, tmp_path_factory: pytest.TempPathFactory
) -> ModelSource:
    """THE model of these tests: exported by the real training pipeline (tests/conftest.py)."""
    return build_model_source(tmp_path_factory.mktemp("rel-registry"), trained_world)


def publish_copy(
    source: ModelSource, version: str, mutate: Callable[[Path], None] | None = None
) -> ModelVersion:
    """Publish a copy of the served version under a new version name (not promoted).

    ``mutate(staging_dir)`` may break the copy (truncate model.onnx, rename an input). The
    copy's metadata loses ``onnx_sha256`` so ONNX Runtime itself, not the checksum, judges it.
    """
    registry = Registry(source.root)
    staging = registry.staging_dir(source.name)
    src = registry.resolve(source.name, source.version).path
    for item in src.iterdir():
        shutil.copy2(item, staging / item.name)
    meta_path = staging / METADATA_FILE
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    meta.pop("onnx_sha256", None)
    meta_path.write_text(json.dumps(meta))
    if mutate is not None:
        mutate(staging)
    return registry.publish(source.name, staging, version)


def truncate_model(staging: Path) -> None:
    path = staging / MODEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rename_sparse_input(spec: FeatureSpec) -> Callable[[Path], None]:
    """A mutation giving the graph's sparse input another name than the spec's."""

    def mutate(staging: Path) -> None:
        import onnx

        path = staging / MODEL_FILE
        model = onnx.load(str(path))
        old, new = spec.sparse_input, spec.sparse_input + "_renamed"
        for value in model.graph.input:
            if value.name == old:
                value.name = new
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name == old:
                    node.input[k] = new
        onnx.save(model, str(path))

    return mutate


# Fusion formulas that try to reach Python or blow up: each must be refused at load.
HOSTILE_FORMULAS = [
    "ctr.__class__",
    "ctr.__class__.__mro__[1].__subclasses__()",
    "__import__('os').system('true')",
    "__builtins__",
    "__class__",
    "open('/etc/passwd')",
    "eval('1')",
    "exec('x = 1')",
    "getattr(ctr, 'real')",
    "exp(ctr).real",
    "lambda: ctr",
    "(lambda x: x)(ctr)",
    "9**9**9",
    "ctr ** 1000",
    "2 ** 65",
    "[x for x in ctr]",
    "sum(x for x in ctr)",
    "{x: 1 for x in ctr}",
    "ctr[0]",
    "ctr if cvr else 1",
    "ctr and cvr",
    "ctr < cvr",
    "(x := ctr)",
    "f'{ctr}'",
    "'ctr'",
    "b'x'",
    "min(*ctr)",
    "max(ctr, key=cvr)",
    "ctr // 2",
    "ctr % 2",
    "~ctr",
    "not ctr",
    "1e999",
    "ctr; import os",
    "(" * 200 + "ctr" + ")" * 200,
    "-" * 5000 + "ctr",
]


# ------------------------------------------------------------------------------------ stacks
@pytest.fixture(scope="module")
def make_stack(
    served_model: ModelSource, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    """Start stacks for one test module; all are shut down when the module ends."""
    factory = StackFactory(tmp_path_factory.mktemp("rel-stack"), served_model, [])
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def main_stack(
    served_model: ModelSource, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack shared by the load, counter and hostile-input tests (they do not break it)."""
    factory = StackFactory(tmp_path_factory.mktemp("rel-main"), served_model, [])
    try:
        yield factory()
    finally:
        factory.close()


# ------------------------------------------------------------------------------------ bodies
def summary_of(status: int, body: bytes) -> dict[str, Any] | None:
    """What the load tests keep of a response: items, degraded reasons, model version."""
    if status != 200:
        return {"error": body[:300].decode(errors="replace")}
    data = orjson.loads(body)
    return {
        "items": [x["item_id"] for x in data["items"]],
        "degraded": data["degraded"],
        "version": data["model"]["version"],
    }


# ------------------------------------------------------------------------------------ figures
FIGURES: dict[str, str] = {}


@pytest.fixture
def report_figure(record_property: Callable[[str, object], None]) -> Callable[[str, str], None]:
    """Record a measured figure: shown in the terminal summary and in JUnit XML properties."""

    def record(name: str, value: str) -> None:
        FIGURES[name] = value
        record_property(name, value)

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("mtrank reliability figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
