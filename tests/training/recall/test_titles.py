"""Titles carry the item's category, brand and quality, and are deterministic by seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from training.titles import (
    GOOD_WORDS,
    POOR_WORDS,
    TITLES_FILE,
    brand_words,
    category_nouns,
    make_titles,
)


def _items(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    category = rng.integers(0, 50, n)
    return category, category * 6 + rng.integers(0, 6, n), rng.random(n)


def test_category_words_identify_the_category() -> None:
    category, brand, quality = _items(3000)
    titles = make_titles(category, brand, quality, seed=1)
    nouns = category_nouns(50)
    owner = {w: c for c, ws in enumerate(nouns) for w in ws}
    # the majority vote of a title's category nouns recovers the category (noise: ~10% swapped)
    guessed = []
    for t in titles:
        cats = [owner[w] for w in t.split() if w in owner]
        guessed.append(max(set(cats), key=cats.count))
    accuracy = np.mean(np.array(guessed) == category)
    assert 0.85 < accuracy < 0.99  # informative, and noisy as documented


def test_titles_of_one_category_share_words_and_others_rarely_do() -> None:
    category, brand, quality = _items(2000)
    titles = [set(t.split()) for t in make_titles(category, brand, quality, seed=2)]
    nouns = {w for ws in category_nouns(50) for w in ws}
    same, other = [], []
    for i in range(300):
        for j in range(i + 1, 300):
            shared = len(titles[i] & titles[j] & nouns) > 0
            (same if category[i] == category[j] else other).append(shared)
    # a title names 1-2 of its category's 4 nouns: two titles of a category share one ~45% of the
    # time; titles of different categories only through the 10% of swapped nouns
    assert np.mean(same) > 0.35
    assert np.mean(other) < 0.05


def test_brand_and_quality_words() -> None:
    category, brand, quality = _items(2000)
    titles = make_titles(category, brand, quality, seed=3)
    words = brand_words(int(brand.max()) + 1, {w for ws in category_nouns(50) for w in ws})
    shows_brand = np.mean([words[b] in t.split() for b, t in zip(brand, titles, strict=True)])
    assert 0.7 < shows_brand < 0.9
    good = np.array([any(w in t.split() for w in GOOD_WORDS) for t in titles])
    poor = np.array([any(w in t.split() for w in POOR_WORDS) for t in titles])
    assert good[quality >= 0.7].all() and not good[quality < 0.7].any()
    assert poor[quality <= 0.35].all() and not poor[quality > 0.35].any()


def test_deterministic_by_seed_and_lengths_vary() -> None:
    category, brand, quality = _items(500)
    a = make_titles(category, brand, quality, seed=5)
    assert a == make_titles(category, brand, quality, seed=5)
    assert a != make_titles(category, brand, quality, seed=6)
    lengths = {len(t.split()) for t in a}
    assert min(lengths) >= 1 and max(lengths) <= 12 and len(lengths) >= 6


def test_generator_writes_titles_for_every_item(recall_dir: Path) -> None:
    titles = pq.read_table(recall_dir / TITLES_FILE)
    items = pq.read_table(recall_dir / "items.parquet", columns=["item_id"])
    assert titles.schema.field("item_id").type == "int64"
    assert titles.column("item_id").to_pylist() == items.column("item_id").to_pylist()
    assert all(t for t in titles.column("title").to_pylist())
    assert json.loads((recall_dir / "meta.json").read_text())["files"]["titles"] == TITLES_FILE
