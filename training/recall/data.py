"""Click sequences -> recall training examples, evaluation sets and the item catalog.

Reads the folder ``mtrank synth ecommerce`` writes: the impression splits (clicked rows only are
kept), ``users.parquet``, ``items.parquet`` and ``titles.parquet``. Everything is small enough to
hold in memory (a click is one row in ~20 impressions), so there is no cache.

Vocabularies come from the train split's clicks only (the :class:`mtrank.spec.SparseField` rule:
index 0 is OOV, for unseen, rarer than ``min_count`` and missing values): user attributes over the
clicking rows, item ids over clicked items, item attributes and price moments over the distinct
clicked items, title tokens over the titles of the distinct clicked items.

- **Clicks** of a split are sorted by (user, time); equal times keep file order, which is the
  generator's time order. ``purchase`` flags a click that led to a purchase.
- **Training examples**: each train click with the user's previous ``history_max_len`` train
  clicks (oldest first, padded, with a length) as the history and the clicked item as the target.
  A history holds only clicks strictly before its target in that order: never the target click
  itself and never a later one.
- **Evaluation sets** (valid, test): each user who clicks in the split, with every click before
  the split (train for valid, train + valid for test) as the history and the distinct items
  clicked in the split as the targets. ``seen`` holds every item the history clicked (not just
  the last ``history_max_len``) so evaluation can leave them out.
- **The catalog** (the candidate corpus, one row per item): row 0 is the OOV bucket (item id -1,
  never a candidate), rows 1..V-1 are the item vocabulary (row i = vocabulary index i), then the
  catalog items without an id row (never clicked in train: cold items), by item id. Targets and
  seen items are catalog rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mtrank.recall_spec import HistoryField, RecallSpec, TextField, pad_sequences
from mtrank.spec import OOV_INDEX, DenseField, Source, SparseField, build_vocab
from training.recall.config import RecallTrainConfig
from training.titles import TITLES_FILE

NO_ITEM = -1  # item id of the catalog's OOV row


class RecallDataError(ValueError):
    """Data the recall pipeline cannot use; the message names the file and the column."""


# ------------------------------------------------------------------ clicks
@dataclass(frozen=True)
class Clicks:
    """Clicks sorted by (user, time, file order). All arrays are (n,)."""

    user_id: np.ndarray  # int64
    item_id: np.ndarray  # int64
    ts: np.ndarray  # int64
    purchase: np.ndarray  # int8

    def __len__(self) -> int:
        return len(self.user_id)

    def __add__(self, later: Clicks) -> Clicks:
        """The clicks of two consecutive periods, re-sorted (``later`` wins ties on time)."""
        n = len(self)
        rank = np.concatenate([np.arange(n), n + np.arange(len(later))])
        order = np.lexsort(
            (
                rank,
                np.concatenate([self.ts, later.ts]),
                np.concatenate([self.user_id, later.user_id]),
            )
        )
        cat = [
            np.concatenate([a, b])[order]
            for a, b in zip(self.arrays(), later.arrays(), strict=True)
        ]
        return Clicks(*cat)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.user_id, self.item_id, self.ts, self.purchase


def _column(table: object, path: Path, name: str) -> np.ndarray:
    try:
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False))  # type: ignore[attr-defined]
    except KeyError as e:
        raise RecallDataError(f"{path}: no column {name!r}") from e


def read_clicks(path: Path, extra: tuple[str, ...] = ()) -> tuple[Clicks, dict[str, np.ndarray]]:
    """The clicked rows of one split, sorted, and their ``extra`` columns (in the same order)."""
    path = Path(path)
    if not path.is_file():
        raise RecallDataError(f"{path}: no such file (generate it with `mtrank synth ecommerce`)")
    names = ["ts", "user_id", "item_id", "click", "purchase", *extra]
    have = pq.ParquetFile(path).schema_arrow.names
    missing = [c for c in names if c not in have]
    if missing:
        raise RecallDataError(f"{path}: missing column(s) {missing}")
    table = pq.read_table(path, columns=list(dict.fromkeys(names)))
    clicked = _column(table, path, "click") == 1
    cols = {c: _column(table, path, c)[clicked] for c in dict.fromkeys(names)}
    user, item, ts = (cols[c].astype(np.int64) for c in ("user_id", "item_id", "ts"))
    order = np.lexsort((np.arange(len(user)), ts, user))
    clicks = Clicks(user[order], item[order], ts[order], cols["purchase"].astype(np.int8)[order])
    return clicks, {c: cols[c][order] for c in extra}


def history_windows(user: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For clicks sorted by user: (positions [n, max_len] of each click's previous clicks of the
    same user, oldest first and -1 past the length, lengths [n])."""
    n = len(user)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    starts = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))  # (n,) group start
    lengths = np.minimum(np.arange(n) - starts, max_len).astype(np.int64)  # earlier clicks kept
    cols = np.arange(max_len)[None, :]  # (1, L)
    pos = (np.arange(n) - lengths)[:, None] + cols  # (n, L) oldest kept click first
    return np.where(cols < lengths[:, None], pos, -1), lengths


# ------------------------------------------------------------------ catalog
@dataclass(frozen=True)
class Catalog:
    """The item side, one row per candidate (see the module docstring for the row order)."""

    item_ids: np.ndarray  # (N,) int64, NO_ITEM at row 0
    sparse: np.ndarray  # (N, 1 + A) int64: item id index, then the item attribute columns
    dense: np.ndarray  # (N, P) float32: normalised price (P = 0 or 1)
    title: np.ndarray  # (N, T) int64 token ids (T = 1 of padding when the spec has no title)
    title_len: np.ndarray  # (N,) int64
    clicks: np.ndarray  # (N,) int64 train clicks (the in-batch and sampled q estimates)

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalog rows of raw item ids; an id absent from the catalog -> 0 (the OOV row)."""
        order = np.argsort(self.item_ids[1:], kind="stable") + 1
        pos = np.searchsorted(self.item_ids[order], item_ids)
        pos = np.minimum(pos, len(order) - 1)
        found = self.item_ids[order[pos]] == item_ids
        return np.where(found, order[pos], 0).astype(np.int64)

    @property
    def log_q(self) -> np.ndarray:
        """(N,) float32 log of each row's share of train clicks (-inf: never clicked)."""
        with np.errstate(divide="ignore"):
            out: np.ndarray = np.log(self.clicks / max(self.clicks.sum(), 1)).astype(np.float32)
        return out


# ------------------------------------------------------------------ examples
@dataclass(frozen=True)
class Examples:
    """Training examples: a user, the history before a click, the clicked catalog row."""

    user_sparse: np.ndarray  # (n, U) int64
    history: np.ndarray  # (n, L) int64 item vocabulary indices
    history_len: np.ndarray  # (n,) int64
    target: np.ndarray  # (n,) int64 catalog rows
    purchase: np.ndarray  # (n,) int8

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class EvalSet:
    """Users of a held-out split: the history before it, the items they click in it."""

    user_id: np.ndarray  # (n,) int64 raw
    user_sparse: np.ndarray  # (n, U) int64
    history: np.ndarray  # (n, L) int64
    history_len: np.ndarray  # (n,) int64
    targets: list[np.ndarray]  # n x (t_u,) distinct catalog rows clicked in the split
    seen: list[np.ndarray]  # n x (s_u,) distinct catalog rows clicked before the split

    def __len__(self) -> int:
        return len(self.user_id)


@dataclass(frozen=True)
class RecallData:
    spec: RecallSpec
    catalog: Catalog
    train: Examples
    train_clicks: Clicks
    valid: EvalSet | None
    test: EvalSet | None
    past: dict[str, Clicks]  # split -> the clicks before it (the baselines' training data)


class _Users:
    """User attribute rows from users.parquet, encoded with the spec's user fields."""

    def __init__(self, path: Path, fields: list[SparseField]) -> None:
        table = pq.read_table(path, columns=["user_id", *[f.name for f in fields]])
        self.ids = _column(table, path, "user_id").astype(np.int64)
        self.order = np.argsort(self.ids, kind="stable")
        self.sparse = np.zeros((len(self.ids), len(fields)), dtype=np.int64)
        for j, f in enumerate(fields):
            self.sparse[:, j] = f.encode_many(_column(table, path, f.name).tolist())

    def encode(self, user_ids: np.ndarray) -> np.ndarray:
        """(n, U) rows of raw user ids; an unknown user is all OOV (the cold-start row)."""
        pos = np.minimum(np.searchsorted(self.ids[self.order], user_ids), len(self.ids) - 1)
        rows = self.order[pos]
        found = self.ids[rows] == user_ids
        return np.where(found[:, None], self.sparse[rows], OOV_INDEX)


def _vocab_field(name: str, source: Source, values: np.ndarray, min_count: int) -> SparseField:
    return SparseField(name=name, source=source, vocab=build_vocab(values.tolist(), min_count))


def build_spec(
    cfg: RecallTrainConfig, data_dir: Path, train: Clicks, users: dict[str, np.ndarray]
) -> RecallSpec:
    """The recall contract: every vocabulary from the train clicks (module docstring)."""
    d, m = cfg.data, cfg.model
    items = pq.read_table(data_dir / "items.parquet")
    item_ids = _column(items, data_dir / "items.parquet", "item_id").astype(np.int64)
    clicked = np.isin(item_ids, np.unique(train.item_id))
    item_field = _vocab_field("item_id", "item", train.item_id, d.item_min_count)
    attrs = [
        _vocab_field(c, "item", _column(items, data_dir / "items.parquet", c)[clicked], 1)
        for c in d.item_columns
    ]
    dense = []
    if d.price_column is not None:
        price = _column(items, data_dir / "items.parquet", d.price_column).astype(np.float64)
        x = np.log1p(np.maximum(price[clicked], 0.0))
        mean, std = float(x.mean()), float(x.std()) or 1.0
        default = float(np.expm1(mean))
        dense.append(
            DenseField(
                name=d.price_column, source="item", mean=mean, std=std, default=default, log1p=True
            )
        )
    title = None
    if m.text_tower != "none":
        titles = _titles(data_dir, item_ids[clicked])
        tokens = [t for text in titles for t in dict.fromkeys(TextField.tokenize(text))]
        vocab = build_vocab(tokens, d.token_min_count)
        title = TextField(
            tokens=SparseField(name="title_token", source="item", vocab=vocab),
            max_len=d.title_max_len,
        )
    return RecallSpec(
        model_type=cfg.run_name.removeprefix("recall_"),
        user_sparse=[
            _vocab_field(c.name, "user", users[c.name], c.min_count) for c in d.user_columns
        ],
        history=HistoryField(items=item_field, max_len=d.history_max_len),
        item_sparse=[item_field, *attrs],
        item_dense=dense,
        title=title,
        embedding_dim=m.output_dim,
        similarity=m.similarity,
    )


def _titles(data_dir: Path, item_ids: np.ndarray) -> list[str | None]:
    path = data_dir / TITLES_FILE
    if not path.is_file():
        raise RecallDataError(f"{path}: no such file; a text tower needs the generator's titles")
    table = pq.read_table(path, columns=["item_id", "title"])
    lookup = dict(
        zip(
            _column(table, path, "item_id").tolist(), table.column("title").to_pylist(), strict=True
        )
    )
    return [lookup.get(i) for i in item_ids.tolist()]


def build_catalog(spec: RecallSpec, data_dir: Path, train: Clicks) -> Catalog:
    """Every item of items.parquet, encoded with the spec's item fields (module docstring)."""
    path = data_dir / "items.parquet"
    items = pq.read_table(path)
    raw_ids = _column(items, path, "item_id").astype(np.int64)
    vocab = spec.item_vocab
    index = vocab.encode_many(raw_ids.tolist())  # (M,) 0 for cold items
    in_vocab = {int(v) for v in vocab.vocab}
    absent = in_vocab - set(raw_ids.tolist())
    if absent:
        raise RecallDataError(
            f"{path}: clicked items missing from the catalog: {sorted(absent)[:5]}"
        )
    cold = np.flatnonzero(index == OOV_INDEX)
    cold = cold[np.argsort(raw_ids[cold], kind="stable")]
    by_index = np.empty(vocab.vocab_size - 1, dtype=np.int64)
    by_index[index[index > 0] - 1] = np.flatnonzero(index > 0)
    src = np.concatenate([[-1], by_index, cold])  # (N,) source row in items.parquet, -1 for OOV
    n = len(src)
    real = src >= 0
    item_ids = np.where(real, raw_ids[np.maximum(src, 0)], NO_ITEM)
    sparse = np.zeros((n, len(spec.item_sparse)), dtype=np.int64)
    sparse[:, 0] = np.where(np.arange(n) < vocab.vocab_size, np.arange(n), OOV_INDEX)
    for j, f in enumerate(spec.item_sparse[1:], start=1):
        values = _column(items, path, f.name)[np.maximum(src, 0)]
        sparse[:, j] = np.where(real, f.encode_many(values.tolist()), OOV_INDEX)
    dense = np.zeros((n, len(spec.item_dense)), dtype=np.float32)
    for j, df in enumerate(spec.item_dense):
        raw = _column(items, path, df.name).astype(np.float64)[np.maximum(src, 0)]
        dense[:, j] = df.normalise(np.where(real, raw, df.default))
    if spec.title is not None:
        texts = _titles(data_dir, item_ids)
        title, title_len = spec.title.encode(
            [t if i != NO_ITEM else None for t, i in zip(texts, item_ids, strict=True)]
        )
    else:
        title, title_len = np.zeros((n, 1), dtype=np.int64), np.zeros(n, dtype=np.int64)
    catalog = Catalog(item_ids, sparse, dense, title, title_len, np.zeros(n, dtype=np.int64))
    counts = np.bincount(catalog.rows(train.item_id), minlength=n).astype(np.int64)
    return Catalog(item_ids, sparse, dense, title, title_len, counts)


def build_examples(
    spec: RecallSpec, clicks: Clicks, users: _Users, catalog: Catalog, min_history: int
) -> Examples:
    """One example per train click with at least ``min_history`` earlier clicks (module doc)."""
    pos, lengths = history_windows(clicks.user_id, spec.history.max_len)
    item_index = spec.item_vocab.encode_many(clicks.item_id.tolist())  # (n,)
    history = np.where(pos >= 0, item_index[np.maximum(pos, 0)], 0)  # (n, L)
    full = np.arange(len(clicks)) - _group_starts(clicks.user_id)  # earlier clicks, uncapped
    keep = full >= min_history
    return Examples(
        user_sparse=users.encode(clicks.user_id[keep]),
        history=history[keep],
        history_len=lengths[keep],
        target=catalog.rows(clicks.item_id[keep]),
        purchase=clicks.purchase[keep],
    )


def _group_starts(user: np.ndarray) -> np.ndarray:
    new_user = np.ones(len(user), dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    return np.maximum.accumulate(np.where(new_user, np.arange(len(user)), 0))


def build_eval_set(
    spec: RecallSpec, past: Clicks, period: Clicks, users: _Users, catalog: Catalog
) -> EvalSet:
    """Each user clicking in ``period``: the history from ``past``, the targets from ``period``."""
    user_ids = np.unique(period.user_id)
    lo = np.searchsorted(past.user_id, user_ids, side="left")
    hi = np.searchsorted(past.user_id, user_ids, side="right")
    past_index = spec.item_vocab.encode_many(past.item_id.tolist())
    histories = [
        past_index[max(a, b - spec.history.max_len) : b] for a, b in zip(lo, hi, strict=True)
    ]
    history, history_len = pad_sequences(histories, spec.history.max_len, keep="last")
    past_rows, period_rows = catalog.rows(past.item_id), catalog.rows(period.item_id)
    plo = np.searchsorted(period.user_id, user_ids, side="left")
    phi = np.searchsorted(period.user_id, user_ids, side="right")
    return EvalSet(
        user_id=user_ids,
        user_sparse=users.encode(user_ids),
        history=history,
        history_len=history_len,
        targets=[np.unique(period_rows[a:b]) for a, b in zip(plo, phi, strict=True)],
        seen=[np.unique(past_rows[a:b]) for a, b in zip(lo, hi, strict=True)],
    )


def prepare(
    cfg: RecallTrainConfig, spec: RecallSpec | None = None, catalog: Catalog | None = None
) -> RecallData:
    """Read the generated folder and build the spec, catalog, examples and evaluation sets.

    A checkpoint's ``spec`` and ``catalog`` may be passed in: the examples and evaluation sets
    are then encoded exactly as the model was trained.
    """
    data_dir = Path(cfg.data.data_dir)
    user_cols = tuple(c.name for c in cfg.data.user_columns)
    train, train_users = read_clicks(data_dir / "train.parquet", user_cols)
    if len(train) == 0:
        raise RecallDataError(f"{data_dir / 'train.parquet'}: no clicks to learn from")
    spec = spec if spec is not None else build_spec(cfg, data_dir, train, train_users)
    catalog = catalog if catalog is not None else build_catalog(spec, data_dir, train)
    users = _Users(data_dir / "users.parquet", spec.user_sparse)
    examples = build_examples(spec, train, users, catalog, cfg.data.min_history)
    sets: dict[str, EvalSet | None] = {"valid": None, "test": None}
    past = {"valid": train}
    history = train
    for split in ("valid", "test"):
        path = data_dir / f"{split}.parquet"
        if not path.is_file():
            continue
        period, _ = read_clicks(path)
        past[split] = history
        sets[split] = build_eval_set(spec, history, period, users, catalog)
        history = history + period
    return RecallData(spec, catalog, examples, train, sets["valid"], sets["test"], past)
