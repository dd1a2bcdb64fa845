"""A hand-written feature spec and a random snapshot for unit tests of the contract and stores.

No model here: tests that score anything use the model the training pipeline exported
(tests/conftest.py, tests/support/exported.py). These tests exercise what needs no model (feature
assembly, snapshot records and Redis keys, the stores) on a small spec whose fields come from every
source, interleaved so column order matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.snapshot import Snapshot, item_dtype, user_dtype
from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput

OUTPUTS = ("ctr", "cvr", "stay", "cart", "collect")


def make_spec(outputs: Sequence[str] = OUTPUTS) -> FeatureSpec:
    """A small spec with fields from every source, interleaved so column order matters."""
    return FeatureSpec(
        sparse=[
            SparseField(name="item_id", source="item", vocab=[f"i{k}" for k in range(20)]),
            SparseField(name="user_id", source="user", vocab=[f"u{k}" for k in range(10)]),
            SparseField(name="device", source="context", vocab=["ios", "android", "web"]),
            SparseField(name="category", source="item", vocab=["shoes", "hats", "bags"]),
            SparseField(name="segment", source="user", vocab=["new", "vip"]),
        ],
        dense=[
            DenseField(name="price", source="item", mean=3.0, std=1.5, default=20.0, log1p=True),
            DenseField(name="hour", source="context", mean=12.0, std=7.0, default=12.0),
            DenseField(name="age", source="user", mean=35.0, std=10.0, default=30.0),
            DenseField(name="quality_score", source="item", mean=0.5, std=0.2, default=0.5),
        ],
        outputs=[
            TaskOutput(name=o, kind="regression" if o == "stay" else "binary") for o in outputs
        ],
    )


def build_test_snapshot(
    spec: FeatureSpec, n_users: int, n_items: int, seed: int = 0, version: str | None = None
) -> Snapshot:
    """Users ``u0..`` and items ``i0..`` with random raw attributes encoded per ``spec``."""
    rng = np.random.default_rng(seed)

    def raw_entity(source: str, k: int) -> dict[str, object]:
        sparse, dense = spec.fields(source)  # type: ignore[arg-type]
        raw: dict[str, object] = {}
        for f in sparse:  # some values unseen by the vocabulary -> OOV
            raw[f.name] = f.vocab[k % len(f.vocab)] if rng.random() < 0.8 else "unseen"
        for g in dense:
            raw[g.name] = float(rng.uniform(0.0, 50.0)) if rng.random() < 0.9 else None
        return raw

    users = np.zeros(n_users, dtype=user_dtype(spec))
    for k in range(n_users):
        users["sparse"][k], users["dense"][k] = spec.encode_entity("user", raw_entity("user", k))
    items = np.zeros(n_items, dtype=item_dtype(spec))
    for k in range(n_items):
        items["sparse"][k], items["dense"][k] = spec.encode_entity("item", raw_entity("item", k))
    for name, dtype in ITEM_ATTRIBUTES.record_fields():
        low, high = (0, 50) if name != "promoted" else (0, 2)
        items[name] = rng.uniform(low, high, n_items).astype(dtype)
    return Snapshot(
        spec_sha256=spec.sha256(),
        version=version or f"snap-{seed}",
        user_ids=np.array([f"u{k}" for k in range(n_users)]),
        users=users,
        item_ids=np.array([f"i{k}" for k in range(n_items)]),
        items=items,
        attribute_tables={"category": ["shoes", "hats", "bags"]},
    )
