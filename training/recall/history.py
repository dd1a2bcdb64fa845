"""Build the serving-time user histories (mtrank.history) from the generator's click logs.

    mtrank features build-history --data data/ecommerce --name NAME [--max-len 50] [--out PATH]
    mtrank features load-history --name NAME --redis URL [--namespace NS] [--snapshot PATH]

Every split present (train, valid, test: the whole log up to "now") is read, its clicks sorted by
(user, time) as training reads them (training/recall/data.py), and each user keeps the last
``max_len`` clicked items. ``max_len`` should be at least the user tower's history length: the
tower reads the most recent of them, the seen-item filter reads them all. Every user of
``users.parquet`` gets a record, clicks or not, with the raw values of its attribute columns.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrank.history import MISSING_CODE, HistorySnapshot
from training.recall.data import Clicks, read_clicks

SPLITS = ("train", "valid", "test")


def _all_clicks(data_dir: Path) -> Clicks:
    clicks: Clicks | None = None
    for split in SPLITS:
        path = data_dir / f"{split}.parquet"
        if path.is_file():
            part, _ = read_clicks(path)
            clicks = part if clicks is None else clicks + part
    if clicks is None:
        raise FileNotFoundError(f"{data_dir}: no split parquet files (mtrank synth ecommerce)")
    return clicks


def build_history(
    data_dir: Path, max_len: int = 50, fields: list[str] | None = None, version: str | None = None
) -> HistorySnapshot:
    """Every user's last ``max_len`` clicks and raw attribute codes (module docstring)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    data_dir = Path(data_dir)
    users = pq.read_table(data_dir / "users.parquet")
    if fields is None:  # categorical columns: a float column (an activity rate) is no attribute
        fields = [
            f.name for f in users.schema if f.name != "user_id" and not pa.types.is_floating(f.type)
        ]
    user_ids = np.asarray(users.column("user_id").to_numpy(zero_copy_only=False)).astype(np.int64)
    clicks = _all_clicks(data_dir)
    known = np.union1d(user_ids, clicks.user_id)  # (U,) a clicking user absent from users too
    codes = np.full((len(known), len(fields)), MISSING_CODE, dtype=np.int32)  # (U, A)
    rows = np.searchsorted(known, user_ids)
    tables: dict[str, list[str]] = {}
    for j, name in enumerate(fields):
        if name not in users.column_names:
            raise ValueError(f"{data_dir / 'users.parquet'}: no column {name!r}")
        raw = users.column(name).to_pylist()
        present = np.array([v is not None for v in raw])
        table, inverse = np.unique(np.array([str(v) for v in raw])[present], return_inverse=True)
        tables[name] = table.tolist()
        codes[rows[present], j] = inverse
    # clicks are sorted by user: each user's clicks are one run; keep the last max_len of it
    lo = np.searchsorted(clicks.user_id, known, side="left")
    hi = np.searchsorted(clicks.user_id, known, side="right")
    lo = np.maximum(lo, hi - max_len)
    lengths = hi - lo  # (U,)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (U + 1,)
    parts = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
    take = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    items = clicks.item_id[take.astype(np.int64)].astype(np.int64)
    return HistorySnapshot(
        version=version or datetime.now(UTC).strftime("h%Y%m%dT%H%M%S%fZ"),
        max_len=max_len,
        fields=list(fields),
        tables=tables,
        user_ids=known.astype(str),
        codes=codes,
        offsets=offsets,
        items=items,
        built_at=time.time(),
    )
