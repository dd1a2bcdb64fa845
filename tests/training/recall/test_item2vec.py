"""training.recall.item2vec: click sessions, skip-gram vectors, the file init_embeddings reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrank.cli import main as cli
from training.pretrained import read_vectors
from training.recall.item2vec import Item2VecConfig, sessions, train_item2vec


def write_log(path: Path, rows: list[tuple[int, int, int, int]]) -> None:
    user, item, ts, click = (list(c) for c in zip(*rows, strict=True))
    table = pa.table({"user_id": user, "item_id": item, "ts": ts, "click": click})
    pq.write_table(table, path)


def test_sessions_are_per_user_time_ordered_and_cut_at_the_gap(tmp_path: Path) -> None:
    write_log(
        tmp_path / "train.parquet",
        [
            (1, 10, 200, 1),
            (1, 11, 100, 1),  # earlier: comes first
            (1, 12, 150, 0),  # not clicked: ignored
            (1, 13, 5000, 1),  # after the gap: a session of one, dropped
            (2, 20, 100, 1),
            (2, 21, 130, 1),
            (2, 22, 160, 1),
        ],
    )
    assert sessions(tmp_path / "train.parquet", gap=1800) == [["11", "10"], ["20", "21", "22"]]
    assert sessions(tmp_path / "train.parquet", gap=10_000) == [
        ["11", "10", "13"],
        ["20", "21", "22"],
    ]


def test_items_of_the_same_sessions_end_up_closer(tmp_path: Path) -> None:
    """Two groups of items never clicked together: within-group similarity is higher."""
    rng = np.random.default_rng(0)
    rows, t = [], 0
    for user in range(300):
        group = user % 2  # items 100-109 or 200-209
        for item in rng.choice(10, size=6, replace=False):
            t += 60
            rows.append((user, 100 * (group + 1) + int(item), t, 1))
    write_log(tmp_path / "train.parquet", rows)
    ids, vectors = train_item2vec(
        tmp_path / "train.parquet", Item2VecConfig(dim=8, epochs=20, sample=0)
    )
    centred = vectors - vectors.mean(axis=0)  # skip-gram vectors share a common direction
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    group = ids // 100
    sim = unit @ unit.T
    same = sim[group[:, None] == group[None, :]].mean()
    other = sim[group[:, None] != group[None, :]].mean()
    assert same > other + 0.3, (same, other)
    again = train_item2vec(tmp_path / "train.parquet", Item2VecConfig(dim=8, epochs=20, sample=0))
    np.testing.assert_array_equal(again[1], vectors)  # one worker and a seed: repeatable


def test_the_command_writes_what_init_embeddings_reads(tmp_path: Path) -> None:
    write_log(tmp_path / "train.parquet", [(1, 10, 1, 1), (1, 11, 2, 1), (1, 12, 3, 1)])
    out = tmp_path / "v" / "item_id.npz"
    assert cli(["item2vec", "--data", str(tmp_path), "--out", str(out), "--dim", "4"]) == 0
    ids, vectors = read_vectors(out)
    assert sorted(ids) == ["10", "11", "12"] and vectors.shape == (3, 4)
