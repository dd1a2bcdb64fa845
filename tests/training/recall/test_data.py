"""Click sequences: time order, no leakage, padding and truncation, OOV, the catalog rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mtrank.spec import OOV_INDEX
from tests.training.recall.conftest import small_config
from training.recall.data import (
    NO_ITEM,
    Clicks,
    RecallData,
    history_windows,
    prepare,
    read_clicks,
)


def test_history_windows_by_hand() -> None:
    user = np.array([1, 1, 1, 1, 2, 2])
    pos, lengths = history_windows(user, max_len=2)
    assert lengths.tolist() == [0, 1, 2, 2, 0, 1]
    assert pos.tolist() == [[-1, -1], [0, -1], [0, 1], [1, 2], [-1, -1], [4, -1]]


def test_clicks_are_sorted_by_user_then_time(recall_dir: Path) -> None:
    clicks, _ = read_clicks(recall_dir / "train.parquet")
    key = clicks.user_id * 10**10 + clicks.ts
    assert np.all(np.diff(key) >= 0)
    raw = pq.read_table(recall_dir / "train.parquet", columns=["click"]).column("click")
    assert len(clicks) == int(np.sum(raw.to_numpy()))


def test_training_histories_hold_only_earlier_clicks(recall_data: RecallData) -> None:
    clicks, ex, spec = recall_data.train_clicks, recall_data.train, recall_data.spec
    pos, lengths = history_windows(clicks.user_id, spec.history.max_len)
    assert len(ex) == len(clicks)  # min_history 0: one example per click
    for g in range(len(clicks)):
        kept = pos[g, : lengths[g]]
        assert np.all(kept < g)  # strictly earlier in (user, time) order: never the target
        assert np.all(clicks.user_id[kept] == clicks.user_id[g])
        assert np.all(clicks.ts[kept] <= clicks.ts[g])
        assert np.all(np.diff(clicks.ts[kept]) >= 0)  # oldest first
    # the encoded history is those clicks' items, then padding
    g = int(np.argmax(lengths))
    want = spec.item_vocab.encode_many(clicks.item_id[pos[g, : lengths[g]]].tolist())
    assert ex.history[g, : lengths[g]].tolist() == want.tolist()
    assert np.all(ex.history[g, lengths[g] :] == 0)
    # the target is the clicked item's catalog row
    assert recall_data.catalog.item_ids[ex.target].tolist() == clicks.item_id.tolist()


def test_long_histories_keep_the_most_recent_clicks(recall_dir: Path) -> None:
    data = prepare(small_config(recall_dir, "dssm", **{"data.history_max_len": 2}))
    clicks, ex = data.train_clicks, data.train
    counts = np.bincount(np.unique(clicks.user_id, return_inverse=True)[1])
    assert counts.max() > 3  # some user has more clicks than the window
    last = np.flatnonzero(np.r_[clicks.user_id[1:] != clicks.user_id[:-1], True])
    g = last[np.argmax(counts)]  # the heaviest user's last click
    recent = clicks.item_id[g - 2 : g]
    assert ex.history_len[g] == 2
    assert ex.history[g].tolist() == data.spec.item_vocab.encode_many(recent.tolist()).tolist()


def test_eval_histories_end_before_the_split_and_targets_are_in_it(
    recall_dir: Path, recall_data: RecallData
) -> None:
    test_clicks, _ = read_clicks(recall_dir / "test.parquet")
    past = recall_data.past["test"]
    assert past.ts.max() <= test_clicks.ts.min()
    ev = recall_data.test
    assert ev is not None
    cat = recall_data.catalog
    for u in range(0, len(ev), 37):
        uid = ev.user_id[u]
        mine = past.item_id[past.user_id == uid]
        assert set(cat.item_ids[ev.seen[u]]) == set(mine)
        assert set(cat.item_ids[ev.targets[u]]) == set(
            test_clicks.item_id[test_clicks.user_id == uid]
        )
        n = min(len(mine), recall_data.spec.history.max_len)
        assert ev.history_len[u] == n
        want = recall_data.spec.item_vocab.encode_many(mine[len(mine) - n :].tolist())
        assert ev.history[u, :n].tolist() == want.tolist()


def test_vocabularies_come_from_train_clicks_with_oov(recall_data: RecallData) -> None:
    spec, clicks = recall_data.spec, recall_data.train_clicks
    assert set(spec.item_vocab.vocab) == {str(i) for i in np.unique(clicks.item_id)}
    assert spec.item_vocab.encode(999) == OOV_INDEX
    assert spec.title is not None and spec.title.tokens.encode("never-a-word") == OOV_INDEX
    ids, lengths = spec.title.encode(["NEW Never-A-Word set", None])
    assert lengths.tolist() == [3, 0]
    assert ids[0, 1] == OOV_INDEX and ids[0, 0] == spec.title.tokens.encode("new")


def test_catalog_rows_follow_the_vocabulary_then_cold_items(
    recall_dir: Path, recall_data: RecallData
) -> None:
    cat, vocab = recall_data.catalog, recall_data.spec.item_vocab
    V = vocab.vocab_size
    assert cat.item_ids[0] == NO_ITEM and cat.sparse[0].tolist() == [0] * cat.sparse.shape[1]
    assert [str(i) for i in cat.item_ids[1:V]] == vocab.vocab  # row i = vocabulary index i
    assert cat.sparse[:V, 0].tolist() == list(range(V))
    cold = cat.item_ids[V:]
    assert np.all(cat.sparse[V:, 0] == OOV_INDEX) and np.all(np.diff(cold) > 0)
    assert cat.clicks[V:].sum() == 0 and cat.clicks[1:V].min() >= 1
    items = pq.read_table(recall_dir / "items.parquet", columns=["item_id"])
    assert sorted(cat.item_ids[1:].tolist()) == sorted(items.column("item_id").to_pylist())


def test_clicks_concatenate_in_time_order() -> None:
    a = Clicks(np.array([1, 2]), np.array([10, 20]), np.array([5, 5]), np.array([0, 1], np.int8))
    b = Clicks(np.array([1]), np.array([30]), np.array([5]), np.array([0], np.int8))
    both = a + b
    assert both.user_id.tolist() == [1, 1, 2]
    assert both.item_id.tolist() == [10, 30, 20]  # equal times: the later period comes after


def test_missing_column_is_named(tmp_path: Path, recall_dir: Path) -> None:
    t = pq.read_table(recall_dir / "valid.parquet").drop(["purchase"])
    pq.write_table(t, tmp_path / "valid.parquet")
    with pytest.raises(ValueError, match="purchase"):
        read_clicks(tmp_path / "valid.parquet")
