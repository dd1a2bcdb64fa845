"""Feature snapshots built from the attribute tables, and loaded into the real Redis."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from harness.trained import TrainedWorld
from mtrank.registry import Registry
from mtrank.snapshot import Snapshot, item_key, pointer_key, user_key
from tests.support import REDIS_URL
from training import features as features_cli
from training.features import FeatureBuildError, build_snapshot, read_table


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"test-features-{os.getpid()}-{os.urandom(3).hex()}"
    yield ns
    conn = redis.Redis.from_url(REDIS_URL)
    keys = list(conn.scan_iter(match=f"mtrank:{ns}:*", count=1000))
    if keys:
        conn.delete(*keys)
    conn.close()


def test_snapshot_records_equal_the_spec_encoding_of_each_row(trained_world: TrainedWorld) -> None:
    spec, snap = trained_world.spec, trained_world.snapshot
    users = pq.read_table(trained_world.data_dir / "users.parquet").to_pylist()
    items = pq.read_table(trained_world.data_dir / "items.parquet").to_pylist()
    assert len(snap.user_ids) == len(users) and len(snap.item_ids) == len(items)
    for row in users[:: max(1, len(users) // 50)]:
        rec = snap.users[list(snap.user_ids).index(str(row["user_id"]))]
        sparse, dense = spec.encode_entity("user", row)
        assert rec["sparse"].tolist() == sparse.tolist()
        np.testing.assert_array_equal(rec["dense"], dense)
    cats = snap.attribute_tables["category"]
    for row in items[:: max(1, len(items) // 50)]:
        rec = snap.items[list(snap.item_ids).index(str(row["item_id"]))]
        sparse, dense = spec.encode_entity("item", row)
        assert rec["sparse"].tolist() == sparse.tolist()
        np.testing.assert_array_equal(rec["dense"], dense)
        assert cats[rec["category"]] == str(row["category"])
        assert rec["price"] == pytest.approx(row["price"], rel=1e-6)
        assert rec["quality"] == pytest.approx(row["quality"], rel=1e-6)
        assert int(rec["promoted"]) == int(row["promoted"])
        assert int(rec["first_seen_day"]) == int(row["first_seen_day"])
        want_cap = -1 if row.get("exposure_cap") is None else int(row["exposure_cap"])
        assert int(rec["exposure_cap"]) == want_cap


def test_snapshot_file_round_trip_and_spec_check(trained_world: TrainedWorld) -> None:
    loaded = Snapshot.load(trained_world.snapshot_path, trained_world.spec)
    assert loaded.users.tobytes() == trained_world.snapshot.users.tobytes()
    assert loaded.items.tobytes() == trained_world.snapshot.items.tobytes()
    other = trained_world.spec.model_copy(update={"outputs": []})
    with pytest.raises(ValueError, match="rebuild it with `mtrank features build`"):
        Snapshot.load(trained_world.snapshot_path, other)
    reg = Registry(trained_world.root)
    assert reg.latest_snapshot("ecommerce", trained_world.spec.sha256()) == (
        trained_world.snapshot_path
    )


def test_missing_key_column_is_named(trained_world: TrainedWorld) -> None:
    users = read_table(trained_world.data_dir / "users.parquet")
    items = read_table(trained_world.data_dir / "items.parquet").drop_columns(["item_id"])
    with pytest.raises(FeatureBuildError, match="items table has no key column 'item_id'"):
        build_snapshot(trained_world.spec, users, items)


def test_cli_build_then_load_into_redis(
    trained_world: TrainedWorld, tmp_path: Path, namespace: str
) -> None:
    out = tmp_path / "snap.npz"
    common = ["--root", str(trained_world.root)]
    assert features_cli.main([*common, "build", "--model", "ecommerce",
                              "--users", str(trained_world.data_dir / "users.parquet"),
                              "--items", str(trained_world.data_dir / "items.parquet"),
                              "--out", str(out)]) == 0  # fmt: skip
    snap = Snapshot.load(out, trained_world.spec)
    assert features_cli.main([*common, "load", "--model", "ecommerce", "--snapshot", str(out),
                              "--redis", REDIS_URL, "--namespace", namespace]) == 0  # fmt: skip
    conn = redis.Redis.from_url(REDIS_URL)
    try:
        assert conn.get(pointer_key(namespace)) == snap.version.encode()
        for i in (0, len(snap.item_ids) // 2, len(snap.item_ids) - 1):
            raw = conn.get(item_key(namespace, snap.version, str(snap.item_ids[i])))
            assert raw == snap.items[i].tobytes()
        u = len(snap.user_ids) // 3
        assert conn.get(user_key(namespace, snap.version, str(snap.user_ids[u]))) == (
            snap.users[u].tobytes()
        )
        # loading the same snapshot again is harmless: same pointer, same values
        assert features_cli.main([*common, "load", "--model", "ecommerce", "--snapshot", str(out),
                                  "--redis", REDIS_URL, "--namespace", namespace]) == 0  # fmt: skip
        assert conn.get(pointer_key(namespace)) == snap.version.encode()
    finally:
        conn.close()


def test_cli_load_without_snapshot_says_what_to_do(
    trained_world: TrainedWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a registry copy whose snapshots folder is empty
    import shutil

    root = tmp_path / "models"
    shutil.copytree(trained_world.root, root)
    shutil.rmtree(root / "ecommerce" / "snapshots")
    rc = features_cli.main(["--root", str(root), "load", "--model", "ecommerce",
                            "--redis", REDIS_URL])  # fmt: skip
    assert rc == 1
    assert "run `mtrank features build` first" in capsys.readouterr().err
