"""Synthetic item titles whose words carry the item's category, brand and quality.

A title is a bag of lower-case tokens in a loose product-listing order::

    [brand] [quality adjectives] [category nouns] [filler words]

- each of the 50 categories owns four nouns (pseudo-words from a fixed lexicon), of which a title
  uses one or two, so two items of a category share words and items of different categories
  rarely do;
- each brand owns one brand word, shown in 80% of titles;
- quality picks the adjectives: good items read "premium", "durable", ..., poor ones "cheap",
  "basic", ..., middling ones a neutral word or none;
- filler words ("new", "set", colours, sizes) carry no signal and make lengths vary (1 to 12);
- noise: 10% of titles swap one category noun for another category's (mislabelled listings).

So a text tower can learn an item's category, brand and quality from its title alone, which is
what lets it embed an item that no user has clicked yet. The lexicon is fixed (the same words for
every data set); which words a title uses is deterministic by seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TITLES_FILE = "titles.parquet"
NOUNS_PER_CATEGORY = 4
BRAND_SHOWN = 0.8
NOISE = 0.1
GOOD_WORDS = ("premium", "durable", "genuine", "deluxe", "professional", "handmade")
POOR_WORDS = ("cheap", "basic", "budget", "lightweight", "economy", "simple")
NEUTRAL_WORDS = ("classic", "standard", "everyday", "modern")
FILLER_WORDS = (
    "new", "set", "pack", "for", "with", "home", "black", "white", "red", "blue", "large",
    "small", "2025", "edition", "style", "gift", "original", "kit",
)  # fmt: skip
_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "be", "du", "fa", "go", "hu", "pe")


def _lexicon(n: int, rng: np.random.Generator, reserved: set[str]) -> list[str]:
    """``n`` distinct pseudo-words of 2-3 syllables, none in ``reserved``."""
    words: list[str] = []
    seen = set(reserved)
    while len(words) < n:
        k = int(rng.integers(2, 4))
        w = "".join(rng.choice(_SYLLABLES, size=k))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def category_nouns(n_categories: int) -> list[list[str]]:
    """The fixed nouns of each category (the same for every data set)."""
    rng = np.random.default_rng(20_250_101)
    words = _lexicon(n_categories * NOUNS_PER_CATEGORY, rng, set())
    return [
        words[c * NOUNS_PER_CATEGORY : (c + 1) * NOUNS_PER_CATEGORY] for c in range(n_categories)
    ]


def brand_words(n_brands: int, reserved: set[str]) -> list[str]:
    """The fixed word of each brand, distinct from every category noun."""
    rng = np.random.default_rng(20_250_102)
    return ["x" + w for w in _lexicon(n_brands, rng, reserved)]


def make_titles(
    category: np.ndarray, brand: np.ndarray, quality: np.ndarray, seed: int
) -> list[str]:
    """One title per item (space-separated tokens); category and brand are non-negative codes."""
    n = len(category)
    if not len(brand) == len(quality) == n:
        raise ValueError("category, brand and quality must have the same length")
    if n == 0:
        return []
    nouns = category_nouns(int(category.max()) + 1)
    reserved = {w for ws in nouns for w in ws}
    brands = brand_words(int(brand.max()) + 1, reserved)
    rng = np.random.default_rng([seed, 2])  # a stream of its own: other draws stay unchanged
    titles = []
    for c, b, q in zip(category.tolist(), brand.tolist(), quality.tolist(), strict=True):
        own = nouns[c]
        words = list(rng.choice(own, size=int(rng.integers(1, 3)), replace=False))
        if rng.random() < NOISE:
            other = nouns[int(rng.integers(len(nouns)))]
            words[0] = str(rng.choice(other))
        adjectives = _adjectives(q, rng)
        filler = list(rng.choice(FILLER_WORDS, size=int(rng.integers(0, 6)), replace=False))
        head = [brands[b]] if rng.random() < BRAND_SHOWN else []
        titles.append(" ".join(head + adjectives + words + filler))
    return titles


def _adjectives(quality: float, rng: np.random.Generator) -> list[str]:
    """Two words for clearly good or poor items, one or none for middling ones."""
    if quality >= 0.7:
        return list(rng.choice(GOOD_WORDS, size=int(rng.integers(1, 3)), replace=False))
    if quality <= 0.35:
        return list(rng.choice(POOR_WORDS, size=int(rng.integers(1, 3)), replace=False))
    return [str(rng.choice(NEUTRAL_WORDS))] if rng.random() < 0.5 else []


def write_titles(
    path: Path,
    item_id: np.ndarray,
    category: np.ndarray,
    brand: np.ndarray,
    quality: np.ndarray,
    seed: int,
) -> Path:
    """Write ``titles.parquet``: item_id int64, title string (space-separated tokens)."""
    titles = make_titles(np.asarray(category), np.asarray(brand), np.asarray(quality), seed)
    table = pa.table(
        {"item_id": pa.array(np.asarray(item_id, dtype=np.int64)), "title": pa.array(titles)}
    )
    pq.write_table(table, path)
    return Path(path)
