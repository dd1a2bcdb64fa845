"""Micro-benchmark of feature assembly (service/features/assemble.py), the pure core of the
feature stage: one user record, N item records and a context -> the model's two input matrices.

Prints the best-of-R wall time for N items on a spec shaped like the e-commerce model's (10
sparse and 4 dense fields from all three sources), the time per item, and the ratio to
assembling the same items one call per item. The per-call column is the cost a Python loop over
items would pay; a ratio far above 1 is what "vectorised" means here. (This replaces a unit-test
assertion that 2,000 items assemble in under 5 ms: a wall-clock budget is a benchmark's figure,
not a test's verdict, on a shared machine.)

    .venv/bin/python -m bench.assemble_bench [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from mtrank.snapshot import item_dtype, user_dtype
from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput
from service.features.assemble import Assembler

CONTEXT = {"device": "ios", "hour": 21}


def ecommerce_like_spec() -> FeatureSpec:
    """The e-commerce model's layout: 4 user, 4 item and 2 context sparse fields; 4 dense."""

    def vocab(prefix: str, n: int) -> list[str]:
        return [f"{prefix}{k}" for k in range(n)]

    sparse = [
        SparseField(name="user_id", source="user", vocab=vocab("u", 5000)),
        SparseField(name="age_bucket", source="user", vocab=vocab("a", 7)),
        SparseField(name="city_tier", source="user", vocab=vocab("c", 4)),
        SparseField(name="gender", source="user", vocab=vocab("g", 3)),
        SparseField(name="item_id", source="item", vocab=vocab("i", 20000)),
        SparseField(name="category", source="item", vocab=vocab("k", 50)),
        SparseField(name="brand", source="item", vocab=vocab("b", 300)),
        SparseField(name="promoted", source="item", vocab=["0", "1"]),
        SparseField(name="hour", source="context", vocab=[str(h) for h in range(24)]),
        SparseField(name="device", source="context", vocab=["ios", "android", "web"]),
    ]
    dense = [
        DenseField(name="user_activity", source="user", mean=1.0, std=0.5, default=1.0, log1p=True),
        DenseField(
            name="past_purchases", source="user", mean=0.5, std=0.5, default=0.0, log1p=True
        ),
        DenseField(name="price", source="item", mean=3.5, std=1.0, default=30.0, log1p=True),
        DenseField(name="quality", source="item", mean=0.5, std=0.25, default=0.5),
    ]
    return FeatureSpec(sparse=sparse, dense=dense, outputs=[TaskOutput(name="ctr", kind="binary")])


def records(spec: FeatureSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    user = np.zeros((), dtype=user_dtype(spec))
    user["sparse"] = rng.integers(0, 3, len(user["sparse"]))
    user["dense"] = rng.normal(size=len(user["dense"]))
    items = np.zeros(n, dtype=item_dtype(spec))
    items["sparse"] = rng.integers(0, 50, items["sparse"].shape)
    items["dense"] = rng.normal(size=items["dense"].shape)
    items["price"] = rng.lognormal(3.0, 1.0, n)
    return user, items


def best_s(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke test)")
    args = p.parse_args(argv)
    spec = ecommerce_like_spec()
    asm = Assembler(spec)
    rng = np.random.default_rng(0)
    sizes, repeat = ((100, 2000), 3) if args.quick else ((100, 500, 2000, 10_000), 20)
    speed = best_s(lambda: sum(range(1000)), 200)
    print(f"machine speed reference: sum(range(1000)) = {speed * 1e6:.1f} us")
    header = ("items", 6), ("assemble", 11), ("per item", 10), ("one call per item", 18)
    print(" ".join(f"{h:>{w}s}" for h, w in header), f"{'ratio':>7s}")
    for n in sizes:
        user, items = records(spec, n, rng)
        whole = best_s(lambda: asm.assemble(user, items, CONTEXT), repeat)  # noqa: B023
        rows = min(n, 500)  # the per-item loop is slow: time 500 calls and scale
        each = best_s(
            lambda: [asm.assemble(user, items[k : k + 1], CONTEXT) for k in range(rows)],  # noqa: B023
            max(1, repeat // 5),
        ) * (n / rows)
        print(
            f"{n:6d} {whole * 1e3:8.3f} ms {whole / n * 1e6:7.2f} us "
            f"{each * 1e3:15.1f} ms {each / whole:7.0f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
