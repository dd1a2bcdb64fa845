"""Tabular data -> encoded numpy arrays, streamed so a file larger than memory still fits.

Two passes over the data, both in Arrow record batches:

1. over the train split: vocabulary counts per sparse column and running moments per dense
   column, from which the :class:`mtrank.spec.FeatureSpec` is built (the serving contract);
2. over every split: each batch is encoded with that FeatureSpec's own ``SparseField.encode``
   (applied to the batch's distinct values) and ``DenseField.normalise``, funnel labels are
   checked, and rows are appended to ``.npy`` files under ``cache_dir/<fingerprint>/``.

The fingerprint hashes the dataset spec and each source file's path, size and mtime, so a second
run on unchanged inputs opens the cached arrays as memory maps and parses no text. A cache is
built in a temporary folder and renamed into place, so concurrent DDP ranks never see half of
one. Sparse values are keyed by ``str(raw)``, exactly as the service keys them.

A delayed task's timing columns (``elapsed`` and ``delay``, training/models/delayed.py) are read
as float32 and travel beside its labels under ``timing_key(task, column)``.

A ``format: served`` dataset (rows of ``mtrank logs export``, training/served_data.py) skips
both encodings: the FeatureSpec is the served model's (pass 1 only checks it against the files),
and pass 2 copies the stored inputs.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.lib.format import open_memmap

from mtrank.spec import OOV_INDEX, DenseField, FeatureSpec, SparseField, TaskOutput
from training.config import DatasetSpec, TaskColumn, timing_key
from training.served_data import input_columns, served_feature_spec, served_inputs

log = logging.getLogger(__name__)
CACHE_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "valid", "test")
MAX_EXAMPLES = 5
_COPY_ROWS = 1 << 18


class DataError(ValueError):
    """Data that cannot be used as the dataset spec says; the message names file and column."""


class MissingColumnError(DataError):
    """A column named in the dataset spec is absent from a data file."""


class FunnelError(DataError):
    """Child-positive / parent-negative rows under ``funnel_policy: error``."""


# ------------------------------------------------------------------ reading
def _csv_header(path: Path) -> list[str]:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", newline="") as gz:
            return next(csv.reader(gz), [])
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def stream_batches(
    path: Path,
    fmt: str,
    text: list[str],
    numeric: list[str],
    *,
    batch_rows: int = 1 << 16,
    csv_block_bytes: int = 1 << 22,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the named columns only; memory is bounded by one batch.

    CSV columns in ``text`` are read as strings (empty cell = missing), the rest as float64.
    Parquet columns keep their stored types. A named column absent from the file raises
    :class:`MissingColumnError` before any row is read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    names = list(dict.fromkeys(text + numeric))
    have = _csv_header(path) if fmt == "csv" else pq.ParquetFile(path).schema_arrow.names
    missing = [c for c in names if c not in have]
    if missing:
        raise MissingColumnError(
            f"{path}: column(s) {missing} named in the dataset spec are not in the file "
            f"(it has {len(have)} columns: {have[:12]}{' ...' if len(have) > 12 else ''})"
        )
    try:
        if fmt in ("parquet", "served"):
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=names)
            return
        types = {c: pa.float64() for c in numeric} | {c: pa.string() for c in text}
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=csv_block_bytes),
            convert_options=pacsv.ConvertOptions(
                include_columns=names,
                column_types=types,
                null_values=[""],
                strings_can_be_null=True,
            ),
        )
        yield from reader
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot parse: {e}") from e


def _as_text(col: pa.Array) -> pa.Array:
    """Values as ``str(raw)`` renders them: the key SparseField.encode looks up."""
    t = col.type
    if pa.types.is_string(t):
        return col
    if pa.types.is_large_string(t) or pa.types.is_integer(t):
        return pc.cast(col, pa.string())  # identical to str() for these types
    # floats ("1.0" vs Arrow's "1"), bools ("True" vs "true"), ...: ask Python, once per value
    d = pc.dictionary_encode(col)
    keys = pa.array([None if v is None else str(v) for v in d.dictionary.to_pylist()], pa.string())
    return pc.take(keys, d.indices)


def _as_float(col: pa.Array, path: Path, name: str) -> np.ndarray:
    """float64 values, missing -> nan (DenseField.normalise maps nan to the default)."""
    try:
        return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: column {name!r} is not numeric: {e}") from e


# ------------------------------------------------------------------ funnel check
@dataclass(frozen=True)
class FunnelViolation:
    """Rows whose ``child`` label is positive while the ``parent`` label is 0."""

    child: str
    parent: str
    count: int
    examples: list[int]  # 0-based data-row numbers in the split's file


@dataclass(frozen=True)
class SplitReport:
    split: str
    rows_read: int
    rows_kept: int
    violations: list[FunnelViolation]
    label_means: dict[str, float]  # after the policy was applied


@dataclass(frozen=True)
class LabelReport:
    """Funnel-consistency findings per split and the policy that handled them."""

    policy: str
    splits: dict[str, SplitReport] = field(default_factory=dict)

    def violations(self, split: str) -> int:
        return sum(v.count for v in self.splits[split].violations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "splits": {
                k: {**vars(s), "violations": [vars(v) for v in s.violations]}
                for k, s in self.splits.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelReport:
        splits = {
            k: SplitReport(**{**s, "violations": [FunnelViolation(**v) for v in s["violations"]]})
            for k, s in d["splits"].items()
        }
        return cls(policy=d["policy"], splits=splits)


class _FunnelCheck:
    """Counts and applies the funnel policy batch by batch over one split."""

    def __init__(self, ds: DatasetSpec, split: str) -> None:
        self.ds, self.split = ds, split
        depth = {t.name: self._depth(t.name) for t in ds.tasks}
        # deepest child first, so fix_parent propagates up a chain (purchase -> cart -> click)
        self.pairs = sorted(
            ((t.name, t.depends_on) for t in ds.tasks if t.depends_on is not None),
            key=lambda cp: -depth[cp[0]],
        )
        self.counts = dict.fromkeys(self.pairs, 0)
        self.examples: dict[tuple[str, str], list[int]] = {cp: [] for cp in self.pairs}
        self.rows_read = self.rows_kept = 0
        self.sums = {t.name: 0.0 for t in ds.tasks}

    def _depth(self, name: str) -> int:
        parent = self.ds.task(name).depends_on
        return 0 if parent is None else 1 + self._depth(parent)

    def apply(self, labels: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        """Count violations in this batch, fix labels in place; return a keep mask for 'drop'."""
        offset = self.rows_read
        self.rows_read += n
        bad_any = np.zeros(n, dtype=bool)
        for child, parent in self.pairs:
            bad = (labels[child] > 0) & (labels[parent] <= 0)
            rows = np.flatnonzero(bad)
            self.counts[(child, parent)] += len(rows)
            ex = self.examples[(child, parent)]
            ex.extend(int(r) + offset for r in rows[: MAX_EXAMPLES - len(ex)])
            if self.ds.funnel_policy == "fix_parent":
                labels[parent] = np.where(bad, np.float32(1.0), labels[parent])
            bad_any |= bad
        keep = ~bad_any if self.ds.funnel_policy == "drop" and bad_any.any() else None
        for name, y in labels.items():
            self.sums[name] += float(np.sum(y if keep is None else y[keep], dtype=np.float64))
        self.rows_kept += n if keep is None else int(keep.sum())
        return keep

    def report(self, path: Path) -> SplitReport:
        found = [
            FunnelViolation(c, p, self.counts[(c, p)], self.examples[(c, p)])
            for c, p in self.pairs
            if self.counts[(c, p)]
        ]
        for v in found:
            log.warning(
                "%s split %s: %d rows with %s > 0 while %s = 0 (rows %s); policy %s",
                path, self.split, v.count, v.child, v.parent, v.examples, self.ds.funnel_policy,
            )  # fmt: skip
        if not found and self.pairs:
            log.info("%s split %s: funnel labels consistent", path, self.split)
        if found and self.ds.funnel_policy == "error":
            detail = "; ".join(
                f"{v.count} rows with {v.child}=1 while {v.parent}=0 (e.g. rows {v.examples})"
                for v in found
            )
            raise FunnelError(
                f"{path}: funnel labels broken: {detail}; set funnel_policy to 'drop' or "
                "'fix_parent' to accept this file"
            )
        kept = max(self.rows_kept, 1)
        return SplitReport(
            self.split,
            self.rows_read,
            self.rows_kept,
            found,
            {k: s / kept for k, s in self.sums.items()},
        )


def _read_labels(ds: DatasetSpec, batch: pa.RecordBatch, path: Path) -> dict[str, np.ndarray]:
    labels = {}
    for t in ds.tasks:
        y = _as_float(batch.column(t.label), path, t.label).astype(np.float32)
        if np.isnan(y).any():
            row = int(np.flatnonzero(np.isnan(y))[0])
            raise DataError(
                f"{path}: label column {t.label!r} is missing in a row (batch row {row})"
            )
        labels[t.name] = y
    return labels


def _timing(ds: DatasetSpec) -> list[tuple[str, TaskColumn, str]]:
    """(key, task, column) of every timing column of the spec, elapsed before delay."""
    out = []
    for t in ds.tasks:
        if t.elapsed is not None:
            out.append((timing_key(t.name, "elapsed"), t, t.elapsed))
        if t.delay is not None:
            out.append((timing_key(t.name, "delay"), t, t.delay))
    return out


def _read_timing(
    ds: DatasetSpec, batch: pa.RecordBatch, labels: dict[str, np.ndarray], path: Path
) -> dict[str, np.ndarray]:
    """The timing columns in days. An elapsed time must be known and >= 0 on every row; a delay
    where the label is 1, and no longer than the elapsed time (a conversion seen after the
    cut-off is a leak from the future). A delay elsewhere is never read: stored as 0."""
    out: dict[str, np.ndarray] = {}
    for key, t, column in _timing(ds):
        x = _as_float(batch.column(column), path, column)
        if column == t.elapsed:
            bad = ~(x >= 0.0)  # NaN too
            if bad.any():
                raise DataError(
                    f"{path}: elapsed column {column!r} of task {t.name!r} is missing or "
                    f"negative in a row (batch row {int(np.flatnonzero(bad)[0])})"
                )
        else:
            positive = labels[t.name] > 0
            elapsed = out[timing_key(t.name, "elapsed")]
            bad = positive & ~((x >= 0.0) & (x <= elapsed + 1e-6))
            if bad.any():
                raise DataError(
                    f"{path}: delay column {column!r} of task {t.name!r} must lie in [0, elapsed] "
                    f"where the label is 1 (batch row {int(np.flatnonzero(bad)[0])})"
                )
            x = np.where(positive, x, 0.0)
        out[key] = x.astype(np.float32)
    return out


# ------------------------------------------------------------------ pass 1: the feature spec
class _Moments:
    """Count, mean and sum of squared deviations, merged block by block (Chan et al.).

    Values are merged in fixed blocks of ``BLOCK`` values, not per read batch, so the
    statistics are bit-identical whatever batch size the file was streamed with.
    """

    BLOCK = 1 << 14

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def update(self, x: np.ndarray) -> None:
        self._pending.append(x)
        self._pending_n += len(x)
        if self._pending_n >= self.BLOCK:
            buf = np.concatenate(self._pending)
            full = len(buf) - len(buf) % self.BLOCK
            for s in range(0, full, self.BLOCK):
                self._merge(buf[s : s + self.BLOCK])
            self._pending, self._pending_n = [buf[full:]], len(buf) - full

    def finish(self) -> _Moments:
        if self._pending_n:
            self._merge(np.concatenate(self._pending))
        self._pending, self._pending_n = [], 0
        return self

    def _merge(self, x: np.ndarray) -> None:
        nb, mb = len(x), float(np.mean(x))
        m2b = float(np.sum((x - mb) ** 2))
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n


def _vocab(counts: dict[str, int], min_count: int) -> list[str]:
    """mtrank.spec.build_vocab on counts: most frequent first, ties by value."""
    kept = sorted(((-c, k) for k, c in counts.items() if c >= min_count))
    return [k for _, k in kept]


def _roles(ds: DatasetSpec, with_labels: bool = True) -> tuple[list[str], list[str]]:
    text = [c.name for c in ds.sparse] + ([ds.user_column] if ds.user_column else [])
    numeric = [c.name for c in ds.dense] + [t.label for t in ds.tasks]
    if ds.format == "served":  # inputs stored encoded, read as stored (training/served_data.py)
        text, numeric = text[len(ds.sparse) :], input_columns(ds) + numeric[len(ds.dense) :]
    if with_labels:
        numeric += list(ds.truth_columns) + [column for _, _, column in _timing(ds)]
    text = list(dict.fromkeys(text))
    return text, [c for c in dict.fromkeys(numeric) if c not in text]


def _build_spec(ds: DatasetSpec, path: Path, batch_rows: int, block: int) -> FeatureSpec:
    """Pass 1 over the train split (rows dropped by the funnel policy do not count)."""
    counts: dict[str, dict[str, int]] = {c.name: {} for c in ds.sparse}
    moments = {c.name: _Moments() for c in ds.dense}
    text, numeric = _roles(ds, with_labels=False)
    funnel = _FunnelCheck(ds, "train")
    for batch in stream_batches(
        path, ds.format, text, numeric, batch_rows=batch_rows, csv_block_bytes=block
    ):
        keep = funnel.apply(_read_labels(ds, batch, path), batch.num_rows)
        for sc in ds.sparse:
            col = _as_text(batch.column(sc.name))
            vc = pc.value_counts(col if keep is None else col.filter(pa.array(keep)))
            bucket = counts[sc.name]
            values, freq = vc.field("values").to_pylist(), vc.field("counts").to_pylist()
            for v, n in zip(values, freq, strict=True):
                if v is not None:
                    bucket[v] = bucket.get(v, 0) + n
        for dc in ds.dense:
            x = _as_float(batch.column(dc.name), path, dc.name)
            x = x if keep is None else x[keep]
            x = x[np.isfinite(x)]
            moments[dc.name].update(np.log1p(np.maximum(x, 0.0)) if dc.log1p else x)
    sparse = [
        SparseField(name=c.name, source=c.source, vocab=_vocab(counts[c.name], c.min_count))
        for c in ds.sparse
    ]
    dense = [_dense_field(c, moments[c.name].finish()) for c in ds.dense]
    outputs = [TaskOutput(name=t.name, kind=t.kind) for t in ds.tasks]
    return FeatureSpec(sparse=sparse, dense=dense, outputs=outputs)


def _dense_field(c: Any, m: _Moments) -> DenseField:
    mean = m.mean if m.n else 0.0
    std = math.sqrt(m.m2 / m.n) if m.n else 0.0
    if c.default is not None:
        default = float(c.default)
    else:
        # the raw value that normalises to exactly 0: the training mean in the model's space
        default = math.expm1(mean) if c.log1p else mean
    return DenseField(
        name=c.name,
        source=c.source,
        mean=mean,
        std=std if std > 1e-12 else 1.0,
        default=default,
        log1p=c.log1p,
    )


# ------------------------------------------------------------------ pass 2: encoding
def _encode_sparse(f: SparseField, col: pa.Array) -> np.ndarray:
    """(n,) int64 indices; each distinct value goes through ``f.encode_many`` (the contract's
    encoder) once."""
    d = pc.dictionary_encode(_as_text(col))
    codes = np.append(f.encode_many(d.dictionary.to_pylist()), OOV_INDEX)  # last = missing
    idx = pc.fill_null(d.indices, -1).to_numpy(zero_copy_only=False)
    out: np.ndarray = codes[idx]
    return out


def _group_ids(col: pa.Array, index: dict[str, int]) -> np.ndarray:
    """(n,) int64 user index, stable across splits; a missing user is group -1."""
    d = pc.dictionary_encode(_as_text(col))
    codes = [index.setdefault(v, len(index)) for v in d.dictionary.to_pylist()] + [-1]
    idx = pc.fill_null(d.indices, -1).to_numpy(zero_copy_only=False)
    out: np.ndarray = np.asarray(codes, dtype=np.int64)[idx]
    return out


def _stack(columns: list[np.ndarray], n: int) -> np.ndarray:
    """(n, len(columns)) from per-column arrays, also when there are no columns."""
    return np.stack(columns, axis=1) if columns else np.empty((n, 0))


class _NpySink:
    """Appends rows to a raw file, then writes the ``.npy`` once the row count is known."""

    def __init__(self, path: Path, dtype: type[np.generic], width: int | None) -> None:
        self.path, self.dtype, self.width = path, np.dtype(dtype), width
        self.raw = path.with_suffix(".raw")
        self.f = self.raw.open("wb")
        self.rows = 0

    def append(self, a: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.rows += len(a)

    def close(self) -> None:
        self.f.close()
        shape = (self.rows,) if self.width is None else (self.rows, self.width)
        out = open_memmap(self.path, mode="w+", dtype=self.dtype, shape=shape)
        if out.size:
            src = np.memmap(self.raw, dtype=self.dtype, mode="r", shape=shape)
            for s in range(0, self.rows, _COPY_ROWS):
                out[s : s + _COPY_ROWS] = src[s : s + _COPY_ROWS]
            out.flush()
            del src
        del out
        self.raw.unlink()


def _encode_split(
    ds: DatasetSpec,
    spec: FeatureSpec,
    split: str,
    path: Path,
    out: Path,
    users: dict[str, int],
    batch_rows: int,
    block: int,
) -> SplitReport:
    out.mkdir(parents=True)
    sinks: dict[str, _NpySink] = {
        "sparse": _NpySink(out / "sparse.npy", np.int64, len(spec.sparse)),
        "dense": _NpySink(out / "dense.npy", np.float32, len(spec.dense)),
    }
    for i, _ in enumerate(ds.tasks):
        sinks[f"label_{i}"] = _NpySink(out / f"label_{i}.npy", np.float32, None)
    for i, _ in enumerate(ds.truth_columns):
        sinks[f"truth_{i}"] = _NpySink(out / f"truth_{i}.npy", np.float32, None)
    for i, _ in enumerate(_timing(ds)):
        sinks[f"timing_{i}"] = _NpySink(out / f"timing_{i}.npy", np.float32, None)
    if ds.user_column:
        sinks["groups"] = _NpySink(out / "groups.npy", np.int64, None)
    try:
        report = _encode_rows(ds, spec, split, path, sinks, users, batch_rows, block)
    except BaseException:
        for sink in sinks.values():
            sink.f.close()
        raise
    for sink in sinks.values():
        sink.close()
    return report


def _encode_rows(
    ds: DatasetSpec,
    spec: FeatureSpec,
    split: str,
    path: Path,
    sinks: dict[str, _NpySink],
    users: dict[str, int],
    batch_rows: int,
    block: int,
) -> SplitReport:
    funnel = _FunnelCheck(ds, split)
    text, numeric = _roles(ds)
    for batch in stream_batches(
        path, ds.format, text, numeric, batch_rows=batch_rows, csv_block_bytes=block
    ):
        n = batch.num_rows
        labels = _read_labels(ds, batch, path)
        keep = funnel.apply(labels, n)
        if ds.format == "served":
            sparse, dense = served_inputs(batch, spec, path)
        else:
            sparse = _stack([_encode_sparse(f, batch.column(f.name)) for f in spec.sparse], n)
            dense = _stack(
                [f.normalise(_as_float(batch.column(f.name), path, f.name)) for f in spec.dense], n
            )
        cols: dict[str, np.ndarray] = {"sparse": sparse, "dense": dense}
        for i, t in enumerate(ds.tasks):
            cols[f"label_{i}"] = labels[t.name]
        for i, name in enumerate(ds.truth_columns):
            cols[f"truth_{i}"] = _as_float(batch.column(name), path, name)
        timing = _read_timing(ds, batch, labels, path)
        for i, (key, _, _) in enumerate(_timing(ds)):
            cols[f"timing_{i}"] = timing[key]
        if ds.user_column:
            cols["groups"] = _group_ids(batch.column(ds.user_column), users)
        for key, sink in sinks.items():
            sink.append(cols[key] if keep is None else cols[key][keep])
    return funnel.report(path)  # raises FunnelError under policy "error"


# ------------------------------------------------------------------ the cached result
@dataclass(frozen=True)
class Batch:
    """One mini-batch, numpy arrays in memory."""

    sparse: np.ndarray  # (B, S) int64 vocabulary indices
    dense: np.ndarray  # (B, D) float32 normalised values
    labels: dict[str, np.ndarray]  # task -> (B,) float32
    groups: np.ndarray | None  # (B,) int64 user index, for GAUC
    truth: dict[str, np.ndarray]  # name -> (B,) float32, evaluation only

    def __len__(self) -> int:
        return len(self.sparse)


@dataclass(frozen=True)
class Encoded:
    """One encoded split; arrays are read-only memory maps over the cache."""

    sparse: np.ndarray  # (N, S) int64
    dense: np.ndarray  # (N, D) float32
    labels: dict[str, np.ndarray]  # task (and timing key) -> (N,) float32
    groups: np.ndarray | None  # (N,) int64
    truth: dict[str, np.ndarray]  # name -> (N,) float32

    def __len__(self) -> int:
        return len(self.sparse)

    @classmethod
    def open(
        cls, directory: Path, tasks: list[str], truth: list[str], timing: Sequence[str] = ()
    ) -> Encoded:
        def load(name: str) -> np.ndarray:
            arr: np.ndarray = np.load(directory / f"{name}.npy", mmap_mode="r")
            return arr

        groups = load("groups") if (directory / "groups.npy").exists() else None
        return cls(
            sparse=load("sparse"),
            dense=load("dense"),
            labels={t: load(f"label_{i}") for i, t in enumerate(tasks)}
            | {k: load(f"timing_{i}") for i, k in enumerate(timing)},
            groups=groups,
            truth={t: load(f"truth_{i}") for i, t in enumerate(truth)},
        )

    def take(self, rows: slice | np.ndarray) -> Batch:
        """Rows by slice or index array, copied out of the memory maps."""
        return Batch(
            sparse=np.array(self.sparse[rows]),
            dense=np.array(self.dense[rows]),
            labels={k: np.array(v[rows]) for k, v in self.labels.items()},
            groups=None if self.groups is None else np.array(self.groups[rows]),
            truth={k: np.array(v[rows]) for k, v in self.truth.items()},
        )

    def id_counts(self, vocab_sizes: Sequence[int], chunk_rows: int = 1 << 18) -> list[np.ndarray]:
        """Rows per vocabulary index of each sparse column: (vocab_size,) int64 per column.

        Counts the encoded ids, so rare values folded into the OOV index count for index 0.
        Read in chunks: the memory maps are never loaded whole.
        """
        counts = [np.zeros(v, dtype=np.int64) for v in vocab_sizes]
        for s in range(0, len(self), chunk_rows):
            block = np.asarray(self.sparse[s : s + chunk_rows])  # (n, S)
            for j, c in enumerate(counts):
                c += np.bincount(block[:, j], minlength=len(c))[: len(c)]
        return counts

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Mini-batches of this rank's shard.

        Shards are disjoint and equally long (DDP ranks must take the same number of steps),
        so ``len(self) % world_size`` rows are left out: the last ones of the (shuffled) order,
        hence different rows each epoch when the seed changes. Shuffling is a permutation drawn
        from ``seed``; rows inside a batch are read in file order, which keeps memory-map reads
        local without changing what the batch contains.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        per_rank = len(self) // world_size
        lo = rank * per_rank
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else None
        for s in range(lo, lo + per_rank, batch_size):
            e = min(s + batch_size, lo + per_rank)
            yield self.take(slice(s, e) if order is None else np.sort(order[s:e]))


def label_base_rates(
    split: Encoded, tasks: Sequence[TaskColumn], chunk_rows: int = 1 << 18
) -> dict[str, float]:
    """Each task's base rate on ``split``, in the space its output is fitted in.

    Binary: the positive rate; regression: the mean label after its ``transform``. A task that
    ``depends_on`` a parent is averaged over the rows where the parent is positive, as its loss
    is (models.base): P(child | parent). A task with no such rows gets 0.
    """
    sums = dict.fromkeys((t.name for t in tasks), 0.0)
    rows = dict.fromkeys((t.name for t in tasks), 0.0)
    for s in range(0, len(split), chunk_rows):
        for t in tasks:
            y = np.asarray(split.labels[t.name][s : s + chunk_rows], dtype=np.float64)  # (n,)
            if t.transform == "log1p":
                y = np.log1p(np.maximum(y, 0.0))
            if t.depends_on is not None:
                y = y[np.asarray(split.labels[t.depends_on][s : s + chunk_rows]) >= 0.5]
            sums[t.name] += float(y.sum())
            rows[t.name] += len(y)
    return {n: sums[n] / rows[n] if rows[n] else 0.0 for n in sums}


@dataclass(frozen=True)
class PreparedData:
    """A FeatureSpec and the encoded splits it produced."""

    spec: FeatureSpec
    train: Encoded
    valid: Encoded | None
    test: Encoded | None
    label_report: LabelReport
    fingerprint: str
    path: Path  # the cache folder holding the arrays


# ------------------------------------------------------------------ entry point
def _split_paths(ds: DatasetSpec) -> dict[str, Path]:
    raw = {"train": ds.train, "valid": ds.valid, "test": ds.test}
    return {k: Path(v).resolve() for k, v in raw.items() if v is not None}


def fingerprint(ds: DatasetSpec) -> str:
    """Hash of the dataset spec and each source file's path, size and mtime."""
    h = hashlib.sha256()
    paths = _split_paths(ds)
    dumped = ds.model_dump(mode="json") | {k: str(v) for k, v in paths.items()}
    for task in dumped["tasks"]:  # a spec without timing columns keeps its older fingerprint
        for key in ("elapsed", "delay"):
            if task[key] is None:
                del task[key]
    if dumped["feature_spec"] is None:  # unchanged fingerprints for the encoding formats
        del dumped["feature_spec"]
    h.update(json.dumps({"v": CACHE_VERSION, "ds": dumped}, sort_keys=True).encode())
    if ds.feature_spec is not None:
        paths = {**paths, "feature_spec": Path(ds.feature_spec).resolve()}
    for split, path in paths.items():
        try:
            st = path.stat()
        except FileNotFoundError as e:
            raise DataError(f"{path}: {split} data file not found") from e
        h.update(f"|{split}|{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _load(directory: Path) -> PreparedData:
    meta = json.loads((directory / META_FILE).read_text())
    timing = meta.get("timing", [])
    enc = {
        s: Encoded.open(directory / s, meta["tasks"], meta["truth"], timing) for s in meta["splits"]
    }
    return PreparedData(
        spec=FeatureSpec.load(directory),
        train=enc["train"],
        valid=enc.get("valid"),
        test=enc.get("test"),
        label_report=LabelReport.from_dict(meta["label_report"]),
        fingerprint=meta["fingerprint"],
        path=directory,
    )


def prepare(
    ds: DatasetSpec,
    cache_dir: Path,
    *,
    batch_rows: int = 1 << 16,
    csv_block_bytes: int = 1 << 22,
) -> PreparedData:
    """Build (or reuse) the FeatureSpec and encoded arrays of every split of ``ds``.

    ``batch_rows`` (Parquet) and ``csv_block_bytes`` (CSV) bound the memory of one read; they do
    not change the result. Raises :class:`DataError` for missing files or columns, unparseable
    values, and broken funnels under ``funnel_policy: error``.
    """
    fp = fingerprint(ds)
    cache_dir = Path(cache_dir)
    final = cache_dir / fp
    if (final / META_FILE).is_file():
        log.info("reusing encoded data %s", final)
        return _load(final)
    paths = _split_paths(ds)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fp}-", dir=cache_dir))
    try:
        if ds.format == "served":
            spec = served_feature_spec(ds, paths)
        else:
            spec = _build_spec(ds, paths["train"], batch_rows, csv_block_bytes)
        spec.save(tmp)
        users: dict[str, int] = {}
        reports = {
            split: _encode_split(
                ds, spec, split, p, tmp / split, users, batch_rows, csv_block_bytes
            )
            for split, p in paths.items()
        }
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": fp,
            "dataset": ds.model_dump(mode="json"),
            "splits": list(paths),
            "tasks": [t.name for t in ds.tasks],
            "truth": list(ds.truth_columns),
            "timing": [key for key, _, _ in _timing(ds)],
            "label_report": LabelReport(ds.funnel_policy, reports).to_dict(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)
