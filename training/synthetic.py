"""Synthetic and derived data sets: ``mtrank synth {ecommerce,mmoe,census}``.

* ``ecommerce``: an impression -> click -> cart/collect -> purchase funnel with known true
  probabilities. Clicks favour clickbait (low quality) and promoted items, while purchases favour
  quality and, for price-sensitive users, low prices, so the click filter changes the
  distribution of the conversion drivers: genuine sample-selection bias, the setting of ESMM
  (Ma et al., SIGIR 2018). ``cf_purchase`` is a purchase label drawn for every impression from
  ``true_cvr`` (the counterfactual "had it been clicked"), so CVR can be evaluated on the entire
  impression space; ``purchase = click * cf_purchase``. Never train on the truth columns.
  ``selection_bias`` (default 1.0, the original world) scales how strongly the unobserved item
  trait clickbait raises clicks and lowers purchases: 0 removes that channel of the bias, 2
  doubles it, so a benchmark can show each CVR estimator as the bias grows. That trait is an
  item's: a model that sees ``item_id`` can learn it, so given the features the selection is on
  observables. ``hidden_confounding`` (default 0) adds the selection no feature can see: a
  per-impression draw (how the item was framed that time) that raises the click logit and lowers
  the purchase logit by ``hidden_confounding`` times a standard normal. Under it P(buy | click, x)
  differs from P(buy | x) for every x, and no estimator whose propensity is a function of x
  (IPS, DR, ESCM²) can recover the latter from clicked rows.
  ``titles.parquet`` (item_id, title) gives each item a title whose words carry its category,
  brand and quality (training/titles.py), for the recall stage's text towers.
  ``conversion_delays`` (default off) gives every purchase a delay after its click and writes the
  log as it stood at an observation cut-off (``observation_cutoff_days`` after the last
  impression): ``purchase_observed`` is the purchase that had happened by then, ``purchase`` stays
  the eventual label. Delays are exponential with a mean per item category, the 50 means spaced
  log-evenly from 1 hour to 14 days (:data:`DELAY_MEAN_DAYS`) and assigned to categories by a
  seeded shuffle. Delayed-feedback models (training/models/delayed.py) learn from the observed
  columns (``elapsed_days`` and ``purchase_delay_days`` as ``mtrank logs export`` names them);
  benchmarks judge them on the eventual one.
* ``mmoe``: the two-task regression of Ma et al., KDD 2018 (MMoE), section 3.2, whose task
  relatedness is set by the cosine similarity ``rho`` of the two weight vectors.
* ``census``: the UCI Census-Income (KDD) file split into train/valid/test with the labels of
  the MMoE paper's two task groups derived (income > 50K, never married, college degree).

Everything is deterministic by seed and generated in vectorised chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.attributes import ITEM_ATTRIBUTES
from training.titles import TITLES_FILE, write_titles

TODAY_DAY = 20089  # 2025-01-01 as days since 1970-01-01: the fixed "now" of the ecommerce world
HISTORY_DAYS = 30  # impressions span [TODAY_DAY - HISTORY_DAYS, TODAY_DAY)
LATENT_DIM = 8
N_CATEGORIES = 50
BRANDS_PER_CATEGORY = 6  # 300 brands
CHUNK_ROWS = 200_000
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DEVICES = np.array(["ios", "android", "web"])
GENDERS = np.array(["F", "M", "U"])
# clickbait's effect on the click and purchase logits at selection_bias 1, and the trait value
# the strength pivots around: about the items' mean clickbait, so an average item keeps its
# logits at any strength. Base rates still move (a wider logit spread raises a low mean rate);
# meta.json records them.
BAIT_CLICK, BAIT_PURCHASE, BAIT_PIVOT = 2.6, -3.0, 0.45
# Conversion delays (``conversion_delays``): exponential, with a mean per category spaced
# log-evenly over this range (days), so some categories convert within the hour and others over
# weeks. Exponential because that is the delay model of DFM (Chapelle, KDD 2014): the benchmark
# then measures what censoring costs each estimator, not how wrong DFM's shape assumption is.
DELAY_MEAN_DAYS = (1.0 / 24.0, 14.0)
DAY_SECONDS = 86400


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


class _SplitWriter:
    """Writes contiguous row ranges of a stream into train/valid/test files."""

    def __init__(self, out_dir: Path, n_rows: int, fmt: str, fractions: tuple[float, ...]) -> None:
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"format must be parquet or csv, got {fmt!r}")
        n_train, n_valid = int(fractions[0] * n_rows), int(fractions[1] * n_rows)
        self.bounds = {
            "train": (0, n_train),
            "valid": (n_train, n_train + n_valid),
            "test": (n_train + n_valid, n_rows),
        }
        self.out_dir, self.fmt = out_dir, fmt
        self.writers: dict[str, Any] = {}

    def file(self, split: str) -> str:
        return f"{split}.{self.fmt}"

    def write(self, table: pa.Table, start: int) -> None:
        """``table`` holds global rows [start, start + len)."""
        end = start + table.num_rows
        for split, (lo, hi) in self.bounds.items():
            a, b = max(lo, start), min(hi, end)
            if a < b:
                self._writer(split, table.schema).write_table(table.slice(a - start, b - a))

    def _writer(self, split: str, schema: pa.Schema) -> Any:
        if split not in self.writers:
            path = self.out_dir / self.file(split)
            self.writers[split] = (
                pq.ParquetWriter(path, schema)
                if self.fmt == "parquet"
                else pacsv.CSVWriter(path, schema)
            )
        return self.writers[split]

    def close(self) -> dict[str, int]:
        for w in self.writers.values():
            w.close()
        return {s: hi - lo for s, (lo, hi) in self.bounds.items()}


# ------------------------------------------------------------------ ecommerce world
def _users(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    activity = rng.lognormal(0.0, 0.8, n)
    age = rng.choice(7, n, p=[0.08, 0.22, 0.25, 0.18, 0.12, 0.09, 0.06])
    tier = rng.choice(4, n, p=[0.15, 0.3, 0.3, 0.25]) + 1
    # latent traits, partly visible through tier / age / purchase history
    sensitivity = _sigmoid(0.8 * (tier - 2.5) - 0.3 * (age - 3) + rng.normal(0, 0.7, n))
    propensity = rng.normal(0, 0.6, n) + 0.2 * np.log(activity)
    return {
        "user_id": np.arange(1, n + 1, dtype=np.int64),
        "age_bucket": age.astype(np.int64),
        "city_tier": tier.astype(np.int64),
        "gender": rng.choice(GENDERS, n, p=[0.48, 0.46, 0.06]),
        "user_activity": np.round(activity, 3),
        "past_purchases": rng.poisson(2.0 * np.exp(propensity)).astype(np.int64),
        "_pref": rng.normal(size=(n, LATENT_DIM)),
        "_sensitivity": sensitivity,
        "_propensity": propensity,
    }


def _items(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    cat_p = 1.0 / np.arange(1, N_CATEGORIES + 1) ** 0.8
    category = rng.choice(N_CATEGORIES, n, p=cat_p / cat_p.sum())
    cat_vec = rng.normal(size=(N_CATEGORIES, LATENT_DIM))
    cat_price = rng.normal(3.5, 0.8, N_CATEGORIES)  # log-price level of each category
    quality = rng.beta(2.5, 2.0, n)
    clickbait = _sigmoid(-5.0 * (quality - 0.5) + rng.normal(0, 0.8, n))
    promoted = rng.random(n) < 0.04 + 0.2 * (1.0 - quality)  # weaker items buy promotion
    age_kind = rng.choice(3, n, p=[0.85, 0.10, 0.05])  # old / last month / last week
    age_days = np.select(
        [age_kind == 0, age_kind == 1],
        [rng.integers(HISTORY_DAYS + 1, 1000, n), rng.integers(8, HISTORY_DAYS + 1, n)],
        rng.integers(1, 8, n),
    )
    has_cap = rng.random(n) < 0.1
    return {
        "item_id": np.arange(1_000_001, 1_000_001 + n, dtype=np.int64),
        "category": category.astype(np.int64),
        "brand": (category * BRANDS_PER_CATEGORY + rng.integers(0, BRANDS_PER_CATEGORY, n)),
        "price": np.round(rng.lognormal(cat_price[category], 0.5), 2),
        "promoted": promoted.astype(np.int64),
        "quality": np.round(quality, 4),
        "first_seen_day": (TODAY_DAY - age_days).astype(np.int64),
        "exposure_cap": np.where(has_cap, rng.integers(20, 200, n), 0),
        "_has_cap": has_cap,
        "_vec": 0.8 * cat_vec[category] + 0.6 * rng.normal(size=(n, LATENT_DIM)),
        "_clickbait": clickbait,
        "_category_vec": cat_vec,  # (C, K): what a user's taste for a category is measured against
        "_popularity": rng.lognormal(0.0, 1.0, n) * (1.0 + 1.5 * promoted),
    }


USER_COLUMNS = ["user_id", "age_bucket", "city_tier", "gender", "user_activity", "past_purchases"]
# Item columns come from the attribute table: impression rows copy the logged ones, items.parquet
# holds them all (an attribute the generator does not model is written as its default).
ITEM_COLUMNS = ["item_id", *ITEM_ATTRIBUTES.names_where(logged=True)]
ITEM_RULE_COLUMNS = list(ITEM_ATTRIBUTES.names_where(logged=False))


def _entity_table(cols: dict[str, np.ndarray], names: list[str]) -> pa.Table:
    n = len(cols[names[0]])
    default = {a.name: np.full(n, a.default) for a in ITEM_ATTRIBUTES}
    arrays = {k: pa.array(cols[k] if k in cols else default[k]) for k in names}
    if "exposure_cap" in arrays:  # most items have no cap: null, not 0
        arrays["exposure_cap"] = pa.array(cols["exposure_cap"], mask=~cols["_has_cap"])
    return pa.table(arrays)


class Taste:
    """Which items a user is shown when a recommender, not popularity, picks them.

    A user's taste for category c is softmax_c(4 * pref . category_vec[c] / sqrt(K)), the
    preference the click logit's affinity term also reads; within the category an item is drawn
    by popularity. Used for the ``personalization`` share of impressions.
    """

    def __init__(self, users: dict[str, np.ndarray], items: dict[str, np.ndarray]) -> None:
        logits = 4.0 * users["_pref"] @ items["_category_vec"].T / np.sqrt(LATENT_DIM)  # (U, C)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        self.category_cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)  # (U, C)
        self.order = np.argsort(items["category"], kind="stable")  # items grouped by category
        cats = items["category"][self.order]
        self.start = np.searchsorted(cats, np.arange(N_CATEGORIES))  # (C,) first of each
        self.end = np.searchsorted(cats, np.arange(N_CATEGORIES), side="right")
        self.cum = np.cumsum(items["_popularity"][self.order])  # popularity, grouped

    def sample(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        """(n,) item indices for users (n,): a category from the taste, an item within it."""
        cdf = self.category_cdf[users]  # (n, C)
        cat = np.minimum((cdf < rng.random(len(users))[:, None]).sum(axis=1), N_CATEGORIES - 1)
        empty = self.start[cat] == self.end[cat]  # a category without items: its neighbour's
        while empty.any():
            cat[empty] = (cat[empty] + 1) % N_CATEGORIES
            empty = self.start[cat] == self.end[cat]
        lo = np.where(self.start[cat] > 0, self.cum[self.start[cat] - 1], 0.0)
        hi = self.cum[self.end[cat] - 1]
        pos = np.searchsorted(self.cum, lo + rng.random(len(users)) * (hi - lo), side="right")
        picked: np.ndarray = self.order[np.clip(pos, self.start[cat], self.end[cat] - 1)]
        return picked


def _impressions(
    rng: np.random.Generator,
    users: dict[str, np.ndarray],
    items: dict[str, np.ndarray],
    rows: np.ndarray,
    n_total: int,
    selection_bias: float = 1.0,
    hidden: np.ndarray | None = None,
    targeting: tuple[Taste, float, np.random.Generator] | None = None,
) -> dict[str, np.ndarray]:
    """The funnel for global impression numbers ``rows`` (time increases with the number).

    ``hidden`` (n,): the unlogged per-impression confounder's effect on the logits (+ click,
    - purchase); None: none. ``targeting`` (taste, share, its own random stream): that share of
    the impressions is drawn from the user's taste instead of global popularity.
    """
    n = len(rows)
    span = HISTORY_DAYS * 86400
    ts = (TODAY_DAY - HISTORY_DAYS) * 86400 + ((rows + rng.random(n)) / n_total * span)
    ts = ts.astype(np.int64)
    day, hour = ts // 86400, (ts % 86400) // 3600
    u = np.searchsorted(users["_cdf"], rng.random(n))  # active users see more
    i = np.searchsorted(items["_cdf"], rng.random(n))
    unborn = items["first_seen_day"][i] > day  # an item cannot be shown before it exists
    i[unborn] = items["_old"][np.searchsorted(items["_old_cdf"], rng.random(int(unborn.sum())))]
    if targeting is not None:  # after the draws above, so the rest of the world is unchanged
        taste, share, t_rng = targeting
        pick = np.flatnonzero(t_rng.random(n) < share)
        i[pick] = taste.sample(t_rng, u[pick])
        late = pick[items["first_seen_day"][i[pick]] > day[pick]]  # not yet listed: an old one
        i[late] = items["_old"][np.searchsorted(items["_old_cdf"], t_rng.random(len(late)))]
    device = rng.choice(3, n, p=[0.35, 0.5, 0.15])

    affinity = np.einsum("nk,nk->n", users["_pref"][u], items["_vec"][i]) / np.sqrt(LATENT_DIM)
    quality, bait = items["quality"][i], items["_clickbait"][i]
    promoted = items["promoted"][i]
    bait_effect = bait + (selection_bias - 1.0) * (bait - BAIT_PIVOT)  # (n,) bait itself at 1
    z_price = (np.log(items["price"][i]) - 3.5) / 0.9
    ctr_logit = (
        -4.6
        + 0.9 * affinity
        + BAIT_CLICK * bait_effect
        + 0.7 * promoted
        - 1.0 * quality
        + 0.25 * np.log(users["user_activity"][u])
        + np.array([0.15, 0.0, -0.3])[device]
        + 0.2 * np.cos(2 * np.pi * (hour - 20) / 24)
    )
    cvr_logit = (
        -2.0
        + 3.5 * (quality - 0.5)
        - 1.6 * users["_sensitivity"][u] * z_price
        + BAIT_PURCHASE * bait_effect
        + 0.9 * users["_propensity"][u]
        + 0.3 * affinity
        + 0.3 * promoted
    )
    if hidden is not None:
        ctr_logit, cvr_logit = ctr_logit + hidden, cvr_logit - hidden
    true_ctr, true_cvr = _sigmoid(ctr_logit), _sigmoid(cvr_logit)
    click = rng.random(n) < true_ctr
    cf_purchase = rng.random(n) < true_cvr
    cart = click & np.where(
        cf_purchase, rng.random(n) < 0.75, rng.random(n) < 0.3 * true_cvr + 0.04
    )
    collect = click & (rng.random(n) < _sigmoid(-2.6 + 0.8 * affinity + (quality - 0.5)))
    stay_mu = 3.0 + 0.7 * (quality - 0.5) + 0.25 * affinity - 0.6 * bait + 0.4 * cf_purchase
    stay = np.where(click, np.round(np.exp(stay_mu + rng.normal(0, 0.5, n)), 1), 0.0)
    cols = {"ts": ts, "day": day}
    cols |= {k: users[k][u] for k in USER_COLUMNS}
    cols |= {k: items[k][i] for k in ITEM_COLUMNS}
    cols |= {"hour": hour, "device": DEVICES[device]}
    cols |= {
        "click": click.astype(np.int8),
        "cart": cart.astype(np.int8),
        "collect": collect.astype(np.int8),
        "purchase": (click & cf_purchase).astype(np.int8),
        "stay_seconds": stay,
        "true_ctr": true_ctr,
        "true_cvr": true_cvr,
        "cf_purchase": cf_purchase.astype(np.int8),
    }
    return cols


def delay_means(seed: int) -> np.ndarray:
    """(N_CATEGORIES,) mean conversion delay in days of each category, from its own stream."""
    lo, hi = DELAY_MEAN_DAYS
    grid = np.geomspace(lo, hi, N_CATEGORIES)  # hours to weeks, evenly on a log scale
    out: np.ndarray = np.random.default_rng([seed, 4]).permutation(grid)
    return out


def observe_conversions(
    ts: np.ndarray, purchase: np.ndarray, delay_days: np.ndarray, cutoff_ts: float
) -> dict[str, np.ndarray]:
    """The conversion log as it stands at ``cutoff_ts`` (seconds), for events at ``ts`` (n,).

    ``purchase`` (n,) is the eventual label and ``delay_days`` (n,) its delay (read where
    ``purchase`` is 1). Returns ``purchase_observed`` (the purchase had happened by the cut-off),
    ``elapsed_days`` (cut-off minus event time, every row) and ``purchase_delay_days`` (the delay
    where observed, NaN elsewhere): what a log exported at the cut-off can know. A pure function,
    so a benchmark can replay the log at any cut-off from the same draws.
    """
    ts = np.asarray(ts, dtype=np.float64)
    if len(ts) and float(ts.max()) > cutoff_ts:
        raise ValueError("observe_conversions: an event lies after the cut-off")
    elapsed = (cutoff_ts - ts) / DAY_SECONDS  # (n,) days
    seen = (np.asarray(purchase) > 0) & (np.asarray(delay_days) <= elapsed)  # (n,)
    return {
        "purchase_observed": seen,
        "elapsed_days": elapsed,
        "purchase_delay_days": np.where(seen, delay_days, np.nan),
    }


def _delay_columns(
    rng: np.random.Generator, cols: dict[str, np.ndarray], means: np.ndarray, cutoff_ts: float
) -> dict[str, Any]:
    """The delay columns of one chunk. A delay is drawn for every row, bought or not, so the
    stream's position never depends on the labels; only a purchase's delay is written."""
    bought = cols["purchase"] == 1
    delay = means[cols["category"]] * rng.exponential(size=len(bought))  # (n,) days
    seen = observe_conversions(cols["ts"], bought, delay, cutoff_ts)
    return {
        "click_ts": pa.array(cols["ts"], mask=cols["click"] == 0),  # clicks follow at once
        "true_delay_days": pa.array(delay, mask=~bought),  # truth: the eventual delay
        "purchase_observed": seen["purchase_observed"].astype(np.int8),
        "elapsed_days": seen["elapsed_days"],
        "purchase_delay_days": pa.array(delay, mask=~seen["purchase_observed"]),
    }


def _delay_setup(seed: int, on: bool, cutoff_days: float) -> tuple[np.ndarray | None, float]:
    """(per-category mean delays or None when off, the cut-off in seconds); checks the options."""
    if not cutoff_days >= 0.0:
        raise ValueError(f"observation_cutoff_days must be >= 0, got {cutoff_days}")
    if cutoff_days and not on:
        raise ValueError("observation_cutoff_days needs conversion_delays")
    return (delay_means(seed) if on else None), (TODAY_DAY + cutoff_days) * DAY_SECONDS


def _chunks(n: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
    for c, start in enumerate(range(0, n, size)):
        yield c, np.arange(start, min(start + size, n))


def generate_ecommerce(
    out_dir: Path,
    n_impressions: int,
    seed: int,
    fmt: str = "parquet",
    selection_bias: float = 1.0,
    hidden_confounding: float = 0.0,
    personalization: float = 0.0,
    conversion_delays: bool = False,
    observation_cutoff_days: float = 0.0,
) -> dict[str, Any]:
    """Write users.parquet, items.parquet, {train,valid,test}.<fmt> and meta.json; return meta.

    Splits are by time (first 80% of impressions train, next 10% valid, last 10% test). The
    entity tables always are Parquet; impression rows copy their attribute values verbatim.
    ``selection_bias`` >= 0 scales clickbait's pull on clicks and push on purchases (1.0: the
    original world; the same seed draws the same users, items and random numbers at any value).
    ``hidden_confounding`` >= 0 scales the unlogged per-impression confounder (0: none); it draws
    from its own stream, so the rest of the world is the same at any value. ``personalization``
    in [0, 1] is the share of impressions drawn from the user's taste (:class:`Taste`) rather than
    global popularity, as when a recall stage chose them (0: none, the default world); it too
    draws from its own stream. ``conversion_delays`` appends the delay columns (click_ts,
    true_delay_days, purchase_observed, elapsed_days, purchase_delay_days) as observed
    ``observation_cutoff_days`` >= 0 after the last impression; its draws have their own stream
    and every other column is unchanged, as is the whole output when it is off.
    """
    if n_impressions < 10:
        raise ValueError(f"n_impressions must be >= 10, got {n_impressions}")
    if not selection_bias >= 0.0:
        raise ValueError(f"selection_bias must be >= 0, got {selection_bias}")
    if not hidden_confounding >= 0.0:
        raise ValueError(f"hidden_confounding must be >= 0, got {hidden_confounding}")
    if not 0.0 <= personalization <= 1.0:
        raise ValueError(f"personalization must be in [0, 1], got {personalization}")
    means, cutoff_ts = _delay_setup(seed, conversion_delays, observation_cutoff_days)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ent_rng = np.random.default_rng([seed, 0])
    users = _users(ent_rng, max(200, n_impressions // 40))
    items = _items(ent_rng, max(300, n_impressions // 80))
    users["_cdf"] = np.cumsum(users["user_activity"]) / users["user_activity"].sum()
    items["_cdf"] = np.cumsum(items["_popularity"]) / items["_popularity"].sum()
    old = np.flatnonzero(items["first_seen_day"] < TODAY_DAY - HISTORY_DAYS)
    items["_old"], items["_old_cdf"] = old, np.cumsum(items["_popularity"][old])
    items["_old_cdf"] /= items["_old_cdf"][-1]
    pq.write_table(_entity_table(users, USER_COLUMNS), out_dir / "users.parquet")
    pq.write_table(
        _entity_table(items, ITEM_COLUMNS + ITEM_RULE_COLUMNS), out_dir / "items.parquet"
    )
    title_of = (items["item_id"], items["category"], items["brand"], items["quality"])
    write_titles(out_dir / TITLES_FILE, *title_of, seed=seed)

    taste = Taste(users, items) if personalization > 0 else None
    writer = _SplitWriter(out_dir, n_impressions, fmt, SPLIT_FRACTIONS)
    sums = dict.fromkeys(("click", "cf_purchase", "purchase", "cart", "collect", "cvr_clk"), 0.0)
    sums |= {"true_cvr": 0.0, "quality": 0.0, "quality_clk": 0.0, "purchase_observed": 0.0}
    for c, rows in _chunks(n_impressions, CHUNK_ROWS):
        rng = np.random.default_rng([seed, 1, c])
        hidden = None
        if hidden_confounding > 0:
            hidden = hidden_confounding * np.random.default_rng([seed, 2, c]).normal(size=len(rows))
        targeting = None
        if taste is not None:
            targeting = (taste, personalization, np.random.default_rng([seed, 3, c]))
        cols: dict[str, Any] = _impressions(
            rng, users, items, rows, n_impressions, selection_bias, hidden, targeting
        )
        if means is not None:  # appended after every existing column, from its own stream
            cols |= _delay_columns(np.random.default_rng([seed, 4, c]), cols, means, cutoff_ts)
            sums["purchase_observed"] += float(np.sum(cols["purchase_observed"]))
        writer.write(pa.table(cols), int(rows[0]))
        clk = cols["click"] == 1
        for k in ("click", "cf_purchase", "purchase", "cart", "collect", "true_cvr", "quality"):
            sums[k] += float(np.sum(cols[k], dtype=np.float64))
        sums["cvr_clk"] += float(np.sum(cols["true_cvr"][clk]))
        sums["quality_clk"] += float(np.sum(cols["quality"][clk]))
    split_rows = writer.close()
    n, clicks = float(n_impressions), max(sums["click"], 1.0)
    meta: dict[str, Any] = {
        "kind": "ecommerce",
        "seed": seed,
        "format": fmt,
        "n_impressions": n_impressions,
        "selection_bias": selection_bias,
        "hidden_confounding": hidden_confounding,
        "personalization": personalization,
        "n_users": len(users["user_id"]),
        "n_items": len(items["item_id"]),
        "today_day": TODAY_DAY,
        "history_days": HISTORY_DAYS,
        "splits": split_rows,
        "files": {s: writer.file(s) for s in split_rows}
        | {"users": "users.parquet"}
        | {"items": "items.parquet", "titles": TITLES_FILE},
        "rates": {
            "ctr": sums["click"] / n,
            "cvr_after_click": sums["purchase"] / clicks,
            "ctcvr": sums["purchase"] / n,
            "cart_after_click": sums["cart"] / clicks,
            "collect_after_click": sums["collect"] / clicks,
            "cf_purchase": sums["cf_purchase"] / n,
            "mean_true_cvr_all": sums["true_cvr"] / n,
            "mean_true_cvr_clicked": sums["cvr_clk"] / clicks,
            "mean_quality_all": sums["quality"] / n,
            "mean_quality_clicked": sums["quality_clk"] / clicks,
        },
    }
    if means is not None:  # only then: the default world's meta.json stays byte-identical
        meta["rates"]["purchase_observed_after_click"] = sums["purchase_observed"] / clicks
        meta["conversion_delays"] = {
            "distribution": "exponential",
            "mean_days_by_category": [round(float(m), 6) for m in means],
            "observation_cutoff_days": observation_cutoff_days,
            "cutoff_ts": int(cutoff_ts),
            "observed_share": sums["purchase_observed"] / max(sums["purchase"], 1.0),
        }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------ MMoE synthetic regression
def generate_mmoe(
    out_dir: Path,
    correlation: float,
    n_samples: int,
    seed: int,
    *,
    dim: int = 100,
    n_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    fmt: str = "parquet",
) -> dict[str, Any]:
    """Two regression tasks whose weight vectors have cosine similarity ``correlation``.

    ``u1, u2`` orthonormal; ``w1 = c u1``, ``w2 = c (rho u1 + sqrt(1 - rho^2) u2)``;
    ``y_i = w_i.x + sum_j sin(alpha_j w_i.x + beta_j) + noise``, x ~ N(0, I). Rows are split
    80/10/10 in generation order (rows are i.i.d.). Columns x0..x{dim-1}, y1, y2.
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [-1, 1], got {correlation}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prm = np.random.default_rng([seed, 0])
    u, _ = np.linalg.qr(prm.normal(size=(dim, 2)))  # (dim, 2) orthonormal columns
    w1 = scale * u[:, 0]
    w2 = scale * (correlation * u[:, 0] + np.sqrt(1.0 - correlation**2) * u[:, 1])
    alpha, beta = prm.normal(size=n_sines), prm.normal(size=n_sines)

    def task(x: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        wx = x @ w  # (n,)
        sines = np.sin(np.outer(wx, alpha) + beta).sum(axis=1)  # (n, m) -> (n,)
        out: np.ndarray = wx + sines + rng.normal(0.0, noise_std, len(wx))
        return out

    writer = _SplitWriter(out_dir, n_samples, fmt, SPLIT_FRACTIONS)
    acc = np.zeros(5)  # sums of y1, y2, y1^2, y2^2, y1*y2 for the measured correlation
    for c, rows in _chunks(n_samples, CHUNK_ROWS // 4):
        rng = np.random.default_rng([seed, 1, c])
        x = rng.normal(size=(len(rows), dim)).astype(np.float32)  # stored as float32
        xd = x.astype(np.float64)
        y1, y2 = task(xd, w1, rng), task(xd, w2, rng)
        acc += [y1.sum(), y2.sum(), (y1**2).sum(), (y2**2).sum(), (y1 * y2).sum()]
        cols = {f"x{j}": x[:, j] for j in range(dim)} | {"y1": y1, "y2": y2}
        writer.write(pa.table(cols), int(rows[0]))
    split_rows = writer.close()
    m1, m2, s11, s22, s12 = acc / n_samples
    measured = (s12 - m1 * m2) / np.sqrt((s11 - m1**2) * (s22 - m2**2))
    meta = {
        "kind": "mmoe",
        "seed": seed,
        "format": fmt,
        "correlation": correlation,
        "label_correlation": float(measured),
        "n_samples": n_samples,
        "dim": dim,
        "n_sines": n_sines,
        "scale": scale,
        "noise_std": noise_std,
        "splits": split_rows,
        "files": {s: writer.file(s) for s in split_rows},
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------ UCI census-income (KDD)
CENSUS_COLUMNS = [
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode",
    "education", "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat",
    "major_industry_code", "major_occupation_code", "race", "hispanic_origin", "sex",
    "member_of_a_labor_union", "reason_for_unemployment", "full_or_part_time_employment_stat",
    "capital_gains", "capital_losses", "dividends_from_stocks", "tax_filer_stat",
    "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household",
    "instance_weight", "migration_code_change_in_msa", "migration_code_change_in_reg",
    "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother",
    "country_of_birth_self", "citizenship", "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits", "weeks_worked_in_year",
    "year", "income",
]  # fmt: skip
# The MMoE paper's task group 2 predicts "whether the education level is at least college"
# (Ma et al., KDD 2018, section 6.3) without saying where college starts. An associate degree or
# higher reproduces the paper's label statistics: |Pearson(label, never married)| is 0.2376 on
# this file against the paper's 0.2373 (bachelor's or higher: 0.196; any college, with "Some
# college but no degree": 0.281). 19.5% of the records hold such a degree.
CENSUS_COLLEGE_DEGREES = (
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
)


def split_census(
    src: Path, out_dir: Path, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, Any]:
    """Split the raw UCI file into {train,valid,test}.parquet after a seeded shuffle.

    Adds ``income_50k`` (col 42 is "50000+."), ``never_married`` (col 8 is "Never married") and
    ``college_degree`` (col 5 is one of :data:`CENSUS_COLLEGE_DEGREES`) as 0/1 columns and drops
    the two raw label columns and col 25 (a sampling weight, not an attribute). ``education``
    stays: it is an input of task group 1, and group 2's dataset spec leaves it out. Text values
    are stripped of the file's leading blanks.
    """
    table = pacsv.read_csv(
        src, read_options=pacsv.ReadOptions(column_names=CENSUS_COLUMNS, block_size=1 << 22)
    )
    if table.num_columns != 42:
        raise ValueError(f"{src}: expected 42 columns, found {table.num_columns}")
    cols = {}
    for name in CENSUS_COLUMNS:
        col = table.column(name)
        cols[name] = pc.utf8_trim_whitespace(col) if pa.types.is_string(col.type) else col
    income = np.asarray(pc.equal(cols.pop("income"), "50000+.").to_numpy(zero_copy_only=False))
    marital = pc.equal(cols.pop("marital_stat"), "Never married").to_numpy(zero_copy_only=False)
    college = pc.is_in(cols["education"], pa.array(CENSUS_COLLEGE_DEGREES)).to_numpy(
        zero_copy_only=False
    )
    del cols["instance_weight"]
    out = pa.table(cols).append_column("income_50k", pa.array(income.astype(np.int8)))
    out = out.append_column("never_married", pa.array(np.asarray(marital).astype(np.int8)))
    out = out.append_column("college_degree", pa.array(np.asarray(college).astype(np.int8)))
    out = out.take(np.random.default_rng(seed).permutation(out.num_rows))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _SplitWriter(out_dir, out.num_rows, "parquet", fractions)
    writer.write(out, 0)
    meta = {
        "kind": "census",
        "source": str(src),
        "seed": seed,
        "splits": writer.close(),
        "files": {s: writer.file(s) for s in ("train", "valid", "test")},
        "rates": {
            "income_50k": float(income.mean()),
            "never_married": float(marital.mean()),
            "college_degree": float(college.mean()),
        },
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------ CLI
# the repository sits beside shared/ (see shared/data/README.md)
DEFAULT_CENSUS = (
    Path(__file__).resolve().parents[2] / "shared/data/census-income/census-income.test.gz"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtrank synth", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    e = sub.add_parser("ecommerce", help="impression -> click -> purchase funnel with truth")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--impressions", type=int, default=1_000_000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    e.add_argument(
        "--selection-bias",
        type=float,
        default=1.0,
        help="how strongly clickbait raises clicks and lowers purchases (default 1.0; 0 = none)",
    )
    e.add_argument(
        "--hidden-confounding",
        type=float,
        default=0.0,
        help="scale of an unlogged per-impression draw that raises clicks and lowers purchases "
        "(default 0 = none)",
    )
    e.add_argument(
        "--personalization",
        type=float,
        default=0.0,
        help="share of impressions drawn from the user's taste, not popularity (default 0)",
    )
    e.add_argument(
        "--conversion-delays",
        action="store_true",
        help="give purchases a delay (exponential, mean per category, 1 hour to 14 days) and "
        "write the log as observed at the cut-off (purchase_observed, elapsed_days, ...)",
    )
    e.add_argument(
        "--observation-cutoff-days",
        type=float,
        default=0.0,
        help="with --conversion-delays: days after the last impression at which conversions "
        "are read (default 0: at the end of the log)",
    )
    m = sub.add_parser("mmoe", help="MMoE paper two-task regression with task correlation rho")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--correlation", type=float, required=True)
    m.add_argument("--samples", type=int, default=100_000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dim", type=int, default=100)
    m.add_argument("--sines", type=int, default=10)
    m.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    c = sub.add_parser("census", help="split UCI census-income into train/valid/test")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--src", type=Path, default=DEFAULT_CENSUS)
    c.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.kind == "ecommerce":
        meta = generate_ecommerce(
            args.out,
            args.impressions,
            args.seed,
            args.format,
            args.selection_bias,
            args.hidden_confounding,
            args.personalization,
            args.conversion_delays,
            args.observation_cutoff_days,
        )
    elif args.kind == "mmoe":
        meta = generate_mmoe(
            args.out,
            args.correlation,
            args.samples,
            args.seed,
            dim=args.dim,
            n_sines=args.sines,
            fmt=args.format,
        )
    else:
        meta = split_census(args.src, args.out, args.seed)
    sys.stdout.write(f"wrote {args.kind} data to {args.out}\n{json.dumps(meta, indent=1)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
