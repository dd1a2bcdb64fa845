"""The layers of STYLE.md, held by the import-linter contracts in pyproject.toml.

The repository itself must keep every contract, and each contract must be able to fail: a copy of
the source tree with one back-pointing import added (a contract module importing a half, one half
importing the other, a benchmark importing the tests, a circle, torch in the contract) must break
the contract that forbids it, and only by that import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def config() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["tool"]["importlinter"])


def contract(contract_id: str) -> dict[str, Any]:
    return next(c for c in config()["contracts"] if c.get("id") == contract_id)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the tree under ``root`` (its own packages first on sys.path)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],  # reads ./pyproject.toml
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def layer_modules(layer: str) -> set[str]:
    return {m.strip() for m in layer.replace("|", ":").split(":")}


def test_the_repository_keeps_every_import_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(config()['contracts'])} kept, 0 broken" in result.stdout


def test_the_contract_layer_lists_every_module_of_mtrank_but_the_cli() -> None:
    bottom = layer_modules(contract("layers")["layers"][-1])
    in_package = layer_modules(contract("contract-modules")["layers"][-1])
    modules = grimp.build_graph("mtrank", cache_dir=None).find_children("mtrank")
    assert bottom == {f"mtrank.{m}" for m in in_package} == modules - {"mtrank.cli"}


# (file, code appended to it, ids of the contracts it must break, "+"-joined). The HTTP layer
# imports the core, so a core module importing it also closes a circle: both contracts break.
BACK_POINTING = {
    "contract imports a half": ("mtrank/spec.py", "import training.config", "layers"),
    "contract imports the service, inside a function": (
        "mtrank/snapshot_loader.py",
        "def _late() -> None:\n    from service.features import store",
        "layers",
    ),
    "training imports the service": ("training/export.py", "import service.errors", "layers"),
    "service imports training": ("service/rules.py", "from training import losses", "layers"),
    "a half imports the CLI": ("service/app.py", "import mtrank.cli", "layers"),
    "a half imports the harness": ("training/data.py", "import harness.trained", "layers"),
    "the harness imports bench": ("harness/stack.py", "import bench.common", "layers"),
    "bench imports tests": ("bench/soak.py", "import tests.support", "layers"),
    "tests import bench": ("tests/conftest.py", "import bench.common", "layers"),
    "contract imports torch": ("mtrank/fusion.py", "import torch", "contract-third-party"),
    "contract imports FastAPI": ("mtrank/registry.py", "import fastapi", "contract-third-party"),
    "a circle inside the contract": ("mtrank/yamlio.py", "import mtrank.fusion", "acyclic"),
    "a circle inside the service": (
        "service/features/store.py",
        "def _late() -> None:\n    import service.pipeline",
        "acyclic",
    ),
    "a rule imports the HTTP layer": (
        "service/rules.py",
        "from service.api import schemas",
        "http-boundary+acyclic",
    ),
    "feature assembly imports the HTTP layer, inside a function": (
        "service/features/assemble.py",
        "def _late() -> None:\n    import service.api.routes",
        "http-boundary+acyclic",
    ),
    "a new module of mtrank in no layer": (
        "mtrank/extra.py",
        "import mtrank.spec",
        "contract-modules",
    ),
}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python files of every root package and pyproject.toml, copied once."""
    dest = tmp_path_factory.mktemp("layers") / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.yaml", "*.json", "*.md")
    for package in config()["root_packages"]:
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


@pytest.mark.parametrize("case", list(BACK_POINTING))
def test_a_back_pointing_import_breaks_its_contract(
    case: str, source_copy: Path, tmp_path: Path
) -> None:
    file, code, broken_id = BACK_POINTING[case]
    tree = tmp_path / "repo"
    shutil.copytree(source_copy, tree)
    target = tree / file
    before = target.read_text() if target.exists() else ""
    target.write_text(before + "\n\n" + code + "\n")

    result = lint_imports(tree)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    names = {c["id"]: " ".join(c["name"].split()) for c in config()["contracts"]}
    report = " ".join(out.split())  # the report wraps long contract names
    broken = {cid for cid, name in names.items() if f"{name} BROKEN" in report}
    assert broken == set(broken_id.split("+")), out
