"""Export a recall checkpoint for the ANN index builder and the recall service, parity-gated.

    python -m training.recall.export CHECKPOINT --out OUT [--overwrite]

Writes one directory, assembled in a temporary sibling and renamed into place (a reader never sees
half of it):

- ``user_tower.onnx``: opset 17, dynamic batch axis; inputs in RecallSpec.inputs order,
  ``user_sparse`` int64 [B, U], ``history_ids`` int64 [B, L], ``history_length`` int64 [B];
  output ``user_embedding`` float32 [B, D] (unit length when the similarity is cosine);
- ``recall_spec.json``: the contract (mtrank.recall_spec.RecallSpec) that encodes those inputs;
- ``item_embeddings.npy``: float32 [N, D], row i = catalog row i (training/recall/data.py), so row
  i is item vocabulary index i for i < V; rows from V on are cold catalog items (never clicked in
  train), embedded from their features by a feature-based item tower;
- ``item_ids.npy``: int64 [N], the raw item id of each row; **-1 marks a row that is not an
  item** (row 0, the OOV bucket; and, for a model without item features such as YouTube DNN,
  every cold row, which would only repeat the OOV vector): the index must skip them;
- ``metadata.json``: model type, sizes, similarity, row counts, the training config, the
  validation metrics, checksums, the parity result, creation time and tool versions.

Parity is not optional: onnxruntime and torch are compared on at least 1,000 users that include
empty and full histories, out-of-vocabulary and out-of-range ids; a max absolute difference
above 1e-5 raises :class:`RecallExportError` and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mtrank.recall_spec import RecallSpec
from training.export import tool_versions
from training.recall.checkpoint import load_recall_checkpoint
from training.recall.evaluate import catalog_items
from training.recall.models import DSSM, RecallModel

OPSET = 17
PARITY_ROWS = 1024
PARITY_TOLERANCE = 1e-5
USER_TOWER_FILE = "user_tower.onnx"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_IDS_FILE = "item_ids.npy"
METADATA_FILE = "metadata.json"


class RecallExportError(RuntimeError):
    """The export could not produce files the index builder may use; nothing was written."""


def parity_inputs(spec: RecallSpec, rows: int, seed: int) -> dict[str, np.ndarray]:
    """User-tower feeds spanning every vocabulary, OOV and out-of-range ids, every length."""
    rng = np.random.default_rng(seed)
    U, L = len(spec.user_sparse), spec.history.max_len
    sparse = np.zeros((rows, U), dtype=np.int64)  # (R, U)
    for j, f in enumerate(spec.user_sparse):
        sparse[:, j] = rng.integers(0, f.vocab_size + 2, rows)  # + 2: out-of-range ids too
    sparse[: rows // 8] = 0  # the cold-start user: every attribute OOV
    history = rng.integers(0, spec.item_vocab.vocab_size, (rows, L)).astype(np.int64)  # (R, L)
    history[rows // 8 : rows // 4, 0] = spec.item_vocab.vocab_size + 7  # a stale id: OOV
    lengths = rng.integers(0, L + 1, rows).astype(np.int64)  # (R,) 0 (no history) .. L
    lengths[: rows // 16] = 0
    lengths[rows // 16 : rows // 8] = L
    history[np.arange(L)[None, :] >= lengths[:, None]] = 0  # padding, as pad_sequences writes it
    i = spec.inputs
    return {i.user_sparse: sparse, i.history: history, i.history_length: lengths}


def export_user_tower(model: RecallModel, spec: RecallSpec, path: Path) -> None:
    feed = parity_inputs(spec, 4, seed=1)
    args = tuple(torch.from_numpy(feed[n]) for n in spec.inputs.order)
    axes = {n: {0: "batch"} for n in [*spec.inputs.order, spec.inputs.output]}
    with warnings.catch_warnings():
        # the TorchScript exporter warns that it is the legacy path; it gives a plain graph
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=spec.inputs.order,
            output_names=[spec.inputs.output],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))


def check_parity(model: RecallModel, spec: RecallSpec, path: Path, rows: int) -> float:
    """Max |onnxruntime - torch| over the user vectors of ``rows`` parity users."""
    feed = parity_inputs(spec, rows, seed=0)
    with torch.no_grad():
        want = model(*(torch.from_numpy(feed[n]) for n in spec.inputs.order)).double().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([spec.inputs.output], feed)
    return float(np.max(np.abs(got.astype(np.float64) - want)))


def item_rows(model: RecallModel, item_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The raw id of each exported row, -1 where the row is not a distinct item (module doc)."""
    ids = item_ids.copy()
    if not isinstance(model, DSSM):  # an id table only: cold rows would repeat the OOV vector
        ids[vocab_size:] = -1
    ids[0] = -1
    return ids.astype(np.int64)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_recall(
    checkpoint: Path,
    out: Path,
    overwrite: bool = False,
    parity_rows: int = PARITY_ROWS,
    tolerance: float = PARITY_TOLERANCE,
) -> Path:
    """Export ``checkpoint`` into the directory ``out`` (module docstring); returns ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise RecallExportError(f"{out} exists (pass overwrite=True / --overwrite to replace it)")
    model, cfg, spec, catalog, ckpt = load_recall_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_path = staging / USER_TOWER_FILE
        export_user_tower(model, spec, onnx_path)
        worst = check_parity(model, spec, onnx_path, max(parity_rows, 1000))
        if not worst <= tolerance:
            raise RecallExportError(
                f"parity check failed: max |onnxruntime - torch| = {worst:.3g} > {tolerance:g}; "
                "nothing was written"
            )
        with torch.no_grad():
            vectors = model.item_vectors(catalog_items(catalog)).numpy().astype(np.float32)
        ids = item_rows(model, catalog.item_ids, spec.item_vocab.vocab_size)
        np.save(staging / ITEM_EMBEDDINGS_FILE, vectors)
        np.save(staging / ITEM_IDS_FILE, ids)
        spec.save(staging)
        meta = _metadata(cfg.model_dump(mode="json"), ckpt, spec, staging, vectors, ids, worst)
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _publish(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an old ``out`` is moved aside first, removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _metadata(
    config: dict[str, Any],
    ckpt: dict[str, Any],
    spec: RecallSpec,
    staging: Path,
    vectors: np.ndarray,
    ids: np.ndarray,
    parity: float,
) -> dict[str, Any]:
    files = (USER_TOWER_FILE, ITEM_EMBEDDINGS_FILE, ITEM_IDS_FILE, "recall_spec.json")
    return {
        "kind": "recall",
        "model_type": spec.model_type,
        "embedding_dim": int(vectors.shape[1]),
        "similarity": spec.similarity,
        "rows": int(vectors.shape[0]),
        "item_rows": int((ids >= 0).sum()),
        "vocab_rows": spec.item_vocab.vocab_size,
        "skip_item_id": -1,
        "inputs": spec.inputs.model_dump(),
        "training_config": config,
        "metrics": ckpt.get("metrics", {}),
        "epoch": ckpt.get("epoch"),
        "sha256": {f: _sha256(staging / f) for f in files},
        "spec_sha256": spec.sha256(),
        "opset": OPSET,
        "parity": {"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": tool_versions(),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrank export-recall", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    args = p.parse_args(argv)
    try:
        out = export_recall(args.checkpoint, args.out, overwrite=args.overwrite)
    except RecallExportError as e:
        print(f"mtrank export-recall: {e}", file=sys.stderr)
        return 1
    meta = json.loads((out / METADATA_FILE).read_text())
    print(
        f"exported {meta['model_type']} to {out}: {meta['item_rows']} items x "
        f"{meta['embedding_dim']} ({meta['similarity']}), "
        f"parity {meta['parity']['max_abs_diff']:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
