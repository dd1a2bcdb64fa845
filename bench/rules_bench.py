"""Micro-benchmark of the pure ranking core: fusion + rule weights + rerank, per request.

Prints the median wall time in microseconds for N candidates and size=100 with the shipped
default scene (2 boosts, 1 demotion, category 4/1 and brand 6/2 diversity), on realistic
attribute mixes and on an adversarial one (every candidate in one category: each position
searches the whole pool and falls back).

    .venv/bin/python bench/rules_bench.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.fusion import formula_inputs
from service.ranking_config import load_ranking_config
from service.rules import rerank, rule_weight

CONFIG = Path(__file__).resolve().parents[1] / "service" / "config" / "ranking.yaml"
OUTPUTS = ("ctr", "cvr", "stay", "cart", "collect")
TODAY = 20_000
SIZE = 100


def zipf_weights(k: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, k + 1) ** s
    return w / w.sum()


def make_items(n: int, n_categories: int, n_brands: int, rng: np.random.Generator) -> np.ndarray:
    rec = np.zeros(n, dtype=ITEM_ATTRIBUTES.record_fields())
    # Zipf-like popularity: a few categories/brands hold most candidates, as in real recall sets.
    rec["category"] = rng.choice(n_categories, n, p=zipf_weights(n_categories, 1.1))
    rec["brand"] = rng.choice(n_brands, n, p=zipf_weights(n_brands, 1.0))
    rec["price"] = rng.lognormal(3.0, 1.0, n)
    rec["promoted"] = rng.random(n) < 0.05
    rec["first_seen_day"] = TODAY - rng.integers(0, 365, n)
    rec["quality"] = rng.random(n)
    rec["exposure_cap"] = -1
    return rec


def median_us(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def main() -> None:
    cfg = load_ranking_config(CONFIG, OUTPUTS)
    rules, formula = cfg.scene("default").rules, cfg.formula("default")
    rng = np.random.default_rng(0)
    speed = median_us(lambda: sum(range(1000)), 2000)
    print(f"machine speed reference: sum(range(1000)) = {speed:.1f} us")
    cases = [
        ("realistic: 50 categories, 200 brands", 50, 200),
        ("few values: 5 categories, 8 brands", 5, 8),
        ("adversarial: 1 category, 1 brand", 1, 1),
    ]
    for n in (500, 2000):
        outputs = {k: rng.random(n) for k in OUTPUTS}
        exposures = rng.integers(0, 12_000, n)
        for label, n_cat, n_brand in cases:
            attrs = make_items(n, n_cat, n_brand, rng)
            weights = rule_weight(attrs, rules, TODAY)
            scores = formula.evaluate(formula_inputs(outputs, attrs, weights[0]), n)
            t_w = median_us(lambda: rule_weight(attrs, rules, TODAY), 200)  # noqa: B023
            t_f = median_us(
                lambda: formula.evaluate(formula_inputs(outputs, attrs, weights[0]), n),  # noqa: B023
                200,
            )
            t_r = median_us(
                lambda: rerank(scores, attrs, exposures, rules, SIZE, TODAY, weights=weights),  # noqa: B023
                100 if n_cat > 1 else 20,
            )
            res = rerank(scores, attrs, exposures, rules, SIZE, TODAY, weights=weights)
            print(
                f"N={n:5d} size={SIZE} {label:38s} rule_weight {t_w:7.1f} us  "
                f"fusion {t_f:7.1f} us  rerank {t_r:8.1f} us  "
                f"(moved {res.counts['diversity_moved']}, "
                f"fallback {res.counts['diversity_fallback']})"
            )


if __name__ == "__main__":
    main()
