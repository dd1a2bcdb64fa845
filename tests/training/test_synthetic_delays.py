"""training.synthetic's conversion delays: off changes nothing, the observed log is a subset of
the eventual one, and the delays follow the documented per-category exponential law."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.synthetic import (
    DAY_SECONDS,
    DELAY_MEAN_DAYS,
    N_CATEGORIES,
    TODAY_DAY,
    delay_means,
    generate_ecommerce,
    main,
    observe_conversions,
)

SPLITS = ("train", "valid", "test")
DELAY_COLUMNS = [
    "click_ts",
    "true_delay_days",
    "purchase_observed",
    "elapsed_days",
    "purchase_delay_days",
]


def rows(d: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(d / f"{s}.parquet") for s in SPLITS])


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same seed without and with delays (40k impressions, ~2.2k clicks, ~120 purchases)."""
    root = tmp_path_factory.mktemp("delays")
    generate_ecommerce(root / "off", 40_000, seed=3)
    generate_ecommerce(root / "on", 40_000, seed=3, conversion_delays=True)
    return root / "off", root / "on"


def test_delays_append_columns_and_change_nothing_else(worlds: tuple[Path, Path]) -> None:
    off, on = worlds
    a, b = rows(off), rows(on)
    assert b.column_names == a.column_names + DELAY_COLUMNS  # appended after every old column
    for name in a.column_names:
        assert a.column(name).equals(b.column(name)), name
    for name in ("users.parquet", "items.parquet", "titles.parquet"):
        assert pq.read_table(off / name).equals(pq.read_table(on / name))
    meta_off = json.loads((off / "meta.json").read_text())
    meta_on = json.loads((on / "meta.json").read_text())
    assert "conversion_delays" not in meta_off  # the default world's meta has no trace of it
    assert "purchase_observed_after_click" not in meta_off["rates"]
    assert {k: v for k, v in meta_on["rates"].items() if k in meta_off["rates"]} == meta_off[
        "rates"
    ]


def test_observed_conversions_are_a_subset_of_the_eventual_ones(worlds: tuple[Path, Path]) -> None:
    t = rows(worlds[1]).to_pydict()
    click, purchase = np.array(t["click"]), np.array(t["purchase"])
    observed = np.array(t["purchase_observed"])
    ts, elapsed = np.array(t["ts"], dtype=np.float64), np.array(t["elapsed_days"])
    delay = np.array([np.nan if v is None else v for v in t["true_delay_days"]])
    seen_delay = np.array([np.nan if v is None else v for v in t["purchase_delay_days"]])
    assert set(np.unique(observed)) <= {0, 1}
    assert np.all(observed <= purchase)  # observed ⊆ eventual
    assert 0 < observed.sum() < purchase.sum()  # some are still to come at the cut-off
    np.testing.assert_allclose(elapsed, (TODAY_DAY * DAY_SECONDS - ts) / DAY_SECONDS)
    assert np.all(elapsed >= 0)
    assert np.all(np.isnan(delay) == (purchase == 0))  # a delay exactly where there is a purchase
    assert np.all(delay[observed == 1] <= elapsed[observed == 1])  # seen: it happened by then
    assert np.all(
        delay[(purchase == 1) & (observed == 0)] > elapsed[(purchase == 1) & (observed == 0)]
    )
    assert np.all(np.isnan(seen_delay) == (observed == 0))
    np.testing.assert_array_equal(seen_delay[observed == 1], delay[observed == 1])
    assert [v is None for v in t["click_ts"]] == list(click == 0)
    np.testing.assert_array_equal(
        np.array([v for v in t["click_ts"] if v is not None]), ts[click == 1]
    )


def test_delays_are_exponential_with_the_documented_category_means(
    worlds: tuple[Path, Path],
) -> None:
    meta = json.loads((worlds[1] / "meta.json").read_text())["conversion_delays"]
    means = np.array(meta["mean_days_by_category"])
    np.testing.assert_allclose(means, delay_means(3), rtol=1e-5)
    lo, hi = DELAY_MEAN_DAYS
    np.testing.assert_allclose(np.sort(means), np.geomspace(lo, hi, N_CATEGORIES), rtol=1e-5)
    assert not np.array_equal(delay_means(3), delay_means(4))  # a seeded shuffle
    assert meta["distribution"] == "exponential"
    t = rows(worlds[1]).to_pydict()
    bought = np.array(t["purchase"]) == 1
    d = np.array([v for v in t["true_delay_days"] if v is not None])
    cat = np.array(t["category"])[bought]
    z = d / means[cat]  # Exponential(1) under the documented law, whatever the category
    assert len(z) > 80
    assert abs(z.mean() - 1.0) < 0.25
    assert abs(np.mean(z > 1.0) - np.exp(-1.0)) < 0.12  # P(D > mean) = 1/e
    assert abs(np.mean(z > 2.0) - np.exp(-2.0)) < 0.08
    # the categories really differ: the slower half's delays are longer than the faster half's
    slow = means[cat] > np.median(means)
    assert np.median(d[slow]) > 5 * np.median(d[~slow])


def test_a_later_cutoff_observes_more_and_the_options_are_checked(tmp_path: Path) -> None:
    now = generate_ecommerce(tmp_path / "now", 20_000, seed=5, conversion_delays=True)
    later = generate_ecommerce(
        tmp_path / "later", 20_000, seed=5, conversion_delays=True, observation_cutoff_days=30.0
    )
    a, b = now["conversion_delays"], later["conversion_delays"]
    assert b["cutoff_ts"] - a["cutoff_ts"] == 30 * DAY_SECONDS
    assert 0.0 < a["observed_share"] < b["observed_share"] <= 1.0
    assert (
        later["rates"]["purchase_observed_after_click"]
        > now["rates"]["purchase_observed_after_click"]
    )
    with pytest.raises(ValueError, match="observation_cutoff_days must be >= 0"):
        generate_ecommerce(tmp_path / "n", 2000, seed=5, conversion_delays=True,
                           observation_cutoff_days=-1.0)  # fmt: skip
    with pytest.raises(ValueError, match="needs conversion_delays"):
        generate_ecommerce(tmp_path / "n", 2000, seed=5, observation_cutoff_days=2.0)
    argv = ["ecommerce", "--out", str(tmp_path / "c"), "--impressions", "2000", "--seed", "5"]
    assert main([*argv, "--conversion-delays", "--observation-cutoff-days", "2"]) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["conversion_delays"]["observation_cutoff_days"] == 2.0
    assert "purchase_observed" in pq.read_table(tmp_path / "c" / "train.parquet").column_names


def test_observe_conversions_replays_the_log_at_any_cutoff() -> None:
    ts = np.array([0.0, 0.0, 86400.0, 86400.0])
    purchase = np.array([1, 1, 1, 0])
    delay = np.array([0.5, 3.0, 0.25, 9.0])  # days; the last is never read
    seen = observe_conversions(ts, purchase, delay, cutoff_ts=2 * 86400.0)
    np.testing.assert_array_equal(seen["purchase_observed"], [True, False, True, False])
    np.testing.assert_allclose(seen["elapsed_days"], [2.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(seen["purchase_delay_days"], [0.5, np.nan, 0.25, np.nan])
    later = observe_conversions(ts, purchase, delay, cutoff_ts=5 * 86400.0)
    np.testing.assert_array_equal(later["purchase_observed"], [True, True, True, False])
    with pytest.raises(ValueError, match="after the cut-off"):
        observe_conversions(ts, purchase, delay, cutoff_ts=1000.0)
