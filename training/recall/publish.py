"""Publish a recall checkpoint into the model registry as one servable version.

    mtrank publish-recall CHECKPOINT --registry models --name NAME [--index auto|flat|hnsw]
                          [--promote]

    checkpoint -> export_recall (user tower, parity-gated)  -> user_tower.onnx, recall_spec.json
               -> build_index (item embeddings)             -> index/
               -> the catalog's train clicks                 -> popularity.npy
               -> the catalog's category column              -> item_categories.npy
               -> metadata.json ("kind": "recall", sha256 of every file) -> registry.publish

``--index auto`` (the default) builds an exact flat index up to AUTO_FLAT_MAX_ITEMS items and an
HNSW graph above: at k=500 an exact numpy scan is faster than the graph's beam up to 50k items,
and exact (``python -m bench.ann_index --crossover ...``, docs/recall_index.md).

Layout and checksums: :mod:`mtrank.recall_artefact`. Everything is assembled in the registry's
hidden staging directory and renamed into place, so the service's watcher sees a whole version or
none; ``--promote`` then switches ``current`` (the running service hot-swaps to it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mtrank.recall_artefact import (
    INDEX_DIR,
    ITEM_CATEGORIES_FILE,
    METADATA_FILE,
    POPULARITY_FILE,
    RECALL_KIND,
    USER_TOWER_FILE,
    checksums,
)
from mtrank.recall_index import ITEM_IDS_FILE as INDEX_IDS_FILE
from mtrank.recall_index import FlatParams, HnswParams, IndexParams, Metric
from mtrank.recall_spec import RECALL_SPEC_FILE, RecallSpec
from mtrank.registry import ModelVersion, Registry
from training.recall.checkpoint import load_recall_checkpoint
from training.recall.data import NO_ITEM, Catalog
from training.recall.export import (
    ITEM_EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    RecallExportError,
    export_recall,
)
from training.recall.index_build import build_index, indexable_rows

CATEGORY_FIELD = "category"


def popularity(catalog: Catalog) -> np.ndarray:
    """Raw ids of the items clicked in train, most clicks first (ties: smaller id first)."""
    rows = np.flatnonzero((catalog.clicks > 0) & (catalog.item_ids != NO_ITEM))
    order = np.lexsort((catalog.item_ids[rows], -catalog.clicks[rows]))
    return np.ascontiguousarray(catalog.item_ids[rows[order]], dtype=np.int64)


def item_categories(catalog: Catalog, spec: RecallSpec, raw_ids: np.ndarray) -> np.ndarray:
    """Raw category of each raw id (-1: no category field, OOV, or not in the catalog)."""
    out = np.full(len(raw_ids), -1, dtype=np.int64)
    names = [f.name for f in spec.item_sparse]
    if CATEGORY_FIELD not in names:
        return out
    j = names.index(CATEGORY_FIELD)
    field = spec.item_sparse[j]
    table = np.full(field.vocab_size, -1, dtype=np.int64)  # vocabulary index -> raw category
    for i, raw in enumerate(field.vocab, start=1):
        try:
            table[i] = int(float(raw))
        except ValueError:  # a non-numeric category cannot be named in an integer allow-list
            continue
    rows = catalog.rows(raw_ids)  # 0 (the OOV row) for an id the catalog lacks
    found = rows > 0
    out[found] = table[catalog.sparse[rows[found], j]]
    return out


IndexChoice = Literal["auto", "flat", "hnsw"]
AUTO_FLAT_MAX_ITEMS = 50_000  # measured crossover at k=500 (module docstring)


def choose_index(choice: IndexChoice, count: int) -> IndexParams:
    """The index parameters for ``count`` items: ``auto`` is flat up to AUTO_FLAT_MAX_ITEMS."""
    if choice == "auto":
        choice = "flat" if count <= AUTO_FLAT_MAX_ITEMS else "hnsw"
    return FlatParams() if choice == "flat" else HnswParams()


def publish_recall(
    checkpoint: Path,
    registry_root: Path,
    name: str,
    index: IndexChoice = "auto",
    promote: bool = False,
    parity_rows: int = 1024,
) -> ModelVersion:
    """Export, index and publish ``checkpoint`` as a new version of ``name`` (module doc)."""
    registry = Registry(registry_root)
    registry.model_dir(name)  # checks the name before any work
    _, _, spec, catalog, _ = load_recall_checkpoint(checkpoint)
    staging = registry.staging_dir(name)
    try:
        export = export_recall(checkpoint, staging / "export", parity_rows=parity_rows)
        for f in (USER_TOWER_FILE, RECALL_SPEC_FILE):
            (export / f).rename(staging / f)
        metric: Metric = "ip"  # dot and cosine (unit vectors) alike: mtrank.recall_index
        emb, ids = np.load(export / ITEM_EMBEDDINGS_FILE), np.load(export / ITEM_IDS_FILE)
        params = choose_index(index, len(indexable_rows(emb, ids)))
        index_meta = build_index(emb, ids, staging / INDEX_DIR, metric=metric, params=params)
        np.save(staging / POPULARITY_FILE, popularity(catalog))
        labels = np.load(staging / INDEX_DIR / INDEX_IDS_FILE)
        np.save(staging / ITEM_CATEGORIES_FILE, item_categories(catalog, spec, labels))
        meta: dict[str, Any] = json.loads((export / METADATA_FILE).read_text())
        shutil.rmtree(export)  # the embeddings live on in the index
        meta.update(
            kind=RECALL_KIND,
            name=name,
            index=index_meta.model_dump(mode="json"),
            popular_items=int(len(np.load(staging / POPULARITY_FILE))),
            sha256=checksums(staging),
        )
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        mv = registry.publish(name, staging)
    except BaseException:
        registry.discard(staging)
        raise
    return registry.promote(name, mv.version) if promote else mv


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrank publish-recall", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a recall checkpoint (mtrank train-recall)")
    p.add_argument("--registry", type=Path, default=Path("models"), help="registry root")
    p.add_argument("--name", required=True, help="the recall model's name (MTRANK_RECALL_MODEL)")
    p.add_argument("--index", choices=["auto", "flat", "hnsw"], default="auto",
                   help=f"flat: exact; hnsw: graph; auto (default): flat up to "
                        f"{AUTO_FLAT_MAX_ITEMS:,} items, else hnsw")  # fmt: skip
    p.add_argument("--promote", action="store_true", help="point NAME/current at the new version")
    args = p.parse_args(argv)
    try:
        mv = publish_recall(args.checkpoint, args.registry, args.name, args.index, args.promote)
    except (RecallExportError, ValueError, OSError) as e:
        print(f"mtrank publish-recall: {e}", file=sys.stderr)
        return 1
    meta = mv.metadata()
    state = "promoted to current" if args.promote else "not promoted"
    index = meta["index"]
    print(
        f"published {mv.name}/{mv.version} ({meta['model_type']}, {index['params']['kind']} index "
        f"of {index['count']} items, {meta['popular_items']} popular items): {state}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
