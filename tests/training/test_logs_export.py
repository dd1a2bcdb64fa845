"""mtrank logs export on hand-made served rows and events: the join, the windows, the cut-off,
the rows kept, the files written, and the ``format: served`` dataset that reads them.

The served rows are written by the service's own writer (service/served_log.py), so the segments
are the real format; the events go through the archive's own writer, or into a real Redis stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from mtrank.events import ENTRY_FIELD, stream_key
from mtrank.registry import METADATA_FILE
from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput
from service.metrics import Metrics
from service.served_log import ServedLog, ServedRequest, spec_meta
from tests.support import REDIS_URL, redis_namespace
from training.attribution import DAY_S, Windows, attribute
from training.config import ConfigError, DatasetSpec, load_dataset_spec
from training.data import prepare
from training.events_archive import entries_to_table, write_parts
from training.logs import EventSources, ExportError, export, main, parse_duration, parse_time
from training.served_data import META_KEY

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SINCE, UNTIL, AS_OF = T0, T0 + DAY_S, T0 + 10 * DAY_S
A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
TASKS = [{"name": "ctr", "label": "click"},
         {"name": "cvr", "label": "purchase", "depends_on": "ctr"}]  # fmt: skip


def make_spec(items: int = 10) -> FeatureSpec:
    return FeatureSpec(
        sparse=[SparseField(name="user_id", source="user", vocab=["u1", "u2", "u3"]),
                SparseField(name="item_id", source="item", vocab=[f"i{k}" for k in range(items)])],
        dense=[DenseField(name="price", source="item", mean=3.0, std=2.0, default=3.0)],
        outputs=[TaskOutput(name="ctr", kind="binary"), TaskOutput(name="cvr", kind="binary")],
    )  # fmt: skip


def publish(root: Path, spec: FeatureSpec, version: str) -> None:
    """A registry version folder as far as the export reads it: spec.json and metadata.json."""
    folder = root / "m" / version
    folder.mkdir(parents=True)
    spec.save(folder)
    config = {"dataset": {"tasks": TASKS, "funnel_policy": "error"}}
    (folder / METADATA_FILE).write_text(json.dumps({"training_config": config}))


def request(rid: str, ts: float, user: str, items: list[str], served: list[int],
            spec: FeatureSpec, version: str = "v1", seed: int = 0) -> ServedRequest:  # fmt: skip
    rng = np.random.default_rng(seed)
    n = len(items)
    sparse = np.stack([np.full(n, spec.sparse[0].encode(user)),
                       spec.sparse[1].encode_many(items)], axis=1)  # fmt: skip
    return ServedRequest(
        rid, ts, user, items, "default", "", f"m@{version}", "snap-1", True, sparse,
        rng.normal(size=(n, 1)).astype(np.float32), rng.random(n),
        {"ctr": rng.random(n).astype(np.float32), "cvr": rng.random(n).astype(np.float32)},
        np.asarray(served), spec_meta(spec, ["ctr", "cvr"]),
    )  # fmt: skip


def write_served(directory: Path, requests: list[ServedRequest]) -> None:
    """Segments of ``requests`` by the service's writer, under names no earlier call used (one
    process's writers all name their first segment HOST-PID-000001)."""
    staging = directory.parent / f".staging-{len(list(directory.parent.iterdir()))}"
    log = ServedLog(staging, 1.0, Metrics(), flush_s=3600)
    for r in requests:
        log.record(r)
    log.close()
    for path in staging.glob("*/*.npz"):
        (directory / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(directory / path.parent.name / f"{staging.name}-{path.name}")


def ev(i: int, kind: str, rid: str, item: str, ts: float, received: float | None = None,
       **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"event_id": f"ev-{i}", "type": kind, "request_id": rid, "user_id": "u1",
            "item_id": item, "ts": ts, "received": ts + 1 if received is None else received,
            "orphan": False, **extra}  # fmt: skip


CLICK_A = T0 + 110
EVENTS = [
    # A/i2: shown, clicked, carted, two stays, bought after 3 days (its retry counted once),
    # bought again after 8 days (outside the 7-day window)
    ev(0, "impression", A, "i2", T0 + 101),
    ev(1, "click", A, "i2", CLICK_A),
    ev(2, "cart", A, "i2", T0 + 200),
    ev(3, "stay", A, "i2", T0 + 150, seconds=12.0),
    ev(4, "stay", A, "i2", T0 + 160, seconds=3.0),
    ev(5, "purchase", A, "i2", CLICK_A + 3 * DAY_S, amount=5.0),
    ev(
        5, "purchase", A, "i2", CLICK_A + 3 * DAY_S, received=CLICK_A + 3 * DAY_S + 7200, amount=5.0
    ),  # fmt: skip
    ev(6, "purchase", A, "i2", CLICK_A + 8 * DAY_S, amount=7.0),
    ev(7, "impression", A, "i0", T0 + 101),  # A/i0: shown only
    ev(8, "click", A, "i1", T0 + 100 + 7200),  # A/i1: a click after the 1 h window...
    ev(9, "purchase", A, "i1", T0 + 100 + 7300, amount=9.0),  # ...so no purchase either
    ev(10, "click", A, "i3", T0 + 120),  # A/i3 was not returned (position -1)
    ev(11, "click", B, "i5", T0 + 3600 - 30),  # B/i5: 30 s before the serve: clock skew
    ev(12, "collect", B, "i5", T0 + 3700),
    ev(13, "click", B, "i6", T0 + 3600 - 120),  # B/i6: 2 min before: not this serve's
    ev(14, "click", B, "i7", T0 + 3700, received=AS_OF + DAY_S),  # known after the cut-off
    ev(15, "click", "e" * 32, "i2", T0 + 200),  # another request
    ev(16, "click", A, "i9", T0 + 200),  # an item A did not serve
    ev(17, "click", C, "i0", T0 + 2 * DAY_S + 10),  # C is served after the range
]
# rows of the export (--rows returned), in time then candidate order, and their labels
EXPECTED = {  # (request, item): (impression, click, cart, collect, purchase, amount, stay)
    (A, "i0"): (1, 0, 0, 0, 0, 0.0, 0.0),
    (A, "i1"): (0, 0, 0, 0, 0, 0.0, 0.0),
    (A, "i2"): (1, 1, 1, 0, 1, 5.0, 15.0),
    (B, "i5"): (1, 1, 0, 1, 0, 0.0, 0.0),
    (B, "i6"): (0, 0, 0, 0, 0, 0.0, 0.0),
    (B, "i7"): (0, 0, 0, 0, 0, 0.0, 0.0),
}


def stream_entries(events: list[dict[str, Any]]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The events as stream entries, ids from their arrival (what the service's XADD makes)."""
    ordered = sorted(events, key=lambda e: e["received"])
    return [(f"{int(e['received'] * 1000)}-{k}".encode(), {ENTRY_FIELD: json.dumps(e).encode()})
            for k, e in enumerate(ordered)]  # fmt: skip


@dataclass
class Logs:
    served: Path
    archive: Path
    registry: Path
    spec: FeatureSpec
    requests: list[ServedRequest]


@pytest.fixture
def logs(tmp_path: Path) -> Logs:
    spec = make_spec()
    publish(tmp_path / "models", spec, "v1")
    reqs = [
        request(A, T0 + 100, "u1", ["i0", "i1", "i2", "i3", "i4"], [2, 0, 1], spec, seed=1),
        request(B, T0 + 3600, "u2", ["i5", "i6", "i7"], [0, 1, 2], spec, seed=2),
        request(C, T0 + 2 * DAY_S, "u3", ["i0"], [0], spec, seed=3),
        request(D, T0 - 10, "u1", ["i0"], [0], spec, seed=4),
    ]
    write_served(tmp_path / "served", reqs)
    write_parts(entries_to_table(stream_entries(EVENTS)), tmp_path / "archive", "c1")
    return Logs(tmp_path / "served", tmp_path / "archive", tmp_path / "models", spec, reqs)


def run_export(logs: Logs, out: Path, **kw: Any) -> pq.ParquetFile:
    sources = kw.pop("sources", EventSources(archive=logs.archive))
    registry = kw.pop("registry", logs.registry)
    export(logs.served, SINCE, UNTIL, out, sources, as_of=AS_OF, registry=registry, **kw)
    return pq.ParquetFile(out / "train.parquet")


def labels_of(table: Any) -> dict[tuple[str, str], tuple[Any, ...]]:
    cols = ("impression", "click", "cart", "collect", "purchase", "amount", "stay_seconds")
    d = table.to_pydict()
    keys = zip(d["request_id"], d["item_id"], strict=True)
    return {key: tuple(d[c][k] for c in cols) for k, key in enumerate(keys)}


def test_the_export_joins_events_to_rows_under_the_windows(logs: Logs, tmp_path: Path) -> None:
    table = run_export(logs, tmp_path / "out").read()
    assert list(zip(table["request_id"].to_pylist(), table["item_id"].to_pylist(),
                    strict=True)) == list(EXPECTED)  # fmt: skip
    assert labels_of(table) == EXPECTED
    d = table.to_pydict()
    k = d["item_id"].index("i2")
    assert d["elapsed_days"][k] == pytest.approx(7.0)  # the whole window was watched
    assert d["purchase_delay_days"][k] == pytest.approx(3.0)
    assert d["purchase_delay_days"][d["item_id"].index("i0")] is None
    assert d["elapsed_days"][d["item_id"].index("i0")] == pytest.approx(1 / 24)
    assert d["position"] == [1, 2, 0, 0, 1, 2]
    assert set(d["models"]) == {"m@v1"} and set(d["scene"]) == {"default"}


def test_the_exported_inputs_and_outputs_are_the_logged_arrays(logs: Logs, tmp_path: Path) -> None:
    table = run_export(logs, tmp_path / "out").read().to_pydict()
    a, b = logs.requests[0], logs.requests[1]
    rows = [(a, j) for j in (0, 1, 2)] + [(b, j) for j in (0, 1, 2)]
    np.testing.assert_array_equal(table["sparse.user_id"], [r.sparse[j, 0] for r, j in rows])
    np.testing.assert_array_equal(table["sparse.item_id"], [r.sparse[j, 1] for r, j in rows])
    np.testing.assert_array_equal(np.float32(table["dense.price"]),
                                  [r.dense[j, 0] for r, j in rows])  # fmt: skip
    np.testing.assert_array_equal(table["score"], [r.score[j] for r, j in rows])
    np.testing.assert_array_equal(np.float32(table["out.cvr"]),
                                  [r.outputs["cvr"][j] for r, j in rows])  # fmt: skip


def test_rows_kept_returned_all_or_impressed(logs: Logs, tmp_path: Path) -> None:
    everything = run_export(logs, tmp_path / "all", rows_kept="all").read().to_pydict()
    assert len(everything["item_id"]) == 8  # A's five candidates, B's three
    k = everything["item_id"].index("i3")
    assert (everything["position"][k], everything["click"][k]) == (-1, 1)
    shown = run_export(logs, tmp_path / "imp", rows_kept="impressed").read().to_pydict()
    assert shown["item_id"] == ["i0", "i2", "i3", "i5"]  # a click implies an impression


def test_the_stream_gives_the_labels_the_archive_gives(logs: Logs, tmp_path: Path) -> None:
    with redis_namespace() as (conn, ns):
        for sid, fields in stream_entries(EVENTS):
            conn.xadd(stream_key(ns), fields, id=sid)
        stream = EventSources(redis_url=REDIS_URL, namespace=ns)
        only_stream = run_export(logs, tmp_path / "s", sources=stream).read()
        both = EventSources(archive=logs.archive, redis_url=REDIS_URL, namespace=ns)
        together = run_export(logs, tmp_path / "both", sources=both).read()
    assert labels_of(only_stream) == labels_of(together) == EXPECTED


def test_the_export_writes_a_dataset_that_training_reads_unencoded(
    logs: Logs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    exported = run_export(logs, out, valid_share=0.5)
    meta = json.loads(exported.schema_arrow.metadata[META_KEY])
    assert meta["spec_sha256"] == json.loads(logs.requests[0].meta)["spec_sha256"]
    assert meta["sparse"] == ["user_id", "item_id"] and meta["export"]["as_of"] == AS_OF
    ds = load_dataset_spec(out / "dataset.yaml")
    assert (ds.format, ds.feature_spec) == ("served", str((out / "spec.json").resolve()))
    assert [t.model_dump(exclude_defaults=True) for t in ds.tasks] == TASKS  # the model's
    data = prepare(ds, tmp_path / "cache")
    assert data.spec.model_copy(update={"outputs": []}) == logs.spec.model_copy(
        update={"outputs": []}
    )
    assert data.spec.task_names == ["ctr", "cvr"]
    assert data.valid is not None and (len(data.train), len(data.valid)) == (3, 3)
    train = pq.read_table(out / "train.parquet").to_pydict()
    np.testing.assert_array_equal(data.train.sparse[:, 1], train["sparse.item_id"])
    np.testing.assert_array_equal(data.train.dense[:, 0], np.float32(train["dense.price"]))
    np.testing.assert_array_equal(data.train.labels["cvr"], train["purchase"])
    assert pq.read_table(out / "valid.parquet")["request_id"].to_pylist() == [B] * 3  # the latest
    report = json.loads((out / "export.json").read_text())
    assert report["rows_written"] == 6 and report["positives"]["click"] == 2
    assert "redis" not in json.dumps(report["export"])  # no URL (it may hold a password)


def test_a_served_dataset_must_match_its_spec(logs: Logs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_export(logs, out)
    base = load_dataset_spec(out / "dataset.yaml").model_dump()

    def prepared(**change: Any) -> None:
        prepare(DatasetSpec.model_validate({**base, **change}), tmp_path / "cache")

    other = tmp_path / "other"
    other.mkdir()
    make_spec(items=12).save(other)  # a longer vocabulary: other inputs
    with pytest.raises(ConfigError, match="encoded with inputs"):
        prepared(feature_spec=str(other / "spec.json"))
    with pytest.raises(ConfigError, match="are not the inputs"):
        prepared(sparse=base["sparse"][::-1])
    with pytest.raises(ConfigError, match="min_count has no effect"):
        prepared(sparse=[{**base["sparse"][0], "min_count": 2}, base["sparse"][1]])
    with pytest.raises(ValidationError, match="feature_spec"):
        DatasetSpec.model_validate({**base, "feature_spec": None})
    with pytest.raises(ValidationError, match="feature_spec"):
        DatasetSpec.model_validate({**base, "format": "parquet"})
    table = pq.read_table(out / "train.parquet")
    column = table.schema.get_field_index("sparse.item_id")
    bad = table.set_column(column, "sparse.item_id", pa.array(table[column].to_numpy() + 20))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        prepared(train=str(tmp_path / "bad.parquet"))
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "bare.parquet")
    with pytest.raises(ConfigError, match="not written by mtrank logs export"):
        prepared(train=str(tmp_path / "bare.parquet"))


def test_rows_of_two_input_specs_are_exported_one_spec_at_a_time(
    logs: Logs, tmp_path: Path
) -> None:
    newer = make_spec(items=12)
    publish(logs.registry, newer, "v2")
    write_served(logs.served, [request("f" * 32, T0 + 7200, "u1", ["i10", "i11"], [0, 1],
                                       newer, version="v2")])  # fmt: skip
    with pytest.raises(ExportError, match="several input specs"):
        run_export(logs, tmp_path / "out")
    sha = json.loads(spec_meta(newer, ["ctr", "cvr"]))["spec_sha256"]
    table = run_export(logs, tmp_path / "v2", spec_sha256=sha[:12]).read()
    assert table["item_id"].to_pylist() == ["i10", "i11"]
    assert FeatureSpec.load(tmp_path / "v2") == newer


def test_no_events_give_negative_labels_and_a_missing_archive_is_an_error(
    logs: Logs, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    table = run_export(logs, tmp_path / "out", sources=EventSources(archive=tmp_path / "empty"))
    assert labels_of(table.read()) == dict.fromkeys(EXPECTED, (0, 0, 0, 0, 0, 0.0, 0.0))
    with pytest.raises(ExportError, match="no such events archive"):
        run_export(logs, tmp_path / "out", sources=EventSources(archive=tmp_path / "typo"))


def test_the_spec_must_be_the_rows_spec(logs: Logs, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no spec.json"):
        run_export(logs, tmp_path / "out", registry=tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    make_spec(items=3).save(other)
    with pytest.raises(ExportError, match="are not the rows'"):
        run_export(logs, tmp_path / "out", spec=other / "spec.json")


def test_the_command(logs: Logs, tmp_path: Path) -> None:
    argv = ["export", "--served", str(logs.served), "--since", "2026-01-01",
            "--until", "2026-01-02T00:00:00Z", "--out", str(tmp_path / "out"),
            "--events-archive", str(logs.archive), "--registry", str(logs.registry),
            "--as-of", str(AS_OF), "--click-window", "1h", "--conversion-window", "7d"]  # fmt: skip
    assert main(argv) == 0
    assert labels_of(pq.read_table(tmp_path / "out" / "train.parquet")) == EXPECTED
    assert main([*argv, "--conversion-window", "2d"]) == 0  # the 3-day purchase falls out
    assert pq.read_table(tmp_path / "out" / "train.parquet")["purchase"].to_pylist() == [0] * 6
    assert main([a if a != "2026-01-01" else "yesterday" for a in argv]) == 1
    no_source = [a for a in argv if a not in ("--events-archive", str(logs.archive))]
    assert main(no_source) == 1


def test_times_and_durations_parse() -> None:
    assert parse_time("2026-01-01") == T0 == parse_time("2026-01-01T01:00:00+01:00")
    assert parse_time(str(T0)) == T0
    assert [parse_duration(d) for d in ("90s", "30m", "1h", "7d", "15")] == [
        90,
        1800,
        3600,
        7 * DAY_S,
        15,
    ]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("1w")


# ------------------------------------------------------------------ attribution, table-driven
@pytest.mark.parametrize(
    ("events", "as_of", "expected"),
    [
        # (kind, seconds after the serve, amount/seconds) -> labels of the one row
        ([("click", 10, None), ("purchase", 10 + DAY_S, 4.0)], 2 * DAY_S,
         {"click": 1, "purchase": 1, "amount": 4.0, "elapsed_days": 2 - 10 / DAY_S,
          "purchase_delay_days": 1.0}),
        # watched for 2 days only: the purchase is not yet known, elapsed says so
        ([("click", 10, None)], 2 * DAY_S,
         {"click": 1, "purchase": 0, "elapsed_days": 2 - 10 / DAY_S}),
        # a purchase without a click, or before the click (beyond the skew), does not count
        ([("purchase", 10, 1.0)], DAY_S, {"click": 0, "purchase": 0, "amount": 0.0}),
        ([("purchase", 10, 1.0), ("click", 200, None)], DAY_S, {"click": 1, "purchase": 0}),
        # the first click in the window anchors the conversion window
        ([("click", 3000, None), ("click", 20, None), ("cart", 20 + 7 * DAY_S - 1, None)],
         30 * DAY_S, {"click": 1, "cart": 1, "elapsed_days": 7.0}),
        ([("stay", 30, 5.0), ("click", 20, None), ("stay", 40, 6.0)], DAY_S,
         {"stay_seconds": 11.0, "impression": 1}),
        ([("impression", -30, None)], DAY_S, {"impression": 1, "click": 0}),
        ([("impression", -90, None)], DAY_S, {"impression": 0}),
    ],
)  # fmt: skip
def test_attribution(
    events: list[tuple[str, float, float | None]], as_of: float, expected: dict[str, float]
) -> None:
    kind = np.array([k for k, _, _ in events])
    ts = np.array([t for _, t, _ in events], dtype=np.float64)
    value = np.array([np.nan if v is None else v for _, _, v in events])
    amount = np.where(kind == "purchase", value, np.nan)
    seconds = np.where(kind == "stay", value, np.nan)
    rows = np.zeros(len(events), dtype=np.int64)
    got = attribute(np.array([0.0]), rows, kind, ts, amount, seconds, Windows(), as_of)
    for name, value in expected.items():
        assert got[name][0] == pytest.approx(value, rel=1e-6), name


def test_attribution_of_many_rows_matches_row_by_row() -> None:
    """Vectorised over rows: each row's labels are those it gets alone."""
    rng = np.random.default_rng(0)
    kinds = np.array(["impression", "click", "cart", "collect", "purchase", "stay"])
    n_rows, n_events = 50, 400
    served = rng.uniform(0, DAY_S, n_rows)
    rows = rng.integers(0, n_rows, n_events)
    kind = kinds[rng.integers(0, 6, n_events)]
    ts = served[rows] + rng.uniform(-120, 9 * DAY_S, n_events) * rng.random(n_events) ** 4
    amount = np.where(kind == "purchase", rng.uniform(1, 9, n_events), np.nan)
    seconds = np.where(kind == "stay", rng.uniform(1, 60, n_events), np.nan)
    all_rows = attribute(served, rows, kind, ts, amount, seconds, Windows(), 5 * DAY_S)
    assert all_rows["click"].sum() > 5 and all_rows["purchase"].sum() > 0
    for r in range(n_rows):
        m = rows == r
        alone = attribute(served[r : r + 1], np.zeros(m.sum(), dtype=np.int64), kind[m], ts[m],
                          amount[m], seconds[m], Windows(), 5 * DAY_S)  # fmt: skip
        for name, v in alone.items():
            np.testing.assert_allclose(all_rows[name][r], v[0], err_msg=name)
