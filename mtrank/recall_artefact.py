"""A recall version in the registry: the files, and the checksums that make it one unit.

``mtrank publish-recall`` (training/recall/publish.py) writes it; the service's recall manager
(service/recall/runtime.py) verifies it before anything is swapped in. Layout::

    models/NAME/VERSION/user_tower.onnx      user features + history -> float32 [B, D] user vector
    models/NAME/VERSION/recall_spec.json     the recall contract (mtrank.recall_spec.RecallSpec)
    models/NAME/VERSION/index/               the ANN index directory (mtrank.recall_index layout)
    models/NAME/VERSION/popularity.npy       int64 raw item ids, most train clicks first: the
                                             answer for a user with no history (the fallback)
    models/NAME/VERSION/item_categories.npy  int64 [count]: raw category of index label j
                                             (-1: unknown), for the request's category allow-list
    models/NAME/VERSION/metadata.json        "kind": "recall", model type, metrics, the index
                                             summary and ``sha256``: every file above by name

The index directory verifies its own files against ``index/index.json``; the version's metadata
pins ``index/index.json`` itself, so a version's index can be neither replaced nor swapped for
another version's. A version is published whole (a renamed staging directory), never edited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from mtrank.recall_index import METADATA_FILE as INDEX_METADATA_FILE
from mtrank.recall_spec import RECALL_SPEC_FILE
from mtrank.registry import METADATA_FILE, RECALL_MODEL_FILE, sha256_file

RECALL_KIND: Final = "recall"
USER_TOWER_FILE: Final = RECALL_MODEL_FILE
INDEX_DIR: Final = "index"
POPULARITY_FILE: Final = "popularity.npy"
ITEM_CATEGORIES_FILE: Final = "item_categories.npy"
# Every file metadata.json pins, by its path relative to the version directory.
CHECKED_FILES: Final = (
    USER_TOWER_FILE,
    RECALL_SPEC_FILE,
    POPULARITY_FILE,
    ITEM_CATEGORIES_FILE,
    f"{INDEX_DIR}/{INDEX_METADATA_FILE}",
)

__all__ = [
    "CHECKED_FILES",
    "INDEX_DIR",
    "ITEM_CATEGORIES_FILE",
    "METADATA_FILE",
    "POPULARITY_FILE",
    "RECALL_KIND",
    "USER_TOWER_FILE",
    "checksums",
    "problems",
]


def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file in :data:`CHECKED_FILES` (the ``sha256`` entry of metadata.json)."""
    return {name: sha256_file(Path(directory) / name) for name in CHECKED_FILES}


def problems(directory: Path, metadata: dict[str, Any]) -> list[str]:
    """Every way ``directory`` is not the recall version its metadata describes (empty: fine)."""
    out: list[str] = []
    if metadata.get("kind") != RECALL_KIND:
        out.append(f"metadata.json kind is {metadata.get('kind')!r}, not {RECALL_KIND!r}")
    pinned = metadata.get("sha256")
    if not isinstance(pinned, dict):
        return [*out, "metadata.json has no sha256 table"]
    for name in CHECKED_FILES:
        path = Path(directory) / name
        if not path.is_file():
            out.append(f"{name} is missing")
        elif pinned.get(name) != sha256_file(path):
            out.append(f"{name} does not match its sha256 in metadata.json")
    return out
