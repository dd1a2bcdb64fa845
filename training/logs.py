"""``mtrank logs export``: served rows joined with the events that followed, as training data.

    mtrank logs export --served DIR --since T --until T --out DIR
        [--events-archive DIR] [--redis URL --namespace NS]
        [--click-window 1h] [--conversion-window 7d] [--clock-skew 1m] [--as-of T]
        [--rows returned|impressed|all] [--registry models | --spec PATH] [--valid-share F]

1. **Served rows** (mtrank/served_log.py): every row of the segments with ``ts`` in
   [since, until). One export holds the rows of one input spec (``spec_sha256``); a range that
   spans a model change with new inputs asks for ``--spec-sha256`` to pick one.
2. **Events** of those requests, from the archive (``mtrank events archive``) and/or straight from
   the stream (``XRANGE``), those that arrived from ``since`` - skew to ``--as-of`` (default:
   now), deduplicated by ``event_id``. Events that arrived after ``as_of`` are left out, so an
   export run again later with the same ``--as-of`` has the same labels.
3. **Labels** by ``(request_id, item_id)`` under the windows (training/attribution.py).
4. **Written** to ``OUT``:

   - ``train.parquet`` (and ``valid.parquet``: the last ``--valid-share`` of the rows by time),
     one row per served row kept by ``--rows`` (default ``returned``: position >= 0), in time
     order. Columns: ``request_id``, ``ts``, ``user_id``, ``item_id``, ``position``, ``scene``,
     ``arms``, ``models``, ``snapshot``, ``from_store`` as logged; ``sparse.NAME`` (int64) and
     ``dense.NAME`` (float32) per model input, the arrays the graph received; ``score`` and
     ``out.TASK``, what was served; the labels ``impression``, ``click``, ``cart``,
     ``collect``, ``purchase`` (int8 0/1), ``amount``, ``stay_seconds`` (float64),
     ``elapsed_days``, ``purchase_delay_days`` (float32). The Parquet schema metadata
     ``mtrank.served`` holds the segments' meta (``spec_sha256``, input and task names);
   - ``spec.json``: the served model's feature spec, found through ``--registry`` from the
     rows' ``models`` column (or given by ``--spec``) and checked against ``spec_sha256``;
   - ``dataset.yaml``: a dataset spec with ``format: served`` reading the above
     (training/served_data.py), with the served model's tasks (from its ``metadata.json``) when
     their labels are columns here, else the funnel ctr/cvr/cart/collect/stay;
   - ``export.json``: what was read, matched and written, and the arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
import yaml
from redis.exceptions import RedisError

from mtrank.events import stream_key
from mtrank.registry import METADATA_FILE, Registry, RegistryError
from mtrank.served_log import OUTPUT_PREFIX, read_segment
from mtrank.spec import SPEC_FILE, FeatureSpec
from training.attribution import BINARY_LABELS, Windows, attribute, event_arrays, match
from training.config import ConfigError, load_dataset_spec
from training.events_archive import EVENT_SCHEMA, dedupe_events, entries_to_table, read_archive
from training.served_data import DENSE_PREFIX, META_KEY, SPARSE_PREFIX, input_sha256

log = logging.getLogger(__name__)

RowsKept = Literal["returned", "impressed", "all"]
DEFAULT_WINDOWS = Windows()
PER_REQUEST = ("request_id", "user_id", "scene", "arms", "models", "snapshot")
LABEL_COLUMNS = (*BINARY_LABELS, "amount", "stay_seconds", "elapsed_days", "purchase_delay_days")
# tasks of the dataset YAML when the served model's own do not map onto the export's labels
DEFAULT_TASKS: list[dict[str, Any]] = [
    {"name": "ctr", "label": "click"},
    {"name": "cvr", "label": "purchase", "depends_on": "ctr"},
    {"name": "cart", "label": "cart", "depends_on": "ctr"},
    {"name": "collect", "label": "collect", "depends_on": "ctr"},
    {"name": "stay", "label": "stay_seconds", "kind": "regression", "transform": "log1p"},
]
TASK_KEYS = ("name", "label", "kind", "depends_on", "transform")


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the input at fault."""


# ---------------------------------------------------------------- times
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3_600.0, "d": 86_400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``7d`` (or bare seconds) -> seconds."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ExportError(f"not a duration: {text!r} (use 90s, 30m, 1h, 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO date/time (UTC unless it names an offset) -> Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as e:
        raise ExportError(f"not a time: {text!r} (Unix seconds or ISO 8601)") from e
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _days(start_s: float, end_s: float) -> list[str]:
    first = datetime.fromtimestamp(start_s, UTC).date()
    last = datetime.fromtimestamp(end_s, UTC).date()
    return [(first + timedelta(d)).strftime("%Y%m%d") for d in range((last - first).days + 1)]


# ---------------------------------------------------------------- served rows
@dataclass
class ServedRows:
    """The served rows of a time range, of one input spec: the segments' arrays concatenated."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.arrays["ts"])


def load_served(
    directory: Path, since: float, until: float, spec_sha256: str | None = None
) -> ServedRows:
    """Rows with ts in [since, until) of the segments under ``directory`` (mtrank/served_log.py).

    A segment sits in the folder of its first row's day and may run past midnight, so the day
    before ``since`` is read too; a segment none of whose rows is in range is not loaded whole.
    """
    by_spec: dict[str, tuple[dict[str, Any], list[dict[str, np.ndarray]]]] = {}
    for day in _days(since - 86_400.0, until):
        for path in sorted((Path(directory) / day).glob("*.npz")):
            with np.load(path, allow_pickle=False) as z:
                ts = z["ts"]
            keep = (ts >= since) & (ts < until)
            if not keep.any():
                continue
            meta, arrays = read_segment(path)
            chosen = {k: v[keep] for k, v in arrays.items()}
            by_spec.setdefault(meta["spec_sha256"], (meta, []))[1].append(chosen)
    if spec_sha256 is not None:
        by_spec = {k: v for k, v in by_spec.items() if k.startswith(spec_sha256)}
    if not by_spec:
        raise ExportError(f"{directory}: no served rows in the range"
                          + (f" with spec {spec_sha256}" if spec_sha256 else ""))  # fmt: skip
    if len(by_spec) > 1:
        found = ", ".join(
            f"{sha[:12]} ({sum(len(p['ts']) for p in parts)} rows, "
            f"models {sorted({m for p in parts for m in np.unique(p['models'])})})"
            for sha, (_, parts) in by_spec.items()
        )
        raise ExportError(f"the range holds rows of several input specs: {found}; "
                          "export them one at a time with --spec-sha256")  # fmt: skip
    ((meta, parts),) = by_spec.values()
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(arrays["ts"], kind="stable")  # several writers interleave
    if np.any(np.diff(order) < 0):
        arrays = {k: v[order] for k, v in arrays.items()}
    return ServedRows(meta, arrays)


def strings(values: np.ndarray) -> pa.Array:
    """A numpy text column as Arrow strings; a column of runs (per-request values repeat on
    every candidate) converts each run once."""
    n = len(values)
    if n == 0:
        return pa.array([], pa.string())
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
    if len(starts) > n // 4:
        return pa.array(values, pa.string())
    run = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))  # (n,) run of a row
    return pa.array(values[starts], pa.string()).take(pa.array(run))


# ---------------------------------------------------------------- events
def read_stream(
    client: redis.Redis,
    namespace: str,
    start_s: float,
    end_s: float,
    request_ids: pa.Array,
    page: int = 10_000,
) -> pa.Table:
    """Events of ``request_ids`` that arrived in the stream in [start_s, end_s] (``XRANGE``)."""
    key = stream_key(namespace)
    low, high = f"{int(start_s * 1000)}-0", str(int(end_s * 1000))
    tables = []
    while True:
        entries: Any = client.xrange(key, min=low, max=high, count=page)  # [(id, fields)]
        if entries:
            t = entries_to_table(entries)
            tables.append(t.filter(pc.is_in(t.column("request_id"), value_set=request_ids)))
            low = "(" + entries[-1][0].decode()
        if len(entries) < page:
            break
    return pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table()


@dataclass(frozen=True)
class EventSources:
    """Where events are read: an archive folder and/or a stream (Redis URL and namespace)."""

    archive: Path | None = None
    redis_url: str | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        if (self.redis_url is None) != (self.namespace is None):
            raise ExportError("--redis and --namespace go together")
        if self.archive is None and self.redis_url is None:
            raise ExportError("name an event source: --events-archive DIR and/or --redis URL "
                              "--namespace NS")  # fmt: skip


def load_events(
    sources: EventSources, request_ids: pa.Array, start_s: float, as_of: float
) -> pa.Table:
    """The events of ``request_ids`` that arrived in [start_s, as_of], each event_id once."""
    tables = []
    if sources.archive is not None:
        if not sources.archive.is_dir():  # a typo must not export all-negative labels
            raise ExportError(f"{sources.archive}: no such events archive")
        tables.append(read_archive(sources.archive, start_s, as_of, request_ids))
    if sources.redis_url is not None and sources.namespace is not None:
        client = redis.Redis.from_url(sources.redis_url)
        try:
            tables.append(read_stream(client, sources.namespace, start_s, as_of, request_ids))
        finally:
            client.close()
    events = dedupe_events(pa.concat_tables(tables).combine_chunks())
    # the service's clock at acceptance: what was known at as_of, whatever the client's ts says
    return events.filter(pc.less_equal(events.column("received"), as_of))


# ---------------------------------------------------------------- the spec
def resolve_spec(
    rows: ServedRows, registry: Path | None, spec: Path | None
) -> tuple[FeatureSpec, dict[str, Any] | None]:
    """The served model's FeatureSpec (and metadata.json when found) for the rows' inputs."""
    sha = rows.meta["spec_sha256"]
    candidates: list[Path] = []
    if spec is not None:
        candidates.append(spec.parent if spec.name == SPEC_FILE else spec)
    elif registry is not None:
        for served in np.unique(rows.arrays["models"]):
            for pair in str(served).split(","):
                name, _, version = pair.partition("@")
                try:
                    candidates.append(Registry(registry).model_dir(name) / version)
                except RegistryError:  # not a registry name: nothing to find there
                    continue
    for folder in candidates:
        if not (folder / SPEC_FILE).is_file():
            continue
        found = FeatureSpec.load(folder)
        if input_sha256(found) == sha:
            meta_path = folder / METADATA_FILE
            return found, json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if spec is not None:
            raise ExportError(f"{folder / SPEC_FILE}: its inputs ({input_sha256(found)[:12]}) "
                              f"are not the rows' ({sha[:12]})")  # fmt: skip
    where = spec if spec is not None else f"registry {registry}"
    models = sorted(set(rows.arrays["models"].tolist()))
    raise ExportError(f"no spec.json with the rows' inputs {sha[:12]} in {where} (models "
                      f"{models}): pass --registry or --spec")  # fmt: skip


def dataset_tasks(metadata: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str]:
    """(tasks, funnel_policy) of the dataset YAML: the served model's if its labels are here."""
    ds = ((metadata or {}).get("training_config") or {}).get("dataset") or {}
    tasks = [{k: t[k] for k in TASK_KEYS if t.get(k) is not None} for t in ds.get("tasks", [])]
    if tasks and all(t["label"] in LABEL_COLUMNS for t in tasks):
        return tasks, str(ds.get("funnel_policy", "drop"))
    return DEFAULT_TASKS, "error"  # click-first labels cannot break this funnel


# ---------------------------------------------------------------- the export
@dataclass
class ExportReport:
    served_rows: int
    rows_written: int
    valid_rows: int
    events_read: int
    events_matched: int
    positives: dict[str, int]
    seconds: float
    stage_seconds: dict[str, float]  # served (read segments), events (read), join (+ labels), write


def export_table(
    rows: ServedRows,
    text: dict[str, pa.Array],
    labels: dict[str, np.ndarray],
    keep: np.ndarray,
) -> pa.Table:
    """The export's columns (module docstring) of the rows at ``keep``; ``text`` holds the
    text columns already converted (:func:`strings`)."""
    a, meta = rows.arrays, rows.meta
    take = pa.array(np.flatnonzero(keep))
    cols: dict[str, pa.Array] = {}
    for name in ("request_id", "ts", "user_id", "item_id", "position", "scene", "arms",
                 "models", "snapshot", "from_store"):  # fmt: skip
        cols[name] = text[name].take(take) if name in text else pa.array(a[name][keep])
    sparse, dense = a["sparse"][keep], a["dense"][keep]  # (n, S), (n, D)
    for j, name in enumerate(meta["sparse"]):
        cols[SPARSE_PREFIX + name] = pa.array(np.ascontiguousarray(sparse[:, j]))
    for j, name in enumerate(meta["dense"]):
        cols[DENSE_PREFIX + name] = pa.array(np.ascontiguousarray(dense[:, j]))
    cols["score"] = pa.array(a["score"][keep])
    for task in meta["tasks"]:
        cols[OUTPUT_PREFIX + task] = pa.array(a[OUTPUT_PREFIX + task][keep])
    for name in LABEL_COLUMNS:
        v = labels[name][keep]
        cols[name] = pa.array(v, mask=np.isnan(v)) if v.dtype.kind == "f" else pa.array(v)
    return pa.table(cols)


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export(
    served: Path,
    since: float,
    until: float,
    out: Path,
    sources: EventSources,
    *,
    windows: Windows = DEFAULT_WINDOWS,
    as_of: float | None = None,
    rows_kept: RowsKept = "returned",
    registry: Path | None = Path("models"),
    spec: Path | None = None,
    spec_sha256: str | None = None,
    valid_share: float = 0.0,
) -> ExportReport:
    """Write the export of the served rows in [since, until) to ``out`` (module docstring)."""
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(stage: str) -> None:
        stages[stage] = round(time.perf_counter() - t0 - sum(stages.values()), 3)

    as_of = time.time() if as_of is None else as_of
    if until <= since:
        raise ExportError(f"--until ({until}) must be after --since ({since})")
    if not 0.0 <= valid_share < 1.0:
        raise ExportError(f"--valid-share must be in [0, 1), got {valid_share}")
    rows = load_served(served, since, until, spec_sha256)
    feature_spec, metadata = resolve_spec(rows, registry, spec)
    text = {name: strings(rows.arrays[name]) for name in (*PER_REQUEST, "item_id")}
    request_id, item_id = text["request_id"], text["item_id"]
    lap("served")
    events = load_events(sources, pc.unique(request_id), since - windows.skew_s, as_of)
    lap("events")
    served_row, event = match(request_id, item_id, events)
    kind, ts, amount, seconds = event_arrays(events, event)
    labels = attribute(rows.arrays["ts"], served_row, kind, ts, amount, seconds, windows, as_of)
    keep = {"all": np.ones(len(rows), dtype=bool), "returned": rows.arrays["position"] >= 0,
            "impressed": labels["impression"] > 0}[rows_kept]  # fmt: skip
    lap("join")
    table = export_table(rows, text, labels, keep)
    # the sources without the Redis URL: it may hold a password
    info = {
        "since": since,
        "until": until,
        "as_of": as_of,
        "rows": rows_kept,
        "windows": asdict(windows),
        "archive": None if sources.archive is None else str(sources.archive),
        "stream_namespace": sources.namespace,
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps({**rows.meta, "export": info})})
    out.mkdir(parents=True, exist_ok=True)
    n_valid = int(round(table.num_rows * valid_share))
    _write_parquet(table.slice(0, table.num_rows - n_valid), out / "train.parquet")
    if n_valid:
        _write_parquet(table.slice(table.num_rows - n_valid), out / "valid.parquet")
    feature_spec.save(out)
    _write_dataset_yaml(out, feature_spec, metadata, bool(n_valid))
    lap("write")
    report = ExportReport(
        served_rows=len(rows), rows_written=table.num_rows, valid_rows=n_valid,
        events_read=events.num_rows, events_matched=int(len(np.unique(event))),
        positives={k: int(labels[k][keep].sum()) for k in BINARY_LABELS},
        seconds=round(time.perf_counter() - t0, 3), stage_seconds=stages,
    )  # fmt: skip
    summary = {**asdict(report), "export": info, "served_meta": rows.meta}
    (out / "export.json").write_text(json.dumps(summary, indent=1))
    return report


def _write_dataset_yaml(
    out: Path, spec: FeatureSpec, metadata: dict[str, Any] | None, with_valid: bool
) -> None:
    tasks, funnel_policy = dataset_tasks(metadata)
    doc: dict[str, Any] = {
        "name": out.resolve().name,
        "format": "served",
        "feature_spec": SPEC_FILE,
        "train": "train.parquet",
        **({"valid": "valid.parquet"} if with_valid else {}),
        "sparse": [{"name": f.name, "source": f.source} for f in spec.sparse],
        "dense": [{"name": f.name, "source": f.source} for f in spec.dense],
        "tasks": tasks,
        "user_column": "user_id",
        "funnel_policy": funnel_policy,
    }
    head = ("# Written by mtrank logs export: served rows, inputs encoded as served "
            "(training/served_data.py).\n")  # fmt: skip
    path = out / "dataset.yaml"
    path.write_text(head + yaml.safe_dump(doc, sort_keys=False))
    try:
        load_dataset_spec(path)  # what mtrank train will read must validate
    except ConfigError as e:
        raise ExportError(f"the written dataset spec does not validate: {e}") from e


# ---------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtrank logs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    e = sub.add_parser("export", help="join served rows with later events into training Parquet")
    e.add_argument("--served", required=True, type=Path, help="the served-feature log directory")
    e.add_argument("--since", required=True, help="first served time (Unix s or ISO 8601, UTC)")
    e.add_argument("--until", required=True, help="end of the served range (excluded)")
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--events-archive", type=Path, default=None, help="mtrank events archive DIR")
    e.add_argument("--redis", default=None, help="read the stream too: redis://host:port/db")
    e.add_argument("--namespace", default=None, help="the stream's namespace (with --redis)")
    e.add_argument("--click-window", default="1h", help="click within this of the serve")
    e.add_argument("--conversion-window", default="7d", help="cart/collect/purchase/stay")
    e.add_argument("--clock-skew", default="1m", help="an event may precede by this much")
    e.add_argument("--as-of", default=None, help="events known by this time (default: now)")
    e.add_argument("--rows", choices=("returned", "impressed", "all"), default="returned")
    e.add_argument("--registry", type=Path, default=Path("models"), help="to find spec.json")
    e.add_argument("--spec", type=Path, default=None, help="spec.json (or its version folder)")
    e.add_argument("--spec-sha256", default=None, help="the input spec to export (a prefix)")
    e.add_argument("--valid-share", type=float, default=0.0, help="latest rows to valid.parquet")
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        windows = Windows(parse_duration(args.click_window),
                          parse_duration(args.conversion_window),
                          parse_duration(args.clock_skew))  # fmt: skip
        report = export(
            args.served, parse_time(args.since), parse_time(args.until), args.out,
            EventSources(args.events_archive, args.redis, args.namespace), windows=windows,
            as_of=None if args.as_of is None else parse_time(args.as_of), rows_kept=args.rows,
            registry=args.registry, spec=args.spec, spec_sha256=args.spec_sha256,
            valid_share=args.valid_share,
        )  # fmt: skip
    except (ExportError, RedisError, OSError, ValueError) as e:
        log.error("mtrank logs export: %s", e)
        return 1
    log.info(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
