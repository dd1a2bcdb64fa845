"""The model registry on disk: ``models/NAME/VERSION/`` plus a ``current`` pointer.

Layout::

    models/NAME/VERSION/model.onnx      the graph (inputs per spec.json, one output per task)
    models/NAME/VERSION/spec.json       the feature contract (mtrank.spec.FeatureSpec)
    models/NAME/VERSION/metadata.json   tasks, metrics, config, checksums, tool versions
    models/NAME/VERSION/user_tower.onnx a recall version instead holds the user tower, its index
                                        and its popularity list (layout: mtrank.recall_artefact)
    models/NAME/current                 one line: the VERSION the service serves
    models/NAME/snapshots/SNAP.npz      feature snapshots built against a version's spec

Publishing is atomic: a version is assembled in a hidden temporary directory and renamed into
place, and ``current`` is replaced with ``os.replace``; a reader sees the old state or the new,
never a mix. A version directory is never modified after it is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"
RECALL_MODEL_FILE = "user_tower.onnx"  # the graph of a recall version (``"kind": "recall"``)
LTR_MODEL_FILE = "ltr.onnx"  # the graph of a learned-fusion version (``"kind": "ltr"``)
GRAPH_FILES = (MODEL_FILE, RECALL_MODEL_FILE, LTR_MODEL_FILE)  # a version holds one of them
METADATA_FILE = "metadata.json"
CURRENT_FILE = "current"
SNAPSHOT_DIR = "snapshots"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed (unknown model or version, bad name)."""


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name):
        raise RegistryError(f"invalid model {what} {name!r}: use letters, digits, '_', '-', '.'")
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_version() -> str:
    """Versions sort by creation time: ``20261123T130501Z-3f9a``."""
    now = datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(2).hex()


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def metadata(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / METADATA_FILE).read_text())
        return data

    @property
    def kind(self) -> str:
        """``ranker`` (model.onnx) or ``recall`` (user_tower.onnx), from the files present."""
        return "recall" if (self.path / RECALL_MODEL_FILE).is_file() else "ranker"


def _has_graph(path: Path) -> bool:
    return any((path / f).is_file() for f in GRAPH_FILES)


class Registry:
    """Versions of named models under one root directory (``models/`` by default)."""

    def __init__(self, root: Path | str = "models") -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CURRENT_FILE).is_file())

    def versions(self, name: str) -> list[str]:
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        return sorted(
            p.name
            for p in d.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _has_graph(p)
        )

    def current(self, name: str) -> str | None:
        f = self.model_dir(name) / CURRENT_FILE
        try:
            v = f.read_text().strip()
        except FileNotFoundError:
            return None
        return v or None

    def resolve(self, name: str, version: str | None = None) -> ModelVersion:
        version = version or self.current(name)
        if version is None:
            raise RegistryError(f"model {name!r} has no current version under {self.root}")
        path = self.model_dir(name) / check_name(version, "version")
        if not _has_graph(path):
            raise RegistryError(f"model {name!r} has no version {version!r} under {self.root}")
        return ModelVersion(name, version, path)

    def publish(self, name: str, build: Path, version: str | None = None) -> ModelVersion:
        """Move a fully written build directory into the registry under a new version.

        ``build`` must live on the same filesystem as the registry (use :meth:`staging_dir`).
        """
        version = check_name(version or new_version(), "version")
        final = self.model_dir(name) / version
        if final.exists():
            raise RegistryError(f"{final} already exists")
        if not _has_graph(Path(build)):
            raise RegistryError(f"{build} holds no {' or '.join(GRAPH_FILES)}")
        os.replace(build, final)
        return ModelVersion(name, version, final)

    def staging_dir(self, name: str) -> Path:
        """A hidden temporary directory beside the versions; rename-able into place."""
        d = self.model_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=d))

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def promote(self, name: str, version: str) -> ModelVersion:
        """Point ``current`` at ``version`` atomically."""
        mv = self.resolve(name, version)
        pointer = self.model_dir(name) / CURRENT_FILE
        tmp = pointer.with_name(f".{CURRENT_FILE}.{os.getpid()}.tmp")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)
        return mv

    def snapshot_dir(self, name: str) -> Path:
        return self.model_dir(name) / SNAPSHOT_DIR

    def latest_snapshot(self, name: str, spec_sha256: str) -> Path | None:
        """Newest snapshot file built for the given spec, or None."""
        d = self.snapshot_dir(name)
        if not d.is_dir():
            return None
        for path in sorted(d.glob("*.npz"), reverse=True):
            side = path.with_suffix(".json")
            if side.is_file() and json.loads(side.read_text()).get("spec_sha256") == spec_sha256:
                return path
        return None
