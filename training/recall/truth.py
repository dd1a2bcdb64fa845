"""The synthetic generator's own expected clicks: the ceiling of a recall model on its data.

A recall model learns, from logged clicks, which items a user will click next. On data from
``mtrank synth ecommerce`` (training/synthetic.py) the answer is known: the generator keeps each
user's hidden preference vector and each item's hidden popularity, vector and clickbait. Over a
period of the log (a split), user u's expected clicks on item j are proportional to

    exposure(u, j) * click_rate(u, j)

(u's own share of impressions, from their activity, is the same for every item and drops out):

- ``exposure``, the chance that one of u's impressions shows j, averaged over the period's days
  d: ``(1 - P) * global_d(j) + P * taste_d(u, j)`` with P the ``personalization`` share, where
  ``global_d(j) = pop_j / sum pop`` and ``taste_d(u, j) = taste(u, c_j) * pop_j / sum_{c_j} pop``
  (:class:`training.synthetic.Taste`: a category from u's taste, an item by popularity within
  it; a category without items hands its share to the next one). An item not yet listed on day
  d (``first_seen_day > d``) is never shown; the draw that picked it shows an old item instead
  (listed before the log starts), drawn by popularity among the old items, in both branches.
- ``click_rate``, the generator's click probability sigmoid(logit) with the logit's user-item
  terms (affinity, clickbait at the data's ``selection_bias``, promotion, quality, the user's
  activity) and its per-impression terms (device, hour of day, the ``hidden_confounding`` draw)
  averaged over their distribution in the period.

Ranking items by this product is the generator's own expected-click ranking: no model trained on
the log can know more. The constants below repeat training/synthetic.py's ``_impressions``;
tests/training/recall/test_truth.py replays the generator and fails when the two drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from training import synthetic as S
from training.recall.data import EvalSet

# the click logit of training/synthetic.py _impressions
CTR_BIAS, CTR_AFFINITY, CTR_PROMOTED, CTR_QUALITY, CTR_ACTIVITY = -4.6, 0.9, 0.7, -1.0, 0.25
DEVICE_P = np.array([0.35, 0.5, 0.15])  # ios, android, web
DEVICE_LOGIT = np.array([0.15, 0.0, -0.3])
HOUR_AMPLITUDE, HOUR_PEAK = 0.2, 20
_GRID = np.linspace(-40.0, 40.0, 16_001)  # logits at which the averaged click rate is tabulated


class TruthUnavailable(ValueError):
    """The folder is not a world this module can read back (other generator, other version)."""


# ------------------------------------------------------------------ pure parts
def period_weights(meta: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(days (D,), their weights (D,), hour-of-day weights (24,)) of a split's impressions.

    Impression r of n has the time ``start + (r + U) / n * span`` (U uniform): a split's rows
    [lo, hi) are spread uniformly over that stretch of time; weights are its overlap with each
    day and with each hour of the day, summing to 1.
    """
    n, counts = int(meta["n_impressions"]), meta["splits"]
    order = ["train", "valid", "test"]
    lo = sum(int(counts[s]) for s in order[: order.index(split)])
    hi = lo + int(counts[split])
    span = float(meta["history_days"]) * 86400.0
    start = float(meta["today_day"] - meta["history_days"]) * 86400.0
    t0, t1 = start + lo / n * span, start + hi / n * span
    hours = np.arange(np.floor(t0 / 3600.0), np.ceil(t1 / 3600.0))  # (H,) hour bins touched
    overlap = np.minimum(t1, (hours + 1) * 3600.0) - np.maximum(t0, hours * 3600.0)  # (H,)
    overlap = np.maximum(overlap, 0.0) / (t1 - t0)
    day = (hours // 24).astype(np.int64)
    days, inverse = np.unique(day, return_inverse=True)
    day_w = np.bincount(inverse, weights=overlap, minlength=len(days))
    hour_w = np.bincount((hours % 24).astype(np.int64), weights=overlap, minlength=24)
    return days, day_w, hour_w


def click_rate(
    logit: np.ndarray, hour_weights: np.ndarray, hidden_confounding: float = 0.0
) -> np.ndarray:
    """E[sigmoid(logit + device + hour + hidden)] over the generator's per-impression terms.

    ``logit`` holds the user-item terms; the device's, the hour's (``hour_weights`` (24,)) and the
    hidden confounder's N(0, h^2) are averaged exactly on a grid of logits, then interpolated in
    log space (the averaged rate is smooth and log-concave there).
    """
    hour = HOUR_AMPLITUDE * np.cos(2 * np.pi * (np.arange(24) - HOUR_PEAK) / 24)  # (24,)
    offsets = (DEVICE_LOGIT[:, None] + hour[None, :]).ravel()  # (72,)
    weights = (DEVICE_P[:, None] * hour_weights[None, :]).ravel()  # (72,)
    if hidden_confounding > 0:
        nodes, w = np.polynomial.hermite_e.hermegauss(24)  # E over a standard normal
        offsets = (offsets[:, None] + hidden_confounding * nodes[None, :]).ravel()
        weights = (weights[:, None] * (w / w.sum())[None, :]).ravel()
    table = (weights[None, :] * S._sigmoid(_GRID[:, None] + offsets[None, :])).sum(axis=1)
    out: np.ndarray = np.exp(np.interp(logit, _GRID, np.log(table / weights.sum())))
    return out


def category_taste(taste: S.Taste) -> np.ndarray:
    """(U, C) each user's chance of each category under :class:`Taste`, a category without
    items handing its share to the next one that has some (what ``Taste.sample`` does)."""
    p = np.diff(taste.category_cdf, axis=1, prepend=0.0)  # (U, C)
    n_cat = p.shape[1]
    empty = taste.start == taste.end  # (C,)
    if empty.all():
        raise TruthUnavailable("no category has items")
    to = np.arange(n_cat)
    for c in range(n_cat):
        while empty[to[c]]:
            to[c] = (to[c] + 1) % n_cat
    out = np.zeros_like(p)
    np.add.at(out.T, to, p.T)  # column c's mass onto column to[c]
    return out


@dataclass(frozen=True)
class ItemExposure:
    """The item side of the exposure model over one period; arrays are (N,) generator items.

    Args:
        category: each item's category.
        global_share: pop_j / sum pop, times the share of the period the item is listed.
        category_share: pop_j / (its category's sum of pop), times the same listed share.
        old_share: pop_j / (sum of pop over old items) for an old item, else 0: where a draw
            that picked an unlisted item goes.
        unlisted_global: the chance that a global draw picks an unlisted item (scalar).
        unlisted_taste: (C,) the chance that a draw within category c picks an unlisted item.
    """

    category: np.ndarray
    global_share: np.ndarray
    category_share: np.ndarray
    old_share: np.ndarray
    unlisted_global: float
    unlisted_taste: np.ndarray

    @staticmethod
    def build(
        category: np.ndarray,
        popularity: np.ndarray,
        listed: np.ndarray,
        old: np.ndarray,
        n_categories: int,
    ) -> ItemExposure:
        """``listed`` (N,): the share of the period's impressions at which each item exists;
        ``old`` (N,) bool: items the generator falls back on."""
        pop = popularity / popularity.sum()  # (N,)
        cat_sum = np.bincount(category, weights=popularity, minlength=n_categories)  # (C,)
        within = popularity / cat_sum[category]  # (N,)
        unlisted_cat = np.bincount(category, weights=within * (1 - listed), minlength=n_categories)
        old_pop = np.where(old, popularity, 0.0)
        return ItemExposure(
            category=category,
            global_share=pop * listed,
            category_share=within * listed,
            old_share=old_pop / old_pop.sum(),
            unlisted_global=float((pop * (1 - listed)).sum()),
            unlisted_taste=unlisted_cat,
        )

    def probability(self, taste: np.ndarray, personalization: float) -> np.ndarray:
        """(b, C) users' category taste -> (b, N) chance that one impression shows each item."""
        shown = (1 - personalization) * (
            self.global_share + self.unlisted_global * self.old_share
        )  # (N,)
        late = taste @ self.unlisted_taste  # (b,) a taste draw lands on an unlisted item
        mine = taste[:, self.category] * self.category_share + late[:, None] * self.old_share
        out: np.ndarray = shown[None, :] + personalization * mine  # (b, N)
        return out


# ------------------------------------------------------------------ the retriever
class GeneratorTruth:
    """Scores catalog rows by the generator's expected clicks (module docstring).

    Args:
        exposure: the item side of the period's exposure model (generator item order).
        taste: (U, C) every user's category taste.
        personalization: the data's share of taste-drawn impressions.
        pref: (U, K) hidden user preferences; activity: (U,) user activity.
        vec: (N, K) hidden item vectors; item_logit: (N,) the click logit's item terms.
        hour_weights: (24,) the period's hours; hidden_confounding: the data's setting.
        rows: (R,) generator item of each catalog row (any item for a row that is none).
    """

    def __init__(self, exposure: ItemExposure, taste: np.ndarray, personalization: float,
                 pref: np.ndarray, activity: np.ndarray, vec: np.ndarray, item_logit: np.ndarray,
                 hour_weights: np.ndarray, hidden_confounding: float,
                 rows: np.ndarray) -> None:  # fmt: skip
        self.exposure, self.taste, self.personalization = exposure, taste, personalization
        self.pref, self.activity, self.vec, self.item_logit = pref, activity, vec, item_logit
        self.hour_weights, self.hidden = hour_weights, hidden_confounding
        self.rows = rows

    @staticmethod
    def from_folder(folder: Path, item_ids: np.ndarray, split: str = "test") -> GeneratorTruth:
        """Re-draw the world of ``folder`` from its meta.json seed and sizes (the generator's
        private helpers) and check it against items.parquet; ``item_ids`` (R,) is the catalog's
        raw id per row. Raises :class:`TruthUnavailable` when the world cannot be re-drawn."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("kind") != "ecommerce":
            raise TruthUnavailable(f"{folder}: not an ecommerce world ({meta.get('kind')!r})")
        rng = np.random.default_rng([int(meta["seed"]), 0])
        users = S._users(rng, int(meta["n_users"]))
        items = S._items(rng, int(meta["n_items"]))
        written = pq.read_table(folder / "items.parquet", columns=["item_id", "category", "brand"])
        for name in ("item_id", "category", "brand"):
            if not np.array_equal(written.column(name).to_numpy(), items[name]):
                raise TruthUnavailable(f"{folder}: items.parquet {name} differs from a re-draw")
        days, day_w, hour_w = period_weights(meta, split)
        listed = (items["first_seen_day"][:, None] <= days[None, :]) @ day_w  # (N,)
        old = items["first_seen_day"] < meta["today_day"] - meta["history_days"]
        exposure = ItemExposure.build(
            items["category"], items["_popularity"], listed, old, S.N_CATEGORIES
        )
        bias = float(meta.get("selection_bias", 1.0))
        bait = items["_clickbait"] + (bias - 1.0) * (items["_clickbait"] - S.BAIT_PIVOT)
        item_logit = (
            CTR_BIAS + S.BAIT_CLICK * bait + CTR_PROMOTED * items["promoted"]
            + CTR_QUALITY * items["quality"]
        )  # fmt: skip
        rows = np.where(item_ids >= 0, item_ids - items["item_id"][0], 0)
        return GeneratorTruth(
            exposure, category_taste(S.Taste(users, items)),
            float(meta.get("personalization", 0.0)), users["_pref"], users["user_activity"],
            items["_vec"], item_logit, hour_w, float(meta.get("hidden_confounding", 0.0)), rows,
        )  # fmt: skip

    def expected_clicks(self, users: np.ndarray) -> np.ndarray:
        """(b,) generator user indices -> (b, N) exposure * click rate over generator items."""
        affinity = self.pref[users] @ self.vec.T / np.sqrt(self.vec.shape[1])  # (b, N)
        logit = self.item_logit[None, :] + CTR_AFFINITY * affinity
        logit += CTR_ACTIVITY * np.log(self.activity[users])[:, None]
        rate = click_rate(logit, self.hour_weights, self.hidden)  # (b, N)
        shown = self.exposure.probability(self.taste[users], self.personalization)  # (b, N)
        out: np.ndarray = shown * rate
        return out

    def scores(self, users: EvalSet, rows: slice) -> Tensor:
        u = users.user_id[rows] - 1  # user ids are 1..U
        return torch.from_numpy(self.expected_clicks(u)[:, self.rows])  # (b, R) catalog rows
