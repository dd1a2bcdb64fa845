"""Prose docs against the tree: every name a reader may copy from them must exist.

test_docs_examples.py checks the reference docs' marked tables and examples. This file checks the
prose: README.md and every page under docs/ may name only settings, metrics, alerts, commands,
make targets, files and tests that exist, and the reliability guarantees may cite only tests that
are collected and carry no "fails today" marker.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from mtrank.cli import COMMANDS
from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_blocks(body: str) -> list[str]:
    return re.findall(r"```[\w-]*\n(.*?)```", body, flags=re.S)


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for value in vars(Metrics()).values():
        name = getattr(value, "_name", None)
        kind = str(getattr(value, "_type", ""))
        if name:
            names.add(name + ("_total" if kind == "counter" else ""))
    return names


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_settings_exist(page: Path) -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    # The one-shot containers' variables, read by their entrypoint scripts, not by the service.
    for script in (ROOT / "docker" / "entrypoints").glob("*.sh"):
        known |= set(re.findall(r"\bMTRANK_[A-Z][A-Z0-9_]*[A-Z0-9]\b", text(script)))
    mentioned = set(re.findall(r"\bMTRANK_[A-Z][A-Z0-9_]*[A-Z0-9]\b", text(page)))
    assert mentioned <= known, f"unknown settings {sorted(mentioned - known)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_metrics_exist(page: Path) -> None:
    exported = exported_metric_names()
    suffixes = ("_bucket", "_sum", "_count", "_created")
    for name in set(re.findall(r"\bmtrank_[a-z0-9_]*[a-z0-9]\b", text(page))):
        base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
        assert name in exported or base in exported, f"names unknown metric {name}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_alerts_exist(page: Path) -> None:
    groups = yaml.safe_load(text(ALERTS))["groups"]
    alerts = {rule["alert"] for g in groups for rule in g["rules"] if "alert" in rule}
    mentioned = set(re.findall(r"\bMtrank[A-Z][A-Za-z0-9]+\b", text(page)))
    assert mentioned <= alerts, f"unknown alerts {sorted(mentioned - alerts)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_in_code_blocks_exist(page: Path) -> None:
    makefile = text(ROOT / "Makefile")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    for block in code_blocks(text(page)):
        for line in block.splitlines():
            for cmd in re.findall(r"(?:^|[\s;&|$(])mtrank ([a-z][a-z0-9-]*)", line):
                assert cmd in COMMANDS, f"`mtrank {cmd}` in: {line.strip()}"
            for target in re.findall(r"(?:^|[\s;&|])make ([a-z][a-z-]*)", line):
                assert target in targets, f"`make {target}` in: {line.strip()}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text(page)):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).exists(), f"broken link {target}"


REPO_PATH = re.compile(
    r"`((?:mtrank|service|training|bench|tests|harness|docker|docs)/[\w./-]*\w)(?:::[\w\[\]|.-]+)?`"
)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_quoted_repository_paths_exist(page: Path) -> None:
    for path in set(REPO_PATH.findall(text(page))):
        if any(ch in path for ch in "*{}<>"):
            continue
        assert (ROOT / path).exists(), f"names {path}, which does not exist"


def test_readme_layout_names_existing_folders_and_files() -> None:
    readme = text(ROOT / "README.md")
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    for line in layout.splitlines():
        words = line.split()
        if not words or not words[0].endswith("/") and "." not in words[0]:
            continue
        assert (ROOT / words[0]).exists(), f"README layout names {words[0]}"
        if words[0].endswith("/"):
            for word in words[1:]:
                if re.fullmatch(r"[\w-]+\.py|[\w-]+/", word):
                    assert (ROOT / words[0] / word).exists(), f"README layout names {word}"


def _test_names(folder: Path) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for path in folder.rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names[path.name] = {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")
        }
    return names


def test_reliability_guarantees_cite_tests_that_exist_and_pass() -> None:
    body = text(ROOT / "docs" / "reliability.md")
    assert "fails today" not in body.lower()
    tests = _test_names(ROOT / "tests")
    everything = set().union(*tests.values())
    cited = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)(?:\[[^\]`]*\])?`", body)
    assert cited
    for file, name in cited:
        if file:
            assert file in tests, f"reliability.md cites missing file {file}"
            assert name in tests[file], f"reliability.md cites missing test {file}::{name}"
        else:
            assert name in everything, f"reliability.md cites missing test {name}"
