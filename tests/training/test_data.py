"""training.data: vocabularies, normalisation, streaming, the cache, funnel checks, batching."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mtrank.spec import FeatureSpec, Source, build_vocab
from training.config import DatasetSpec
from training.data import Batch, DataError, Encoded, PreparedData, fingerprint, prepare

# --------------------------------------------------------------------------- small CSV data
TRAIN_CSV = """user,item,price,click,buy
a,x,10,1,0
a,y,20,0,0
a,x,,1,1
b,y,40,0,0
c,z,5,1,0
c,x,1000,0,0
"""
VALID_CSV = """user,item,price,click,buy
a,x,10,1,1
z,q,7,0,0
,x,3,0,0
"""


def small_dataset(tmp_path: Path, **overrides: object) -> DatasetSpec:
    (tmp_path / "train.csv").write_text(TRAIN_CSV)
    (tmp_path / "valid.csv").write_text(VALID_CSV)
    fields: dict[str, object] = {
        "name": "small",
        "format": "csv",
        "train": str(tmp_path / "train.csv"),
        "valid": str(tmp_path / "valid.csv"),
        "sparse": [
            {"name": "user", "source": "user", "min_count": 2},
            {"name": "item", "source": "item"},
        ],
        "dense": [{"name": "price", "source": "item", "log1p": True}],
        "tasks": [
            {"name": "ctr", "label": "click"},
            {"name": "cvr", "label": "buy", "depends_on": "ctr"},
        ],
        "user_column": "user",
        "funnel_policy": "error",
    }
    fields.update(overrides)
    return DatasetSpec.model_validate(fields)


def test_vocab_min_count_and_oov(tmp_path: Path) -> None:
    p = prepare(small_dataset(tmp_path), tmp_path / "cache")
    user, item = p.spec.sparse
    # a x3, c x2 kept; b once < min_count 2 -> OOV. Same order as spec.build_vocab.
    assert user.vocab == ["a", "c"] == build_vocab(["a", "a", "a", "b", "c", "c"], min_count=2)
    assert item.vocab == ["x", "y", "z"]
    assert p.train.sparse[:, 0].tolist() == [1, 1, 1, 0, 2, 2]
    assert p.train.sparse[:, 1].tolist() == [1, 2, 1, 2, 3, 1]
    assert p.valid is not None
    # valid: known a -> 1; unseen z -> 0; missing user -> 0; unseen item q -> 0
    assert p.valid.sparse.tolist() == [[1, 1], [0, 0], [0, 1]]
    for raw, got in zip(["a", "z", None], p.valid.sparse[:, 0], strict=True):
        assert user.encode(raw) == got


def test_dense_statistics_and_missing_default(tmp_path: Path) -> None:
    p = prepare(small_dataset(tmp_path), tmp_path / "cache")
    (price,) = p.spec.dense
    seen = np.log1p([10.0, 20.0, 40.0, 5.0, 1000.0])  # the empty cell is not a statistic
    assert price.mean == pytest.approx(seen.mean())
    assert price.std == pytest.approx(seen.std())
    assert price.log1p
    # the default is the raw value that normalises to 0: the missing row encodes as 0
    assert p.train.dense[2, 0] == pytest.approx(0.0, abs=1e-6)
    raw = np.array([10, 20, np.nan, 40, 5, 1000], dtype=np.float64)
    np.testing.assert_array_equal(p.train.dense[:, 0], price.normalise(raw))


def test_labels_groups_and_report(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, funnel_policy="drop")
    p = prepare(ds, tmp_path / "cache")
    assert p.train.labels["ctr"].tolist() == [1, 0, 1, 0, 1, 0]
    assert p.train.labels["cvr"].tolist() == [0, 0, 1, 0, 0, 0]
    assert p.train.labels["ctr"].dtype == np.float32
    assert p.train.groups is not None and p.valid is not None and p.valid.groups is not None
    # one index per user, the same across splits (a is user 0 in both); missing user -> -1
    assert p.train.groups.tolist() == [0, 0, 0, 1, 2, 2]
    assert p.valid.groups.tolist() == [0, 3, -1]
    assert p.label_report.violations("train") == 0
    assert p.label_report.splits["train"].label_means["ctr"] == pytest.approx(0.5)


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, dense=[{"name": "weight_kg", "source": "item"}])
    with pytest.raises(DataError, match=r"weight_kg.*") as err:
        prepare(ds, tmp_path / "cache")
    assert "train.csv" in str(err.value)


def test_missing_column_in_parquet(ecommerce_dataset: DatasetSpec, tmp_path: Path) -> None:
    ds = ecommerce_dataset.model_copy(update={"truth_columns": ["true_ltv"]})
    with pytest.raises(DataError, match="true_ltv") as err:
        prepare(ds, tmp_path / "cache")
    assert "train.parquet" in str(err.value)


def test_non_numeric_label_is_a_data_error(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path, tasks=[{"name": "ctr", "label": "item"}])
    with pytest.raises(DataError, match="item"):
        prepare(ds, tmp_path / "cache")


# --------------------------------------------------------------------------- cache
def test_cache_is_reused_without_reading_text(tmp_path: Path) -> None:
    ds = small_dataset(tmp_path)
    first = prepare(ds, tmp_path / "cache")
    # Overwrite the source with garbage of the same size and mtime: a re-parse would fail.
    src = tmp_path / "train.csv"
    st = src.stat()
    src.write_bytes(b"#" * st.st_size)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = prepare(ds, tmp_path / "cache")
    assert second.fingerprint == first.fingerprint
    assert second.spec == first.spec
    np.testing.assert_array_equal(second.train.sparse, first.train.sparse)
    np.testing.assert_array_equal(second.train.dense, first.train.dense)
    assert second.label_report == first.label_report
    # a changed mtime is a changed input: new fingerprint, re-read, which now fails
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(ds) != first.fingerprint
    with pytest.raises(DataError):
        prepare(ds, tmp_path / "cache")


def test_fingerprint_covers_the_spec(tmp_path: Path) -> None:
    a = small_dataset(tmp_path)
    same_files = a.model_copy(update={"train": str(tmp_path / ".." / tmp_path.name / "train.csv")})
    assert fingerprint(a) == fingerprint(same_files)
    assert fingerprint(a) != fingerprint(a.model_copy(update={"funnel_policy": "drop"}))
    assert fingerprint(a) != fingerprint(a.model_copy(update={"valid": None}))


# --------------------------------------------------------------------------- ecommerce data
@pytest.fixture(scope="module")
def ecommerce_prepared(
    ecommerce_dataset: DatasetSpec, tmp_path_factory: pytest.TempPathFactory
) -> PreparedData:
    return prepare(ecommerce_dataset, tmp_path_factory.mktemp("cache"))


def test_normalisation_equals_spec(ecommerce_prepared: PreparedData, ecommerce_dir: Path) -> None:
    p = ecommerce_prepared
    raw = pq.read_table(ecommerce_dir / "train.parquet")
    for j, f in enumerate(p.spec.dense):
        x = raw.column(f.name).to_numpy().astype(np.float64)
        t = np.log1p(x) if f.log1p else x
        assert f.mean == pytest.approx(t.mean(), rel=1e-9)
        assert f.std == pytest.approx(t.std(), rel=1e-9)
        np.testing.assert_array_equal(p.train.dense[:, j], f.normalise(x))
    for j, sf in enumerate(p.spec.sparse[:4]):
        values = raw.column(sf.name).to_pylist()
        want = [sf.encode(v) for v in values]
        assert p.train.sparse[:, j].tolist() == want


def test_serving_rebuilds_the_same_inputs(
    ecommerce_prepared: PreparedData, ecommerce_dir: Path
) -> None:
    """Encoding a user/item row of the attribute tables with the spec (what serving does)
    gives exactly the columns of the training arrays for an impression of that user/item."""
    p, spec = ecommerce_prepared, ecommerce_prepared.spec
    imps = pq.read_table(ecommerce_dir / "test.parquet").slice(0, 50).to_pylist()
    users = {r["user_id"]: r for r in pq.read_table(ecommerce_dir / "users.parquet").to_pylist()}
    items = {r["item_id"]: r for r in pq.read_table(ecommerce_dir / "items.parquet").to_pylist()}
    assert p.test is not None
    for row, imp in enumerate(imps):
        raw_by_source: dict[Source, dict[str, object]] = {
            "user": users[imp["user_id"]],
            "item": items[imp["item_id"]],
            "context": imp,  # the request carries hour and device
        }
        for source, raw in raw_by_source.items():
            sparse, dense = spec.encode_entity(source, raw)
            np.testing.assert_array_equal(p.test.sparse[row][spec.sparse_positions(source)], sparse)
            np.testing.assert_array_equal(p.test.dense[row][spec.dense_positions(source)], dense)


def test_spec_shape_and_truth(ecommerce_prepared: PreparedData, ecommerce_dir: Path) -> None:
    p = ecommerce_prepared
    assert [f.name for f in p.spec.sparse][:2] == ["user_id", "age_bucket"]
    assert p.spec.task_names == ["ctr", "cvr", "cart", "collect", "stay"]
    assert [o.kind for o in p.spec.outputs][-1] == "regression"
    assert FeatureSpec.load(p.path) == p.spec
    raw = pq.read_table(ecommerce_dir / "valid.parquet")
    assert p.valid is not None
    np.testing.assert_allclose(p.valid.truth["true_cvr"], raw.column("true_cvr").to_numpy(), 1e-6)
    np.testing.assert_array_equal(
        p.valid.labels["stay"], raw.column("stay_seconds").to_numpy().astype(np.float32)
    )
    assert p.label_report.violations("train") == 0  # policy "error" passed: the funnel holds
    # new items (first seen in the test period) are out of vocabulary
    assert p.test is not None and (p.test.sparse[:, 4] == 0).any()


def test_streaming_batch_size_does_not_change_result(
    ecommerce_dataset: DatasetSpec, ecommerce_prepared: PreparedData, tmp_path: Path
) -> None:
    small = prepare(ecommerce_dataset, tmp_path / "c", batch_rows=777)
    assert small.spec == ecommerce_prepared.spec
    for name in ("train", "valid", "test"):
        a, b = getattr(small, name), getattr(ecommerce_prepared, name)
        np.testing.assert_array_equal(a.sparse, b.sparse)
        np.testing.assert_array_equal(a.dense, b.dense)
        np.testing.assert_array_equal(a.groups, b.groups)


def test_batches_shuffle_and_shards(ecommerce_prepared: PreparedData) -> None:
    enc = ecommerce_prepared.valid
    assert isinstance(enc, Encoded)
    plain = list(enc.batches(300))
    assert all(isinstance(b, Batch) for b in plain)
    np.testing.assert_array_equal(np.concatenate([b.sparse for b in plain]), enc.sparse)
    first = [b.dense for b in enc.batches(300, shuffle=True, seed=1)]
    again = [b.dense for b in enc.batches(300, shuffle=True, seed=1)]
    other = [b.dense for b in enc.batches(300, shuffle=True, seed=2)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    # shuffled batches keep rows aligned: the user index column follows its labels
    rows = np.concatenate([b.truth["true_ctr"] for b in enc.batches(300, shuffle=True, seed=1)])
    assert sorted(rows.tolist()) == sorted(np.asarray(enc.truth["true_ctr"]).tolist())


@pytest.mark.parametrize("n", [999, 1000, 1001])
def test_rank_shards_are_disjoint_and_equal(n: int) -> None:
    rows = np.arange(n, dtype=np.int64)
    enc = Encoded(
        sparse=rows[:, None],  # (n, 1): the row number identifies each row
        dense=np.zeros((n, 0), np.float32),
        labels={"ctr": (rows % 2).astype(np.float32)},
        groups=None,
        truth={},
    )
    world = 3
    for shuffle in (False, True):
        shards = [
            list(enc.batches(64, shuffle=shuffle, seed=5, rank=r, world_size=world))
            for r in range(world)
        ]
        assert len({len(s) for s in shards}) == 1  # equal batch counts: DDP ranks stay in step
        seen = [np.concatenate([b.sparse[:, 0] for b in s]) for s in shards]
        assert len({len(x) for x in seen}) == 1
        union = np.concatenate(seen)
        assert len(np.unique(union)) == len(union) == n - n % world  # disjoint, nearly all rows
        for s in shards:  # labels stay aligned with their rows
            for b in s:
                np.testing.assert_array_equal(b.labels["ctr"], b.sparse[:, 0] % 2)


# --------------------------------------------------------------------------- ali-ccp funnel
def aitm_dataset(shared_data: Path, tmp_path: Path, policy: str) -> DatasetSpec:
    """paddlerec AITM samples; test.csv has no header, so the test copies train's onto it."""
    src = shared_data / "ali-ccp"
    header = (src / "paddlerec_aitm_train.csv").read_text().splitlines()[0]
    test = tmp_path / "aitm_test.csv"
    test.write_text(header + "\n" + (src / "paddlerec_aitm_test.csv").read_text())
    fields = header.split(",")[2:]
    return DatasetSpec.model_validate(
        {
            "name": "aitm",
            "format": "csv",
            "train": str(src / "paddlerec_aitm_train.csv"),
            "test": str(test),
            "sparse": [{"name": f, "source": "user" if f < "200" else "item"} for f in fields],
            "tasks": [
                {"name": "ctr", "label": "click"},
                {"name": "cvr", "label": "purchase", "depends_on": "ctr"},
            ],
            "funnel_policy": policy,
        }
    )


def independent_violations(path: Path) -> tuple[list[int], int, int]:
    """Row numbers with purchase=1 and click=0, row count, and clicks, by the csv module."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [i for i, r in enumerate(rows) if r["purchase"] == "1" and r["click"] == "0"]
    return bad, len(rows), sum(r["click"] == "1" for r in rows)


def test_funnel_policy_error(shared_data: Path, tmp_path: Path) -> None:
    bad, _, _ = independent_violations(shared_data / "ali-ccp" / "paddlerec_aitm_train.csv")
    with pytest.raises(DataError, match=rf"{len(bad)} rows with cvr=1 while ctr=0") as err:
        prepare(aitm_dataset(shared_data, tmp_path, "error"), tmp_path / "cache")
    assert str(bad[:5]) in str(err.value)
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # nothing half-written


def test_funnel_policy_drop(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = aitm_dataset(shared_data, tmp_path, "drop")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        p = prepare(ds, tmp_path / "cache")
    for split, path in (("train", Path(ds.train)), ("test", Path(str(ds.test)))):
        bad, n, _ = independent_violations(path)
        assert bad, "the shared sample is known to break the funnel"
        (v,) = p.label_report.splits[split].violations
        assert (v.child, v.parent, v.count, v.examples) == ("cvr", "ctr", len(bad), bad[:5])
        enc = getattr(p, split)
        assert len(enc) == n - len(bad) == p.label_report.splits[split].rows_kept
        assert not ((enc.labels["cvr"] > 0) & (enc.labels["ctr"] == 0)).any()
        assert f"{len(bad)} rows with cvr > 0 while ctr = 0" in caplog.text
    assert (len(bad), p.label_report.violations("train")) == (3, 2)  # SOURCE.txt: 3 test, 2 train


def test_funnel_policy_fix_parent(shared_data: Path, tmp_path: Path) -> None:
    p = prepare(aitm_dataset(shared_data, tmp_path, "fix_parent"), tmp_path / "cache")
    bad, n, clicks = independent_violations(shared_data / "ali-ccp" / "paddlerec_aitm_train.csv")
    assert len(p.train) == n
    assert p.label_report.violations("train") == len(bad)
    ctr = np.asarray(p.train.labels["ctr"])
    assert ctr[bad].tolist() == [1.0] * len(bad)
    assert ctr.sum() == clicks + len(bad)
    assert not ((p.train.labels["cvr"] > 0) & (ctr == 0)).any()


def test_csv_block_size_does_not_change_result(shared_data: Path, tmp_path: Path) -> None:
    ds = aitm_dataset(shared_data, tmp_path, "drop")
    big = prepare(ds, tmp_path / "big")
    small = prepare(ds, tmp_path / "small", csv_block_bytes=300)  # ~4 rows per block
    assert small.spec == big.spec
    np.testing.assert_array_equal(small.train.sparse, big.train.sparse)
    assert small.label_report == big.label_report


# --------------------------------------------------------------------------- train-split statistics
def test_id_counts_count_every_index_across_chunks() -> None:
    sparse = np.array([[0, 2], [1, 2], [1, 0], [3, 2], [1, 1]], dtype=np.int64)  # (5, 2)
    enc = Encoded(
        sparse=sparse, dense=np.zeros((5, 0), np.float32), labels={}, groups=None, truth={}
    )
    user, item = enc.id_counts([5, 3], chunk_rows=2)  # chunks of 2 rows: 3 chunks
    np.testing.assert_array_equal(user, [1, 3, 0, 1, 0])  # index 4 never seen: 0
    np.testing.assert_array_equal(item, [1, 1, 3])
    assert user.dtype == np.int64 and item.dtype == np.int64


def test_label_base_rates_in_each_tasks_own_space() -> None:
    from training.config import TaskColumn
    from training.data import label_base_rates

    click = np.array([1, 0, 1, 0, 0, 1, 0, 0], np.float32)
    buy = np.array([1, 0, 0, 0, 0, 1, 0, 0], np.float32)
    seconds = np.array([9, 0, 3, 0, 0, 20, 0, 0], np.float32)
    enc = Encoded(
        sparse=np.zeros((8, 1), np.int64),
        dense=np.zeros((8, 0), np.float32),
        labels={"ctr": click, "cvr": buy, "stay": seconds, "raw": seconds},
        groups=None,
        truth={},
    )
    tasks = [
        TaskColumn(name="ctr", label="click"),
        TaskColumn(name="cvr", label="buy", depends_on="ctr"),
        TaskColumn(name="stay", label="s", kind="regression", transform="log1p"),
        TaskColumn(name="raw", label="s", kind="regression"),
    ]
    rates = label_base_rates(enc, tasks, chunk_rows=3)
    assert rates["ctr"] == pytest.approx(3 / 8, abs=1e-12)
    assert rates["cvr"] == pytest.approx(2 / 3, abs=1e-12)  # over the 3 clicked rows, not 2 / 8
    assert rates["stay"] == pytest.approx(np.log1p([9, 3, 20]).sum() / 8, abs=1e-9)  # after log1p
    assert rates["raw"] == pytest.approx(32 / 8, abs=1e-9)
