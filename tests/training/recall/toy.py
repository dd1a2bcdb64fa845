"""A tiny click log where personalisation clearly pays: every user sticks to one category.

600 users, 20 categories of 20 items. A user clicks items of their own category 90% of the time
(by within-category popularity) and a globally popular item otherwise, so the best list for a
user is their category's items, while the global popularity list holds all categories' heads.
Written in the generator's layout (splits by time, users/items/titles.parquet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.titles import TITLES_FILE, write_titles

N_USERS, N_CATEGORIES, PER_CATEGORY, CLICKS_PER_USER = 600, 20, 20, 12


def write_toy_world(out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_items = N_CATEGORIES * PER_CATEGORY
    item_id = np.arange(5001, 5001 + n_items, dtype=np.int64)
    category = np.repeat(np.arange(N_CATEGORIES), PER_CATEGORY).astype(np.int64)
    brand = category * 3 + rng.integers(0, 3, n_items)
    quality = rng.random(n_items)
    popularity = rng.lognormal(0.0, 1.0, n_items)
    pq.write_table(
        pa.table({"item_id": item_id, "category": category, "brand": brand,
                  "price": np.round(rng.lognormal(3.0, 0.5, n_items), 2), "quality": quality}),
        out / "items.parquet",
    )  # fmt: skip
    write_titles(out / TITLES_FILE, item_id, category, brand, quality, seed)
    user_id = np.arange(1, N_USERS + 1, dtype=np.int64)
    liked = rng.integers(0, N_CATEGORIES, N_USERS)
    users = {
        "user_id": user_id,
        "age_bucket": rng.integers(0, 7, N_USERS),
        "city_tier": rng.integers(1, 5, N_USERS),
        "gender": rng.choice(["F", "M"], N_USERS),
    }
    pq.write_table(pa.table(users), out / "users.parquet")

    rows = []
    for u in range(N_USERS):
        own = np.flatnonzero(category == liked[u])
        p_own = popularity[own] / popularity[own].sum()
        for _ in range(CLICKS_PER_USER):
            if rng.random() < 0.9:
                rows.append((u, int(rng.choice(own, p=p_own))))
            else:
                rows.append((u, int(rng.choice(n_items, p=popularity / popularity.sum()))))
    u_idx = np.array([r[0] for r in rows])
    i_idx = np.array([r[1] for r in rows])
    ts = rng.random(len(rows))  # clicks are spread over time at random
    order = np.argsort(ts, kind="stable")
    u_idx, i_idx, ts = u_idx[order], i_idx[order], (ts[order] * 1e6).astype(np.int64)
    table = {
        "ts": ts,
        "user_id": user_id[u_idx],
        "item_id": item_id[i_idx],
        "click": np.ones(len(ts), np.int8),
        "purchase": (rng.random(len(ts)) < 0.1).astype(np.int8),
    }
    table |= {k: users[k][u_idx] for k in ("age_bucket", "city_tier", "gender")}
    n = len(ts)
    bounds = {
        "train": (0, int(0.7 * n)),
        "valid": (int(0.7 * n), int(0.85 * n)),
        "test": (int(0.85 * n), n),
    }
    for split, (lo, hi) in bounds.items():
        pq.write_table(pa.table({k: v[lo:hi] for k, v in table.items()}), out / f"{split}.parquet")
    return out
