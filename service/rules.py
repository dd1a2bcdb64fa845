"""Re-rank rules over fused scores: exposure caps, boosts/demotions, diversity, truncation.

Pure numpy functions; the Redis side (exposure counters, the atomic reserve) is an adapter
elsewhere. Applied in this fixed order by :func:`rerank`:

(a) **Exposure caps** (:func:`cap_filter`): an item whose exposure count today is at or over its
    cap (:func:`item_caps`: its own ``exposure_cap`` attribute when >= 0, else the scene's
    default) is dropped.
(b) **Boosts and demotions** (:func:`rule_weight`): each named rule multiplies the weight of the
    items matching all its conditions. The weight enters the fused score through the formula's
    ``rule_weight`` name (mtrank/fusion.py), so the scores :func:`rerank` receives already carry
    it; rerank never multiplies again and only reports which rule fired on which item.
(c) **Diversity** (:func:`diversify`), the "N out of 1" rule: for each constraint (an integer
    attribute, a window W, a max count K) every W consecutive output positions hold at most K
    items sharing a value. Greedy and stable: each position takes the highest-scored remaining
    item that keeps every constraint; when none can, it takes the highest-scored remaining item
    anyway and flags it ``diversity_fallback``. Items are never lost or duplicated. Code -1
    (unknown category/brand) never equals anything, itself included. Only the first ``size``
    positions are diversified: the rest are not returned, so they keep score order (they are the
    refill pool of :func:`fill_after_refusals`). Blocked items are parked until their value
    unblocks instead of being rescanned at every position (see ``_Greedy``), so a value that
    dominates the top of the list does not make the pass O(size x N).
(d) **Truncation** to ``size``.

Is the cap hard or soft? **Soft here.** :func:`cap_filter` sees a snapshot of the counters read
with the features; concurrent requests may all see 9,999 of 10,000 and all show the item. The
hard guarantee comes from the store adapter's atomic reserve (service/exposure.py, the request's
"reserve" stage): after rerank picks the items, a Redis Lua script increments each item's counter
only while it is under its cap and refuses otherwise; refused items are replaced by the next ones
with :func:`fill_after_refusals`. When the reserve cannot be made, the scene's
``exposure_cap.on_store_failure`` policy decides what is served.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.ranking_config import Condition, DiversityConstraint, ExposureCap, RulesConfig

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]
# Item attributes: a snapshot record array (mtrank.snapshot.item_dtype) or a mapping of columns.
ItemAttributes = Mapping[str, NDArray[Any]] | NDArray[Any]
UNKNOWN_CODE = -1


def _column(attrs: ItemAttributes, name: str) -> NDArray[Any]:
    return np.asarray(attrs[name])


# ---------------------------------------------------------------- (a) exposure caps
def cap_filter(
    exposures: NDArray[np.integer[Any]], caps: NDArray[Any], default_cap: int | None
) -> BoolArray:
    """Keep-mask (N,): True where today's exposures are under the item's cap.

    ``caps`` < 0 means "use ``default_cap``" (None: uncapped); a cap of 0 hides the item.
    """
    default = -1 if default_cap is None else default_cap
    cap = np.where(np.asarray(caps) >= 0, caps, default)  # (N,) < 0: uncapped
    keep: BoolArray = (cap < 0) | (np.asarray(exposures) < cap)
    return keep


def item_caps(own_caps: NDArray[Any], cfg: ExposureCap) -> IntArray:
    """Each item's daily cap under the scene's ``cfg``, (N,) int64; < 0 means uncapped.

    The item's own ``exposure_cap`` when >= 0, else the scene's default (uncapped when that is
    null); with the cap disabled no item is capped. The atomic reserve enforces exactly these.
    """
    own = np.asarray(own_caps, dtype=np.int64)  # (N,)
    if not cfg.enabled:
        return np.full(len(own), -1, dtype=np.int64)
    default = -1 if cfg.default_daily_cap is None else cfg.default_daily_cap
    out: IntArray = np.where(own >= 0, own, default)
    return out


# ---------------------------------------------------------------- (b) boosts and demotions
def _condition_mask(col: NDArray[Any], cond: Condition, today_day: int) -> BoolArray:
    x = col.astype(np.float64)  # (N,)
    v = cond.value
    if cond.op == "in":
        out: BoolArray = np.isin(x, np.asarray(v, dtype=np.float64))
        return out
    assert not isinstance(v, list)  # checked at load: only "in" takes a list
    if cond.op == "within_days":
        # Unknown day (-1) is never "new"; a day in the future (clock skew) is not new either.
        age = today_day - x
        out = (col != UNKNOWN_CODE) & (age >= 0) & (age < v)
        return out
    ops = {
        "eq": np.equal,
        "ne": np.not_equal,
        "lt": np.less,
        "le": np.less_equal,
        "gt": np.greater,
        "ge": np.greater_equal,
    }
    out = ops[cond.op](x, v)
    return out


def rule_weight(
    attrs: ItemAttributes, cfg: RulesConfig, today_day: int
) -> tuple[FloatArray, dict[str, BoolArray]]:
    """Per-item weight (N,) = product of the multipliers of the rules that match it.

    Returns the weights and, per rule name, the (N,) mask of items it fired on.
    """
    n = len(_column(attrs, "promoted"))
    weights = np.ones(n, dtype=np.float64)  # (N,)
    effects: dict[str, BoolArray] = {}
    for rule in [*cfg.boosts, *cfg.demotions]:
        fired = np.ones(n, dtype=bool)
        for cond in rule.when:
            fired &= _condition_mask(_column(attrs, cond.field), cond, today_day)
        weights[fired] *= rule.multiplier
        effects[rule.name] = fired
    return weights, effects


# ---------------------------------------------------------------- (c) diversity
class _Greedy:
    """State of the greedy diversity pass over score positions 0..M-1 (best first).

    Rescanning every skipped item at every position would cost O(size x skipped) when one
    value dominates the top of the list. Instead an item found blocked by (constraint c, value
    v) is parked in a heap for (c, v) and looked at again only after (c, v) unblocks: then a
    marker holding that heap's best position enters ``markers``. Candidates come, in score order,
    from the never-visited items (``fresh`` onwards) and from the markers' heads, so the first
    fitting candidate is the best fitting free item. Each item is parked at most once per
    block/unblock of a value, and each position costs O(log M) heap work on average.
    """

    def __init__(self, values: list[list[int]], constraints: Sequence[DiversityConstraint]):
        self.values = values  # per constraint: code at each score position
        n_c = len(constraints)
        self.counts: list[dict[int, int]] = [{} for _ in range(n_c)]  # in the trailing window
        # A marker is live only while its value's version is unchanged (bumped on block/unblock).
        self.version: list[dict[int, int]] = [{} for _ in range(n_c)]
        self.parked: list[dict[int, list[int]]] = [{} for _ in range(n_c)]  # heaps of positions
        self.where: dict[int, int] = {}  # parked position -> constraint it is parked under
        self.markers: list[tuple[int, int, int, int]] = []  # heap: (head, c, value, version)
        self.fresh = 0  # positions >= fresh were never looked at
        self.m = len(values[0])
        self.placed: list[int] = []  # score positions in output order
        self.spec = [
            (c, values[c], self.counts[c], con.max_count, con.window)
            for c, con in enumerate(constraints)
        ]

    def blocker(self, p: int) -> int:
        """Index of a constraint the item at ``p`` would break here, or -1."""
        for c, values, counts, limit, _ in self.spec:
            v = values[p]
            if v != UNKNOWN_CODE and counts.get(v, 0) >= limit:
                return c
        return -1

    def next_fit(self) -> int:
        """Best free position that keeps every constraint, or -1 (everything left is parked).

        Candidates in score order: the best released head of a parked heap (a live marker) or
        the next never-visited position, whichever comes first.
        """
        markers, m = self.markers, self.m
        while True:
            if markers and (self.fresh >= m or markers[0][0] < self.fresh):
                _, c, v, ver = heapq.heappop(markers)
                if ver != self.version[c].get(v, 0):
                    continue  # (c, v) blocked again since; its heap waits for the next unblock
                queue = self.parked[c][v]
                p = heapq.heappop(queue)
                if queue:
                    heapq.heappush(markers, (queue[0], c, v, ver))
            elif self.fresh < m:
                p = self.fresh
                self.fresh += 1
            else:
                return -1
            c = self.blocker(p)
            if c < 0:
                return p
            heapq.heappush(self.parked[c].setdefault(self.values[c][p], []), p)
            self.where[p] = c

    def take_parked(self, p: int) -> None:
        """Fallback: remove the best free position ``p`` (the head of its parked heap)."""
        c = self.where[p]
        popped = heapq.heappop(self.parked[c][self.values[c][p]])
        assert popped == p, "the best free item heads its parked heap"

    def place(self, p: int) -> None:
        k = len(self.placed)
        self.placed.append(p)
        for c, values, counts, limit, window in self.spec:
            v = values[p]
            if v != UNKNOWN_CODE:
                counts[v] = n = counts.get(v, 0) + 1
                if n == limit:  # becomes blocked: kill its live marker, if any
                    self.version[c][v] = self.version[c].get(v, 0) + 1
            leave = k - window + 1  # position that drops out of the next window
            if leave >= 0 and (u := values[self.placed[leave]]) != UNKNOWN_CODE:
                counts[u] = n = counts[u] - 1
                if n == limit - 1:  # unblocked: release the best parked item of this value
                    self.version[c][u] = ver = self.version[c].get(u, 0) + 1
                    queue = self.parked[c].get(u)
                    if queue:
                        heapq.heappush(self.markers, (queue[0], c, u, ver))


def diversify(
    ranked: IntArray,
    columns: Sequence[NDArray[Any]],
    constraints: Sequence[DiversityConstraint],
    size: int,
) -> tuple[IntArray, BoolArray]:
    """Greedy diversified order of ``ranked`` (item indices, best score first).

    ``columns[c]`` is the (N,) integer attribute of ``constraints[c]``. Returns the permuted item
    indices (M,) -- first ``min(size, M)`` diversified, the rest in score order -- and a mask (M,)
    over output positions of the items placed by the fallback (no fitting item was left).
    """
    m = len(ranked)
    n_out = min(max(size, 0), m)
    fallback = np.zeros(m, dtype=bool)  # (M,) by output position
    if not constraints or n_out == 0:
        return ranked.copy(), fallback
    values = [np.asarray(col)[ranked].astype(np.int64).tolist() for col in columns]  # (M,) each
    greedy = _Greedy(values, constraints)
    free = [True] * m  # by score position
    head = 0  # best free score position
    for p in range(n_out):
        j = greedy.next_fit()
        if j < 0:
            j, fallback[p] = head, True
            greedy.take_parked(j)
        free[j] = False
        greedy.place(j)
        while head < m and not free[head]:
            head += 1
    rest = [j for j in range(head, m) if free[j]]
    positions = np.asarray(greedy.placed + rest, dtype=np.int64)
    out: IntArray = ranked[positions]
    return out, fallback


# ---------------------------------------------------------------- rerank
@dataclass(frozen=True)
class RerankResult:
    """What :func:`rerank` decided, with per-item effects for explain and counts for metrics.

    Per-item arrays are (N,) over the input candidates. ``moved`` is output position minus the
    item's score rank among the kept items: > 0 means diversity pushed it down.
    """

    order: IntArray  # (k,) item indices to return, k = min(size, kept)
    ranked: IntArray  # (M,) every kept item: `order`, then the rest by score (refill pool)
    scores: FloatArray  # (N,) scores ranked on (non-finite -> -inf)
    weights: FloatArray  # (N,) rule weight
    rule_effects: dict[str, BoolArray]  # rule name -> (N,) fired
    multipliers: dict[str, float]  # rule name -> multiplier
    capped: BoolArray  # (N,) dropped by the exposure cap
    nonfinite: BoolArray  # (N,) fused score was nan/inf
    position: IntArray  # (N,) output position, -1 when not returned
    moved: IntArray  # (N,) position - score rank, 0 when not returned
    diversity_fallback: BoolArray  # (N,)
    counts: dict[str, int]

    def explain(self, i: int) -> dict[str, Any]:
        """JSON-ready effects of the rules on candidate ``i``."""
        pos = int(self.position[i])
        return {
            "score": float(self.scores[i]),
            "rule_weight": float(self.weights[i]),
            "rules": {n: self.multipliers[n] for n, m in self.rule_effects.items() if m[i]},
            "capped": bool(self.capped[i]),
            "nonfinite_score": bool(self.nonfinite[i]),
            "position": pos if pos >= 0 else None,
            "moved": int(self.moved[i]),
            "diversity_fallback": bool(self.diversity_fallback[i]),
        }


def _score_order(scores: FloatArray, kept: IntArray) -> IntArray:
    """``kept`` sorted by descending score, ties in input order.

    A plain quicksort is ~4x faster than a stable sort and gives the same order when no two
    scores tie; ties (e.g. many -inf) take the stable sort.
    """
    neg = -scores[kept]  # (M,)
    order = np.argsort(neg)
    ranked = neg[order]
    if (ranked[1:] == ranked[:-1]).any():
        order = np.argsort(neg, kind="stable")
    out: IntArray = kept[order]
    return out


def _check_lengths(n: int, **arrays: NDArray[Any] | None) -> None:
    for name, a in arrays.items():
        if a is not None and len(a) != n:
            raise ValueError(f"rerank: {name} has {len(a)} rows, scores has {n}")


def rerank(
    scores: FloatArray,
    attrs: ItemAttributes,
    exposures: NDArray[np.integer[Any]] | None,
    cfg: RulesConfig,
    size: int,
    today_day: int,
    *,
    weights: tuple[FloatArray, dict[str, BoolArray]] | None = None,
) -> RerankResult:
    """Apply caps, (report) boosts/demotions, diversity and truncation, in that order.

    ``scores`` (N,) are the fused scores (which include ``rule_weight``); non-finite ones rank
    last. ``exposures`` (N,) are today's counts (None: all zero). ``weights`` is the
    :func:`rule_weight` result the pipeline already computed for the formula, if at hand.
    """
    if size < 0:
        raise ValueError(f"rerank: size must be >= 0, got {size}")
    raw = np.asarray(scores, dtype=np.float64)
    n = len(raw)
    _check_lengths(n, exposures=exposures, exposure_cap=_column(attrs, "exposure_cap"))
    nonfinite = ~np.isfinite(raw)  # (N,)
    s = np.where(nonfinite, -np.inf, raw)  # (N,)
    if cfg.exposure_cap.enabled:
        counts_today = np.zeros(n, np.int64) if exposures is None else exposures
        keep = cap_filter(
            counts_today, _column(attrs, "exposure_cap"), cfg.exposure_cap.default_daily_cap
        )
    else:
        keep = np.ones(n, dtype=bool)
    w, effects = weights if weights is not None else rule_weight(attrs, cfg, today_day)
    kept = np.flatnonzero(keep)  # (M,)
    by_score = _score_order(s, kept)  # (M,) best first, ties in input order
    columns = [_column(attrs, c.field) for c in cfg.diversity]
    ranked, fb_by_pos = diversify(by_score, columns, cfg.diversity, size)
    k = min(size, len(ranked))
    order = ranked[:k]
    score_rank = np.full(n, -1, dtype=np.int64)
    score_rank[by_score] = np.arange(len(by_score))
    position = np.full(n, -1, dtype=np.int64)
    position[order] = np.arange(k)
    moved = np.zeros(n, dtype=np.int64)
    moved[order] = position[order] - score_rank[order]
    fallback = np.zeros(n, dtype=bool)
    fallback[ranked[fb_by_pos]] = True
    counts = {
        "candidates": n,
        "capped": int((~keep).sum()),
        "nonfinite_score": int(nonfinite.sum()),
        **{f"rule:{name}": int(m.sum()) for name, m in effects.items()},
        "diversity_moved": int((moved[order] != 0).sum()),
        "diversity_fallback": int(fb_by_pos.sum()),
        "truncated": len(ranked) - k,
    }
    multipliers = {r.name: r.multiplier for r in [*cfg.boosts, *cfg.demotions]}
    return RerankResult(
        order=order,
        ranked=ranked,
        scores=s,
        weights=w,
        rule_effects=effects,
        multipliers=multipliers,
        capped=~keep,
        nonfinite=nonfinite,
        position=position,
        moved=moved,
        diversity_fallback=fallback,
        counts=counts,
    )


def fill_after_refusals(order: IntArray, refused_mask: BoolArray, size: int) -> IntArray:
    """The first ``size`` items of ``order`` that the atomic reserve did not refuse.

    ``order`` is :attr:`RerankResult.ranked`; ``refused_mask`` (same shape) is True at positions
    the reserve script refused (positions never sent are False). The adapter loops: reserve the
    returned items it has not reserved yet, mark new refusals, call again, until a round refuses
    nothing or the pool runs out. Replacements come from the score-ordered tail and are not
    re-diversified; where that matters, run :func:`rerank` again with the refused items' exposures
    set to their cap.
    """
    order = np.asarray(order, dtype=np.int64)
    refused = np.asarray(refused_mask, dtype=bool)
    if refused.shape != order.shape:
        raise ValueError(f"refused_mask has shape {refused.shape}, order has {order.shape}")
    out: IntArray = order[~refused][: max(size, 0)]
    return out
