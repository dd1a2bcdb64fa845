"""The generator-truth ceiling replays training/synthetic.py: its click logit exactly, its exposure
model in distribution (a wrong share, or items shown before they are listed, must lose)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from training import synthetic as S
from training.recall.baselines import PopularityRetriever
from training.recall.data import prepare
from training.recall.evaluate import evaluate_retriever
from training.recall.truth import (
    DEVICE_LOGIT,
    DEVICE_P,
    HOUR_AMPLITUDE,
    HOUR_PEAK,
    GeneratorTruth,
    ItemExposure,
    TruthUnavailable,
    category_taste,
    click_rate,
    period_weights,
)

from .conftest import small_config

P = 0.6


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("truth_world")
    S.generate_ecommerce(out, 100_000, seed=4, personalization=P)
    return out


def _rows(folder: Path, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    t = pq.read_table(folder / f"{split}.parquet", columns=columns)
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _truth(folder: Path, split: str) -> GeneratorTruth:
    ids = pq.read_table(folder / "items.parquet", columns=["item_id"]).column(0).to_numpy()
    return GeneratorTruth.from_folder(folder, ids, split)  # catalog row = generator item


def test_period_weights_cover_whole_days() -> None:
    meta = {"n_impressions": 1_000_000, "today_day": 100, "history_days": 30,
            "splits": {"train": 800_000, "valid": 100_000, "test": 100_000}}  # fmt: skip
    days, day_w, hour_w = period_weights(meta, "test")
    np.testing.assert_array_equal(days, [97, 98, 99])
    np.testing.assert_allclose(day_w, 1 / 3)
    np.testing.assert_allclose(hour_w, 1 / 24)
    small = {"n_impressions": 1000, "splits": {"train": 800, "valid": 100, "test": 100}}
    days, day_w, _ = period_weights(meta | small, "valid")
    np.testing.assert_array_equal(days, [94, 95, 96])
    np.testing.assert_allclose(day_w, 1 / 3)
    days, day_w, hour_w = period_weights(meta | {"splits": {"train": 1, "valid": 0,
                                                            "test": 999_999}}, "train")  # fmt: skip
    assert days.tolist() == [70] and hour_w[0] == pytest.approx(1.0)  # 2.6 s into hour 0


def test_click_rate_averages_device_and_hour() -> None:
    hour_w = np.random.default_rng(0).dirichlet(np.ones(24))
    logit = np.array([-9.0, -4.2, -1.0, 0.5, 3.0])
    hour = HOUR_AMPLITUDE * np.cos(2 * np.pi * (np.arange(24) - HOUR_PEAK) / 24)
    off = DEVICE_LOGIT[:, None] + hour[None, :]  # (3, 24)
    w = DEVICE_P[:, None] * hour_w[None, :]
    exact = (w * S._sigmoid(logit[:, None, None] + off)).sum(axis=(1, 2))
    np.testing.assert_allclose(click_rate(logit, hour_w), exact, rtol=1e-5)
    z = np.linspace(-9, 9, 3001)  # E over N(0, 1) by a fine Riemann sum
    pz = np.exp(-(z**2) / 2) / np.exp(-(z**2) / 2).sum()
    hidden = [(w[..., None] * pz * S._sigmoid(x + off[..., None] + 0.8 * z)).sum() for x in logit]
    np.testing.assert_allclose(click_rate(logit, hour_w, 0.8), hidden, rtol=1e-5)


def test_click_logit_matches_the_generator(world: Path) -> None:
    """logit(true_ctr) of every test impression = the truth's user-item logit + device + hour."""
    truth = _truth(world, "test")
    r = _rows(world, "test", ["user_id", "item_id", "device", "hour", "true_ctr"])
    u, i = r["user_id"] - 1, r["item_id"] - 1_000_001
    affinity = np.einsum("nk,nk->n", truth.pref[u], truth.vec[i]) / np.sqrt(truth.vec.shape[1])
    mine = truth.item_logit[i] + 0.9 * affinity + 0.25 * np.log(truth.activity[u])
    device = np.searchsorted(["android", "ios", "web"], r["device"])
    mine += np.array([0.0, 0.15, -0.3])[device]
    mine += HOUR_AMPLITUDE * np.cos(2 * np.pi * (r["hour"] - HOUR_PEAK) / 24)
    np.testing.assert_allclose(S._sigmoid(mine), r["true_ctr"], rtol=1e-9)


def test_exposure_replays_the_generator(world: Path) -> None:
    """Over the train split (where many items are listed late) the shown items follow the
    exposure model: item counts fit it (chi-square per degree of freedom near 1), and the
    impressions' likelihood peaks at the data's share P."""
    truth = _truth(world, "train")
    r = _rows(world, "train", ["user_id", "item_id"])
    u, i = r["user_id"] - 1, r["item_id"] - 1_000_001
    users, n_u = np.unique(u, return_counts=True)
    obs = np.bincount(i, minlength=len(truth.vec)).astype(np.float64)

    def chi2_per_dof(exposure: ItemExposure, share: float) -> float:
        expected = n_u @ exposure.probability(truth.taste[users], share)  # (N,)
        keep = expected >= 5
        return float(((obs[keep] - expected[keep]) ** 2 / expected[keep]).sum() / keep.sum())

    ex = truth.exposure
    meta = json.loads((world / "meta.json").read_text())
    rng = np.random.default_rng([4, 0])
    S._users(rng, meta["n_users"])
    items = S._items(rng, meta["n_items"])
    ones = np.ones(len(ex.category))
    always_listed = ItemExposure.build(ex.category, items["_popularity"], ones, ex.old_share > 0,
                                       S.N_CATEGORIES)  # fmt: skip
    fit = chi2_per_dof(ex, P)
    assert fit < 1.3
    assert chi2_per_dof(always_listed, P) > fit + 1.0  # shown before listed: rejected
    assert chi2_per_dof(ex, 0.0) > fit + 1.0  # exposure by popularity alone: rejected

    def log_likelihood(share: float) -> float:
        p = np.concatenate([ex.probability(truth.taste[u[s]], share)[np.arange(len(u[s])),
                                                                      i[s]]
                            for s in np.array_split(np.arange(len(u)), 20)])  # fmt: skip
        return float(np.log(p).sum())

    ll = {s: log_likelihood(s) for s in (P - 0.1, P, P + 0.1)}
    assert ll[P] > ll[P - 0.1] and ll[P] > ll[P + 0.1], ll


def test_category_taste_hands_empty_categories_on() -> None:
    rng = np.random.default_rng(0)
    category = np.array([0, 0, 1, 3, 3, 4] * 5 + [S.N_CATEGORIES - 1])  # 2 and 5.. mostly empty
    users = {"_pref": rng.normal(size=(3, S.LATENT_DIM))}
    items = {"category": category, "_popularity": rng.lognormal(size=len(category)),
             "_category_vec": rng.normal(size=(S.N_CATEGORIES, S.LATENT_DIM))}  # fmt: skip
    taste = S.Taste(users, items)
    p = category_taste(taste)
    raw = np.diff(taste.category_cdf, axis=1, prepend=0.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert set(np.flatnonzero(p[0] > 0)) <= {0, 1, 3, 4, S.N_CATEGORIES - 1}
    np.testing.assert_allclose(p[:, 3], raw[:, 2] + raw[:, 3])
    np.testing.assert_allclose(p[:, 0], raw[:, 0])  # the last category has items: no wrap
    draws = taste.sample(rng, np.zeros(200_000, dtype=np.int64))
    freq = np.bincount(category[draws], minlength=S.N_CATEGORIES) / len(draws)
    np.testing.assert_allclose(freq, p[0], atol=4e-3)


def test_truth_ranks_above_popularity_and_refuses_another_world(world: Path) -> None:
    data = prepare(small_config(world))
    assert data.test is not None
    truth = GeneratorTruth.from_folder(world, data.catalog.item_ids)
    best = evaluate_retriever(truth, data.test, [100])["metrics"]["hr@100"]
    pop = evaluate_retriever(PopularityRetriever(data.past["test"], data.catalog), data.test,
                             [100])["metrics"]["hr@100"]  # fmt: skip
    assert best > pop
    meta = json.loads((world / "meta.json").read_text())
    other = world.parent / "other_world"
    other.mkdir(exist_ok=True)
    for f in ("items.parquet",):
        (other / f).write_bytes((world / f).read_bytes())
    (other / "meta.json").write_text(json.dumps(meta | {"seed": 5}))
    with pytest.raises(TruthUnavailable, match="differs"):
        GeneratorTruth.from_folder(other, data.catalog.item_ids)
