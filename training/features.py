"""Feature snapshots for serving: build them from attribute tables, load them into Redis.

    mtrank features build --model NAME --users users.parquet --items items.parquet [--root models]
    mtrank features load --model NAME --redis redis://127.0.0.1:6379/0 [--namespace NAME]

``build`` encodes every user and item with the *serving* model's ``spec.json`` — vocabulary
indices, normalised dense values — plus the raw item attributes the re-rank rules need, and writes
``models/NAME/snapshots/VERSION.npz`` (mtrank.snapshot). The embedded store serves that file as
is; ``load`` writes it to Redis as one binary value per entity, then switches the pointer key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.registry import Registry, RegistryError, new_version
from mtrank.snapshot import Snapshot, item_dtype, user_dtype
from mtrank.spec import DenseField, FeatureSpec, SparseField


class FeatureBuildError(ValueError):
    """An attribute table that cannot be encoded (missing key column, unreadable file)."""


def read_table(path: Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FeatureBuildError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return pq.read_table(path)
    return pacsv.read_csv(path)


def _column(table: pa.Table, name: str) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    return np.asarray(table.column(name).to_pylist(), dtype=object)


def encode_sparse(field: SparseField, values: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) int64 indices; a column absent from the table encodes as OOV for every row."""
    if values is None:
        return np.zeros(n, dtype=np.int64)
    return field.encode_many(values)


def encode_dense(field: DenseField, values: np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        raw = np.full(n, field.default, dtype=np.float64)
    else:
        raw = np.array([field.default if v is None else v for v in values], dtype=np.float64)
    return field.normalise(raw)


def encode_entities(
    spec: FeatureSpec, source: str, table: pa.Table, dtype: np.dtype[Any]
) -> np.ndarray:
    """Records of every row of ``table`` for the spec's fields of ``source``."""
    n = table.num_rows
    sparse_fields, dense_fields = spec.fields(source)  # type: ignore[arg-type]
    records = np.zeros(n, dtype=dtype)
    for j, sf in enumerate(sparse_fields):
        records["sparse"][:, j] = encode_sparse(sf, _column(table, sf.name), n)
    for j, df in enumerate(dense_fields):
        records["dense"][:, j] = encode_dense(df, _column(table, df.name), n)
    return records


def _codes(values: np.ndarray | None, n: int) -> tuple[np.ndarray, list[str]]:
    """Category-like attribute -> int codes and the code table (unknown -> -1)."""
    if values is None:
        return np.full(n, -1, dtype=np.int32), []
    as_str = np.array(["" if v is None else str(v) for v in values], dtype=object)
    table, inverse = np.unique(as_str.astype(str), return_inverse=True)
    codes = inverse.astype(np.int32)
    if "" in table:
        blank = int(np.searchsorted(table, ""))
        codes[codes == blank] = -1
    return codes, [str(t) for t in table]


def fill_item_attributes(records: np.ndarray, table: pa.Table) -> dict[str, list[str]]:
    n = table.num_rows
    tables: dict[str, list[str]] = {}
    for attr in ITEM_ATTRIBUTES:
        name, default = attr.name, attr.default
        values = _column(table, name)
        if attr.kind == "code":
            records[name], tables[name] = _codes(values, n)
            continue
        if values is None:
            records[name] = default
            continue
        filled = np.array([default if v is None else v for v in values], dtype=np.float64)
        filled[~np.isfinite(filled)] = default
        records[name] = filled.astype(records.dtype[name])
    return tables


def build_snapshot(
    spec: FeatureSpec,
    users: pa.Table,
    items: pa.Table,
    user_key: str = "user_id",
    item_key: str = "item_id",
    version: str | None = None,
) -> Snapshot:
    for table, key, what in ((users, user_key, "users"), (items, item_key, "items")):
        if key not in table.column_names:
            raise FeatureBuildError(f"{what} table has no key column {key!r}")
    user_records = encode_entities(spec, "user", users, user_dtype(spec))
    item_records = encode_entities(spec, "item", items, item_dtype(spec))
    tables = fill_item_attributes(item_records, items)
    return Snapshot(
        spec_sha256=spec.sha256(),
        version=version or new_version(),
        user_ids=np.array([str(v) for v in users.column(user_key).to_pylist()]),
        users=user_records,
        item_ids=np.array([str(v) for v in items.column(item_key).to_pylist()]),
        items=item_records,
        attribute_tables=tables,
    )


def cmd_build(args: argparse.Namespace) -> int:
    registry = Registry(args.root)
    mv = registry.resolve(args.model, args.version)
    spec = FeatureSpec.load(mv.path)
    snap = build_snapshot(
        spec, read_table(args.users), read_table(args.items), args.user_key, args.item_key
    )
    out = args.out or registry.snapshot_dir(args.model) / f"{snap.version}.npz"
    snap.save(out)
    print(
        f"snapshot {snap.version}: {len(snap.user_ids)} users, {len(snap.item_ids)} items "
        f"for {mv.name}/{mv.version} -> {out}"
    )
    return 0


def _progress(total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="rec", desc="loading", file=sys.stderr)
    return bar.update, bar.close


def cmd_load(args: argparse.Namespace) -> int:
    import redis

    from mtrank.snapshot_loader import load_snapshot_to_redis

    registry = Registry(args.root)
    mv = registry.resolve(args.model, args.version)
    spec = FeatureSpec.load(mv.path)
    path = args.snapshot or registry.latest_snapshot(args.model, spec.sha256())
    if path is None:
        raise FeatureBuildError(
            f"no snapshot built for {mv.name}/{mv.version}: run `mtrank features build` first"
        )
    snap = Snapshot.load(path, spec)
    client = redis.Redis.from_url(args.redis)
    update, close = _progress(len(snap.user_ids) + len(snap.item_ids))
    try:
        result = load_snapshot_to_redis(client, args.namespace or args.model, snap, progress=update)
    finally:
        close()
        client.close()
    print(f"loaded snapshot {snap.version} into {args.redis}: {result}")
    return 0


def _history_dir(root: Path, name: str) -> Path:
    from mtrank.history import HISTORY_DIR

    return Registry(root).model_dir(name) / HISTORY_DIR


def cmd_build_history(args: argparse.Namespace) -> int:
    from training.recall.history import build_history

    fields = args.fields.split(",") if args.fields else None
    hist = build_history(args.data, args.max_len, fields)
    out = hist.save(args.out or _history_dir(args.root, args.name) / f"{hist.version}.npz")
    print(
        f"history {hist.version}: {len(hist.user_ids)} users, {len(hist.items)} clicks "
        f"(last {hist.max_len} each), fields {hist.fields} -> {out}"
    )
    return 0


def cmd_load_history(args: argparse.Namespace) -> int:
    import redis

    from mtrank.history import HistorySnapshot, latest_history, load_history_to_redis

    path = args.snapshot or latest_history(_history_dir(args.root, args.name))
    if path is None:
        raise FeatureBuildError(
            f"no history under {_history_dir(args.root, args.name)}: run "
            "`mtrank features build-history` first"
        )
    hist = HistorySnapshot.load(path)
    client = redis.Redis.from_url(args.redis)
    try:
        result = load_history_to_redis(client, args.namespace or args.name, hist)
    finally:
        client.close()
    print(f"loaded history {hist.version} into {args.redis}: {result}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtrank features", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=Path("models"), type=Path, help="registry root")
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="encode attribute tables into a snapshot file")
    b.add_argument("--model", required=True)
    b.add_argument("--version", default=None, help="model version (default: current)")
    b.add_argument("--users", required=True, type=Path)
    b.add_argument("--items", required=True, type=Path)
    b.add_argument("--user-key", default="user_id")
    b.add_argument("--item-key", default="item_id")
    b.add_argument("--out", type=Path, default=None)
    ld = sub.add_parser("load", help="write a snapshot to Redis and switch the pointer")
    ld.add_argument("--model", required=True)
    ld.add_argument("--version", default=None)
    ld.add_argument("--snapshot", type=Path, default=None, help="default: latest for the model")
    ld.add_argument("--redis", required=True, help="redis://host:port/db")
    ld.add_argument("--namespace", default=None, help="key namespace (default: model name)")
    bh = sub.add_parser("build-history", help="users' last clicks for the recall stage (file)")
    bh.add_argument("--data", required=True, type=Path, help="the generator's folder")
    bh.add_argument("--name", required=True, help="the recall model name (file under it)")
    bh.add_argument("--max-len", type=int, default=50, help="clicks kept per user")
    bh.add_argument("--fields", default=None, help="user columns (default: all of users.parquet)")
    bh.add_argument("--out", type=Path, default=None)
    lh = sub.add_parser("load-history", help="write a history file to Redis, switch the pointer")
    lh.add_argument("--name", required=True)
    lh.add_argument("--snapshot", type=Path, default=None, help="default: the newest file")
    lh.add_argument("--redis", required=True, help="redis://host:port/db")
    lh.add_argument("--namespace", default=None, help="key namespace (default: NAME)")
    args = parser.parse_args(argv)
    commands = {"build": cmd_build, "load": cmd_load, "build-history": cmd_build_history,
                "load-history": cmd_load_history}  # fmt: skip
    try:
        return commands[args.action](args)
    except (FeatureBuildError, RegistryError, ValueError, OSError) as e:
        print(f"mtrank features: {e}", file=sys.stderr)
        return 1
