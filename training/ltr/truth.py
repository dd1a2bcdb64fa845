"""The generator's ground truth for ranking: true click, purchase and grade of any candidate.

Offline LTR is judged on the generator's truth, not on the sparse logged events. For any user,
item and context of a world written by ``mtrank synth ecommerce`` (training/synthetic.py) the
true click probability P(click) and purchase-after-click probability P(buy | click) follow from
the world's hidden traits, which :meth:`WorldTruth.from_folder` re-draws from meta.json's seed
(the generator's own private helpers, as training/recall/truth.py does). From them:

* expected GMV of showing the item: ``P(click) x P(buy | click) x price``;
* the expected gain of its grade (:func:`expected_gain`): the grade is the highest of the
  events (click, cart, purchase) the generator would draw, so its expectation follows from the
  generator's cart rule (a buyer carts with probability 0.75, a clicker who does not buy with
  0.3 P(buy | click) + 0.04).

**Requests.** The logs have no request id and a user holds ~4 impressions of a test split, so a
top-20 metric over a user's logged rows would see every row. :func:`counterfactual_requests`
builds requests the way the service sees them: one user and one context (hour, device) from a
logged test row, and ``N`` candidates whose item side comes from other logged test rows (so
candidates follow the logged exposure distribution), their encoded features recombined
field by field (user and context fields from the request, item fields from the candidate) and
their truth computed for that user, item and context.

The constants below repeat ``_impressions`` in training/synthetic.py; tests/training/ltr replays
the generator and fails when the two drift apart. A world with ``hidden_confounding`` > 0 has a
per-impression draw no request can know, so its truth is refused (:class:`TruthUnavailable`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mtrank.spec import FeatureSpec
from training import synthetic as S
from training.data import Encoded
from training.ltr.config import IMPRESSION

# the click and purchase logits of training/synthetic.py _impressions
CTR_BIAS, CTR_AFFINITY, CTR_PROMOTED, CTR_QUALITY, CTR_ACTIVITY = -4.6, 0.9, 0.7, -1.0, 0.25
DEVICE_LOGIT = {"ios": 0.15, "android": 0.0, "web": -0.3}
HOUR_AMPLITUDE, HOUR_PEAK = 0.2, 20
CVR_BIAS, CVR_QUALITY, CVR_PRICE, CVR_PROPENSITY, CVR_AFFINITY, CVR_PROMOTED = (
    -2.0, 3.5, -1.6, 0.9, 0.3, 0.3,
)  # fmt: skip
PRICE_CENTRE, PRICE_SCALE = 3.5, 0.9  # z_price = (log(price) - 3.5) / 0.9
CART_IF_BUY, CART_SLOPE, CART_BASE = 0.75, 0.3, 0.04
TRUTH_EVENTS = ("click", "cart", "purchase")  # the events expected_gain can take the grade of


class TruthUnavailable(ValueError):
    """The folder is not a world whose truth can be re-drawn (other generator, confounded)."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


@dataclass(frozen=True)
class WorldTruth:
    """The hidden traits of one generated world, indexed by raw user and item id.

    Args:
        user_traits: (U, K) preference, then activity, price sensitivity, purchase propensity.
        item_traits: (N, K) vector, then quality, clickbait effect (at the world's selection
            bias), promoted flag, price.
    """

    pref: np.ndarray  # (U, K)
    activity: np.ndarray  # (U,)
    sensitivity: np.ndarray  # (U,)
    propensity: np.ndarray  # (U,)
    vec: np.ndarray  # (N, K)
    quality: np.ndarray  # (N,)
    bait: np.ndarray  # (N,) clickbait's effect at the world's selection bias
    promoted: np.ndarray  # (N,)
    price: np.ndarray  # (N,)
    first_item_id: int

    @staticmethod
    def from_folder(folder: Path) -> WorldTruth:
        """Re-draw ``folder``'s world from meta.json (seed, sizes, selection bias)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise TruthUnavailable(f"{folder}: no readable meta.json: {e}") from e
        if meta.get("kind") != "ecommerce":
            raise TruthUnavailable(f"{folder}: not an ecommerce world ({meta.get('kind')!r})")
        if float(meta.get("hidden_confounding", 0.0)) != 0.0:
            raise TruthUnavailable(f"{folder}: hidden_confounding > 0 has no per-request truth")
        rng = np.random.default_rng([int(meta["seed"]), 0])
        users = S._users(rng, int(meta["n_users"]))
        items = S._items(rng, int(meta["n_items"]))
        written = pq.read_table(folder / "items.parquet", columns=["item_id", "price"])
        if not np.array_equal(written.column("item_id").to_numpy(), items["item_id"]):
            raise TruthUnavailable(f"{folder}: items.parquet differs from a re-draw")
        bias = float(meta.get("selection_bias", 1.0))
        bait = items["_clickbait"] + (bias - 1.0) * (items["_clickbait"] - S.BAIT_PIVOT)
        return WorldTruth(
            users["_pref"], users["user_activity"], users["_sensitivity"], users["_propensity"],
            items["_vec"], items["quality"], bait, items["promoted"].astype(np.float64),
            items["price"], int(items["item_id"][0]),
        )  # fmt: skip

    def probabilities(
        self, user_ids: np.ndarray, item_ids: np.ndarray, devices: np.ndarray, hours: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(P(click), P(buy | click)), each (n,), for raw ids and the context of each row."""
        u = np.asarray(user_ids, dtype=np.int64) - 1  # user ids are 1..U
        i = np.asarray(item_ids, dtype=np.int64) - self.first_item_id
        affinity = np.einsum("nk,nk->n", self.pref[u], self.vec[i]) / np.sqrt(self.vec.shape[1])
        device = np.array([DEVICE_LOGIT[str(d)] for d in np.asarray(devices)], dtype=np.float64)
        hour = np.asarray(hours, dtype=np.float64)
        ctr_logit = (
            CTR_BIAS + CTR_AFFINITY * affinity + S.BAIT_CLICK * self.bait[i]
            + CTR_PROMOTED * self.promoted[i] + CTR_QUALITY * self.quality[i]
            + CTR_ACTIVITY * np.log(self.activity[u]) + device
            + HOUR_AMPLITUDE * np.cos(2 * np.pi * (hour - HOUR_PEAK) / 24)
        )  # fmt: skip
        z_price = (np.log(self.price[i]) - PRICE_CENTRE) / PRICE_SCALE
        cvr_logit = (
            CVR_BIAS + CVR_QUALITY * (self.quality[i] - 0.5)
            + CVR_PRICE * self.sensitivity[u] * z_price + S.BAIT_PURCHASE * self.bait[i]
            + CVR_PROPENSITY * self.propensity[u] + CVR_AFFINITY * affinity
            + CVR_PROMOTED * self.promoted[i]
        )  # fmt: skip
        return _sigmoid(ctr_logit), _sigmoid(cvr_logit)


def expected_gain(
    ctr: np.ndarray, cvr: np.ndarray, grades: Mapping[str, int], gains: Sequence[float]
) -> np.ndarray:
    """(n,) E[gain(grade)] of showing each item, under the generator's event rules.

    ``grades`` may grade ``impression``, ``click``, ``cart`` and ``purchase`` (the events whose
    joint law the generator fixes; ``collect`` is drawn independently and is not supported);
    ``gains`` is the gain of each grade (index = grade).
    """
    other = sorted(set(grades) - {IMPRESSION, *TRUTH_EVENTS})
    if other:
        raise TruthUnavailable(f"the expected grade cannot take {other} into account")
    gi = grades.get(IMPRESSION, 0)
    gc, gk, gp = (grades.get(e, gi) for e in TRUTH_EVENTS)

    def gain(*events: int) -> float:
        return float(gains[max((gi, *events))])

    cart_no_buy = CART_SLOPE * cvr + CART_BASE  # P(cart | click, no purchase)
    clicked = cvr * (CART_IF_BUY * gain(gc, gp, gk) + (1 - CART_IF_BUY) * gain(gc, gp)) + (
        1 - cvr
    ) * (cart_no_buy * gain(gc, gk) + (1 - cart_no_buy) * gain(gc))
    out: np.ndarray = (1 - ctr) * gain() + ctr * clicked
    return out


# ---------------------------------------------------------------- counterfactual requests
@dataclass(frozen=True)
class Requests:
    """R requests of N candidates, flattened request-major (rows r*N .. r*N + N - 1)."""

    sparse: np.ndarray  # (R*N, S) int64
    dense: np.ndarray  # (R*N, D) float32
    groups: np.ndarray  # (R*N,) request index
    true_ctr: np.ndarray  # (R*N,)
    true_cvr: np.ndarray  # (R*N,)
    price: np.ndarray  # (R*N,) raw price

    @property
    def gmv(self) -> np.ndarray:
        """(R*N,) expected GMV of showing each candidate."""
        out: np.ndarray = self.true_ctr * self.true_cvr * self.price
        return out


RAW_COLUMNS = ("user_id", "item_id", "device", "hour", "price", "true_ctr", "true_cvr")


def read_raw(path: Path) -> dict[str, np.ndarray]:
    """The raw columns a request needs, from one split's Parquet file (same rows as encoded)."""
    table = pq.read_table(path, columns=list(RAW_COLUMNS))
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in RAW_COLUMNS}


def check_replay(truth: WorldTruth, raw: Mapping[str, np.ndarray], rows: int = 2000) -> float:
    """Largest |recomputed - logged| of P(click) and P(buy | click) over the first ``rows``.

    A world re-drawn correctly reproduces the logged truth to float rounding.
    """
    r = slice(0, rows)
    ctr, cvr = truth.probabilities(
        raw["user_id"][r], raw["item_id"][r], raw["device"][r], raw["hour"][r]
    )
    return float(max(np.max(np.abs(ctr - raw["true_ctr"][r]), initial=0.0),
                     np.max(np.abs(cvr - raw["true_cvr"][r]), initial=0.0)))  # fmt: skip


def counterfactual_requests(
    spec: FeatureSpec,
    enc: Encoded,
    raw: Mapping[str, np.ndarray],
    truth: WorldTruth,
    n_requests: int,
    n_candidates: int,
    seed: int,
) -> Requests:
    """Requests built from one split (module docstring); deterministic by ``seed``."""
    if len(enc) != len(raw["user_id"]):
        raise TruthUnavailable(f"encoded split has {len(enc)} rows, raw {len(raw['user_id'])}")
    rng = np.random.default_rng(seed)
    base = rng.integers(0, len(enc), n_requests)  # (R,) the request's user and context
    cand = rng.integers(0, len(enc), (n_requests, n_candidates)).reshape(-1)  # (R*N,)
    req = np.repeat(base, n_candidates)  # (R*N,)
    sparse = np.array(enc.sparse[cand], dtype=np.int64)  # (R*N, S) item side kept
    dense = np.array(enc.dense[cand], dtype=np.float32)  # (R*N, D)
    for source in ("user", "context"):
        s_pos, d_pos = spec.sparse_positions(source), spec.dense_positions(source)
        if s_pos:
            sparse[:, s_pos] = enc.sparse[req][:, s_pos]
        if d_pos:
            dense[:, d_pos] = enc.dense[req][:, d_pos]
    ctr, cvr = truth.probabilities(
        raw["user_id"][req], raw["item_id"][cand], raw["device"][req], raw["hour"][req]
    )
    groups = np.repeat(np.arange(n_requests, dtype=np.int64), n_candidates)
    price = np.asarray(raw["price"][cand], dtype=np.float64)
    return Requests(sparse, dense, groups, ctr, cvr, price)
