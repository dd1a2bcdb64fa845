"""Approximate nearest-neighbour indexes for the recall stage: faiss against hnswlib, measured.

Items are synthetic clustered vectors (a seeded Gaussian mixture, every vector scaled to unit
norm so that inner product is cosine, as for a two-tower model with normalised outputs); queries
are fresh draws from the same mixture. For each index and parameter setting:

- **recall@100**: the share of the exact inner-product top-100 (faiss ``IndexFlatIP``) that the
  index returns, averaged over the queries;
- **latency**: one query at a time on ONE thread (``faiss.omp_set_num_threads(1)``, hnswlib
  ``num_threads=1``), k=100, p50 and p99 over the timed queries;
- **build**: wall time of training + adding every item, on ``--build-threads`` threads (the
  build is an offline job; two is all this machine has);
- **memory**: the serialised index's size and the resident-memory (VmRSS) growth over the build,
  both per million items.

Two stages. The *sweep* (``--sweep-n`` items, 100k by default) tries two build settings per
graph library and a few query settings per build, because a 1M HNSW build takes minutes on two
shared cores. The *full* stage (``--n`` items, 1M by default) builds one candidate per method
with the build settings fixed up front, sweeps its query settings, and measures the filters the
recall stage needs: an exclusion list (already-seen items, half of them inside the true top-100)
and a category allow-list, each in the query (faiss ``IDSelector``, hnswlib ``filter``) and, for
faiss, by over-fetching and dropping afterwards.

    nice -n 10 .venv/bin/python -m bench.ann_index            # about 15 min on the shared machine
    .venv/bin/python -m bench.ann_index --quick               # small sizes, < 1 min smoke test

The full stage's HNSW build is set with ``--hnsw-m`` / ``--hnsw-ef-construction`` and its query
sweep with ``--hnsw-ef-search``. ``--hnsw-only`` runs that one build and nothing else (no sweep,
no exact, hnswlib or IVF rows, no filters; the exact ground truth is still computed) and writes
``ann_index_hnsw_m{M}_efc{efConstruction}.json``, so the full run's file stays::

    nice -n 10 .venv/bin/python -m bench.ann_index --hnsw-only --hnsw-m 32 \
        --hnsw-ef-construction 100 --hnsw-ef-search 128 160 192 224 256 384 512
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import argv_of, base_parser, format_table, output_paths, write_result

D = 64
K = 100
N_CLUSTERS = 1000
NOISE = 1.0  # norm of the within-cluster noise relative to a unit-norm centre (see the doc)
N_CATEGORIES = 100
N_EXCLUDE = 200  # "already seen" items per query, half of them (50) taken from its true top-100


# ------------------------------------------------------------------ data
def mixture(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors: a random centre plus isotropic noise of norm about NOISE."""
    out = np.empty((n, D), dtype=np.float32)
    step = 100_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = centres[rng.integers(0, len(centres), hi - lo)]  # (b, D)
        x = c + (NOISE / np.sqrt(D)) * rng.standard_normal((hi - lo, D), dtype=np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_data(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CLUSTERS, D), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return mixture(n, centres, rng), mixture(n_queries, centres, rng)


def exact_topk(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k labels (nq, k), on every thread allowed."""
    import faiss

    flat = faiss.IndexFlatIP(D)
    flat.add(items)
    _, labels = flat.search(queries, k)
    return labels


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / |truth| (-1 padding in ``found`` never matches)."""
    hits = [len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


# ------------------------------------------------------------------ measuring
def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def latency_ms(search_one: Callable[[int], object], n: int) -> dict[str, float]:
    """p50 / p99 / mean of ``search_one(i)`` for i < n, in milliseconds (after 20 warm-ups)."""
    for i in range(min(20, n)):
        search_one(i)
    times = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        search_one(i)
        times[i] = time.perf_counter() - t0
    return {
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "mean_ms": float(times.mean() * 1e3),
        "queries_timed": n,
    }


@dataclass
class Built:
    """A built index and what building it cost."""

    method: str
    build: dict[str, Any]  # build parameters
    index: Any
    build_s: float
    rss_delta_bytes: int
    file_bytes: int
    search: Callable[..., np.ndarray]  # (queries, k, query params, threads) -> labels (nq, k)


def file_size(save: Callable[[str], None]) -> int:
    with tempfile.TemporaryDirectory(prefix="ann-bench-") as tmp:
        path = os.path.join(tmp, "index.bin")
        save(path)
        return os.path.getsize(path)


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so the next RSS delta is not hidden by reuse."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def timed_build(make: Callable[[], Any]) -> tuple[Any, float, int]:
    release_freed_memory()
    before = rss_bytes()
    t0 = time.perf_counter()
    index = make()
    seconds = time.perf_counter() - t0
    gc.collect()
    return index, seconds, rss_bytes() - before


# ------------------------------------------------------------------ the indexes
def build_faiss(method: str, params: dict[str, Any], items: np.ndarray, threads: int) -> Built:
    import faiss

    faiss.omp_set_num_threads(threads)

    def make() -> Any:
        if method == "faiss-flat":
            index = faiss.IndexFlatIP(D)
        elif method == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(D, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["efConstruction"]
        elif method == "faiss-ivf-flat":
            quantizer = faiss.IndexFlatIP(D)
            index = faiss.IndexIVFFlat(quantizer, D, params["nlist"], faiss.METRIC_INNER_PRODUCT)
            index.train(items)
        elif method == "faiss-ivf-pq":
            quantizer = faiss.IndexFlatIP(D)
            index = faiss.IndexIVFPQ(
                quantizer, D, params["nlist"], params["m"], 8, faiss.METRIC_INNER_PRODUCT
            )
            index.train(items)
        else:
            raise ValueError(method)
        index.add(items)
        return index

    index, seconds, rss = timed_build(make)

    def search(q: np.ndarray, k: int, query: dict[str, Any], n_threads: int, sel: Any = None):
        faiss.omp_set_num_threads(n_threads)
        if "efSearch" in query:
            sp = faiss.SearchParametersHNSW(efSearch=query["efSearch"], sel=sel)
        elif "nprobe" in query:
            sp = faiss.SearchParametersIVF(nprobe=query["nprobe"], sel=sel)
        else:
            sp = faiss.SearchParameters(sel=sel) if sel is not None else None
        return index.search(q, k, params=sp)[1]

    size = file_size(lambda p: faiss.write_index(index, p))
    return Built(method, params, index, seconds, rss, size, search)


def build_hnswlib(params: dict[str, Any], items: np.ndarray, threads: int) -> Built:
    import hnswlib

    def make() -> Any:
        index = hnswlib.Index(space="ip", dim=D)
        index.init_index(
            max_elements=len(items), M=params["M"], ef_construction=params["ef_construction"]
        )
        index.add_items(items, np.arange(len(items)), num_threads=threads)
        return index

    index, seconds, rss = timed_build(make)

    def search(q: np.ndarray, k: int, query: dict[str, Any], n_threads: int, sel: Any = None):
        index.set_ef(query["ef"])  # index-global: not per query (see docs/recall_index.md)
        try:
            labels, _ = index.knn_query(q, k=k, num_threads=n_threads, filter=sel)
        except RuntimeError:  # hnswlib raises when it finds fewer than k (restrictive filter)
            return np.full((len(q), k), -1, dtype=np.int64)
        return labels.astype(np.int64)

    size = file_size(index.save_index)
    return Built("hnswlib", params, index, seconds, rss, size, search)


def build(method: str, params: dict[str, Any], items: np.ndarray, threads: int) -> Built:
    if method == "hnswlib":
        return build_hnswlib(params, items, threads)
    return build_faiss(method, params, items, threads)


# ------------------------------------------------------------------ one measurement
def measure(
    built: Built,
    query: dict[str, Any],
    queries: np.ndarray,
    truth: np.ndarray,
    n_items: int,
    n_timed: int,
) -> dict[str, Any]:
    found = built.search(queries, K, query, 2)  # recall: batch on two threads, same results
    lat = latency_ms(lambda i: built.search(queries[i : i + 1], K, query, 1), n_timed)
    per_million = 1e6 / n_items
    return {
        "method": built.method,
        "n_items": n_items,
        "build_params": built.build,
        "query_params": query,
        "recall_at_100": recall_at(found, truth[:, :K]),
        **lat,
        "build_s": built.build_s,
        "index_mb_per_million": built.file_bytes * per_million / 2**20,
        "rss_delta_mb_per_million": built.rss_delta_bytes * per_million / 2**20,
    }


def measure_all(
    methods: list[tuple[str, dict[str, Any], list[dict[str, Any]]]],
    items: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    args: Any,
    stage: str,
) -> Iterator[tuple[Built, dict[str, Any]]]:
    for method, params, query_settings in methods:
        print(f"[{stage}] building {method} {params} on {len(items):,} items", flush=True)
        built = build(method, params, items, args.build_threads)
        print(f"  built in {built.build_s:.1f}s", flush=True)
        for query in query_settings:
            n_timed = args.exact_timed if method == "faiss-flat" else args.timed
            row = measure(built, query, queries, truth, len(items), n_timed)
            row["stage"] = stage
            print(
                f"  {query}: recall@100 {row['recall_at_100']:.4f}  "
                f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms",
                flush=True,
            )
            yield built, row
        del built
        release_freed_memory()


# ------------------------------------------------------------------ filters
def exclusion_lists(truth: np.ndarray, n_items: int, seed: int) -> list[np.ndarray]:
    """Per query: 50 of its true top-100 plus 150 random items (labels, sorted, unique)."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for row in truth:
        seen = rng.choice(row[:K], N_EXCLUDE // 4, replace=False)
        rand = rng.integers(0, n_items, N_EXCLUDE - len(seen))
        out.append(np.unique(np.concatenate([seen, rand])))
    return out


def filtered_truth(truth: np.ndarray, excluded: list[np.ndarray]) -> np.ndarray:
    """Exact top-K once ``excluded`` is removed: truth holds K + N_EXCLUDE ranks, enough."""
    return np.stack(
        [t[~np.isin(t, e)][:K] for t, e in zip(truth, excluded, strict=True)]
    )  # fmt: skip


def measure_filters(
    built: Built,
    query: dict[str, Any],
    items: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    categories: np.ndarray,
    args: Any,
) -> list[dict[str, Any]]:
    """Exclusion list and category allow-list on one built index (labels = row numbers)."""
    import faiss

    n = len(items)
    nq = args.filter_queries
    excluded = exclusion_lists(truth[:nq], n, args.seed)
    ex_truth = filtered_truth(truth[:nq], excluded)
    rows: list[dict[str, Any]] = []
    # category allow-list: ~5% of the catalogue (5 of 100 equally likely categories)
    allowed_mask = np.isin(categories, np.arange(5))

    def row(kind: str, how: str, found: np.ndarray, want: np.ndarray, lat: dict[str, float]):
        leaked = sum(
            int(np.isin(f, e).sum()) for f, e in zip(found, excluded, strict=True)
        ) if kind == "exclude" else int((~allowed_mask[found[found >= 0]]).sum())  # fmt: skip
        r = {
            "method": built.method,
            "build_params": built.build,
            "query_params": query,
            "filter": kind,
            "how": how,
            "recall_at_100": recall_at(found, want),
            "violations": leaked,
            **lat,
        }
        print(
            f"  [{kind} / {how}] recall@100 {r['recall_at_100']:.4f}  violations {leaked}  "
            f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms",
            flush=True,
        )
        rows.append(r)

    allowed_labels = np.flatnonzero(allowed_mask)
    sub = items[allowed_labels]
    cat_truth = allowed_labels[np.argsort(-(queries[:nq] @ sub.T), axis=1)[:, :K]]

    if built.method == "hnswlib":
        sets = [set(e.tolist()) for e in excluded]

        def ex_hnsw(i: int) -> np.ndarray:
            s = sets[i]
            return built.search(queries[i : i + 1], K, query, 1, lambda label: label not in s)[0]

        found = np.stack([ex_hnsw(i) for i in range(nq)])
        row("exclude", "filter callable", found, ex_truth, latency_ms(ex_hnsw, nq))

        def cat_hnsw(i: int) -> np.ndarray:
            return built.search(
                queries[i : i + 1], K, query, 1, lambda label: bool(allowed_mask[label])
            )[0]

        found = np.stack([cat_hnsw(i) for i in range(nq)])
        row("category 5%", "filter callable", found, cat_truth, latency_ms(cat_hnsw, nq))
        return rows

    def ex_selector(i: int) -> np.ndarray:
        e = excluded[i]
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(e), faiss.swig_ptr(e)))
        return built.search(queries[i : i + 1], K, query, 1, sel)[0]

    found = np.stack([ex_selector(i) for i in range(nq)])
    row("exclude", "IDSelector", found, ex_truth, latency_ms(ex_selector, nq))

    def ex_overfetch(i: int) -> np.ndarray:
        e = excluded[i]
        got = built.search(queries[i : i + 1], K + len(e), query, 1)[0]
        return got[~np.isin(got, e)][:K]

    if "efSearch" in query:

        def ex_selector_wide(i: int) -> np.ndarray:
            e = excluded[i]
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(e), faiss.swig_ptr(e)))
            wide = {"efSearch": max(query["efSearch"], K + len(e))}
            return built.search(queries[i : i + 1], K, wide, 1, sel)[0]

        found = np.stack([ex_selector_wide(i) for i in range(nq)])
        lat = latency_ms(ex_selector_wide, nq)
        row("exclude", "IDSelector, efSearch >= k+|excluded|", found, ex_truth, lat)

    found = np.stack([ex_overfetch(i) for i in range(nq)])
    row("exclude", "over-fetch k+|excluded|", found, ex_truth, latency_ms(ex_overfetch, nq))

    bitmap = np.packbits(allowed_mask, bitorder="little")  # built once per allow-list
    sel_cat = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # n = bytes

    def cat_selector(i: int) -> np.ndarray:
        return built.search(queries[i : i + 1], K, query, 1, sel_cat)[0]

    found = np.stack([cat_selector(i) for i in range(nq)])
    row("category 5%", "IDSelector", found, cat_truth, latency_ms(cat_selector, nq))

    if built.method == "faiss-hnsw":
        storage = faiss.downcast_index(built.index.storage)  # the flat vectors inside HNSW
        exact_sp = faiss.SearchParameters(sel=sel_cat)
        faiss.omp_set_num_threads(1)

        def cat_exact(i: int) -> np.ndarray:
            return storage.search(queries[i : i + 1], K, params=exact_sp)[1][0]

        found = np.stack([cat_exact(i) for i in range(nq)])
        row("category 5%", "exact scan of the allowed", found, cat_truth, latency_ms(cat_exact, nq))
    return rows


# ------------------------------------------------------------------ the plan
def plans(
    quick: bool, hnsw_build: dict[str, int], hnsw_ef_search: list[int], hnsw_only: bool
) -> tuple[list[Any], list[Any]]:
    """(sweep, full): (method, build params, [query params], measure filters?) per build.

    hnswlib is measured at the sweep size only: a 1M hnswlib build costs about 15 min of this
    shared machine, and the sweep already shows where it stands (docs/recall_index.md). The full
    stage's faiss HNSW build is ``hnsw_build`` queried at ``hnsw_ef_search``; with ``hnsw_only``
    it is the whole plan, unfiltered (a 1M build with a wide efConstruction fills the time).
    """
    hnsw_q = [{"efSearch": e} for e in (128, 256, 512)]
    full_hnsw = ("faiss-hnsw", hnsw_build, [{"efSearch": e} for e in hnsw_ef_search])
    if hnsw_only:
        return [], [(*full_hnsw, False)]
    hnswlib_q = [{"ef": e} for e in (128, 256, 512)]
    sweep = [
        ("faiss-hnsw", {"M": 16, "efConstruction": 80}, hnsw_q, False),
        ("faiss-hnsw", {"M": 32, "efConstruction": 40}, hnsw_q, True),
        ("hnswlib", {"M": 16, "ef_construction": 100}, hnswlib_q, True),
        ("faiss-ivf-flat", {"nlist": 1024}, [{"nprobe": p} for p in (8, 16, 32)], False),
        ("faiss-ivf-pq", {"nlist": 1024, "m": 32}, [{"nprobe": p} for p in (16, 64)], False),
    ]
    full = [
        ("faiss-flat", {}, [{}], False),
        (*full_hnsw, True),
        ("faiss-ivf-flat", {"nlist": 1024}, [{"nprobe": p} for p in (16, 32, 64)], True),
    ]
    if quick:
        sweep = [s for s in sweep if s[0] != "faiss-ivf-pq"]
        sweep = [(m, {**b, "nlist": 64} if "nlist" in b else b, q, f) for m, b, q, f in sweep]
        full = [(m, {**b, "nlist": 128} if "nlist" in b else b, q, f) for m, b, q, f in full]
    return sweep, full


def run_stage(plan: list[Any], n: int, stage: str, args: Any) -> list[dict[str, Any]]:
    """Every build of ``plan`` on ``n`` fresh items; filters at each flagged build's middle
    query setting (its operating point)."""
    items, queries = make_data(n, args.queries, args.seed)
    categories = np.random.default_rng(args.seed + 2).integers(0, N_CATEGORIES, n)
    t0 = time.perf_counter()
    truth = exact_topk(items, queries, K + N_EXCLUDE)
    print(f"[{stage}] exact top-{K + N_EXCLUDE}: {time.perf_counter() - t0:.1f}s", flush=True)
    rows: list[dict[str, Any]] = []
    for method, params, query_settings, filters in plan:
        for built, row in measure_all(
            [(method, params, query_settings)], items, queries, truth, args, stage
        ):
            rows.append(row)
            if filters and row["query_params"] == query_settings[len(query_settings) // 2]:
                found = measure_filters(
                    built, row["query_params"], items, queries, truth, categories, args
                )
                rows += [{**r, "stage": stage, "n_items": n} for r in found]
    return rows


def adapter_stage(n: int, args: Any) -> list[dict[str, Any]]:
    """The service's RecallIndex (built by training's build_index) under a 4% allow-list, the
    case it answers with a numpy scan of the allowed rows; a flat index, as that path does not
    depend on the index type and a flat 1M build takes a second rather than minutes."""
    from mtrank.recall_index import FlatParams
    from service.recall.index import RecallIndex
    from training.recall.index_build import build_index

    items, queries = make_data(n, args.filter_queries, args.seed)
    ids = np.arange(-1, n, dtype=np.int64)  # row 0 is OOV, label j is item j
    emb = np.vstack([np.zeros((1, D), np.float32), items])
    categories = np.random.default_rng(args.seed + 2).integers(0, N_CATEGORIES, n)
    allow = set(range(4))
    with tempfile.TemporaryDirectory(prefix="ann-adapter-") as tmp:
        build_index(emb, ids, Path(tmp) / "idx", params=FlatParams())
        index = RecallIndex.load(Path(tmp) / "idx").with_categories(ids[1:], categories)
    ok = np.isin(categories, list(allow))
    truth = [np.flatnonzero(ok)[np.argsort(-(items[ok] @ q))[:K]] for q in queries]
    found = [
        index.search(queries[i : i + 1], K, allow_categories=allow)[0][0]
        for i in range(len(queries))
    ]
    lat = latency_ms(
        lambda i: index.search(queries[i : i + 1], K, allow_categories=allow), len(queries)
    )
    row = {"stage": "adapter", "method": "RecallIndex (service)", "n_items": n,
           "build_params": {"kind": "flat"}, "query_params": {}, "filter": "category 4%",
           "how": "numpy scan of the allowed rows",
           "recall_at_100": recall_at(np.stack(found), np.stack(truth)),
           "violations": int(sum((~ok[f]).sum() for f in found)), **lat}  # fmt: skip
    print(row, flush=True)
    return [row]


CROSSOVER_K = 500  # /recommend's default recall k
CROSSOVER_SEEN = 8  # items the user has seen, excluded in the query as the service does
EVICT_BYTES = 32 << 20  # written between queries: the ranker's inference does the same to caches


def crossover_stage(sizes: list[int], args: Any) -> list[dict[str, Any]]:
    """Exact (flat) against HNSW through the service's RecallIndex at small catalogues.

    Each query is timed twice: back to back ("warm": the index stays in the core's caches) and
    right after writing EVICT_BYTES ("cold": as in a /recommend request, where the ranker's
    inference of hundreds of candidates runs between two recall queries and evicts the index).
    HNSW pays a beam of at least k=500 nodes per query whatever the catalogue size; an exact
    scan pays the whole catalogue once, in one GEMV: below some size the scan wins, and
    ``publish-recall --index auto`` picks flat up to AUTO_FLAT_MAX_ITEMS
    (training/recall/publish.py).
    """
    from mtrank.recall_index import FlatParams, HnswParams
    from service.recall.index import RecallIndex
    from training.recall.index_build import build_index

    scratch = np.zeros(EVICT_BYTES // 8)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        items, queries = make_data(n, args.filter_queries, args.seed)
        ids = np.arange(-1, n, dtype=np.int64)  # row 0 is OOV, label j is item j
        emb = np.vstack([np.zeros((1, D), np.float32), items])
        rng = np.random.default_rng(args.seed + 3)
        seen = [np.unique(rng.integers(0, n, CROSSOVER_SEEN)) for _ in range(len(queries))]
        truth = exact_topk(items, queries, CROSSOVER_K)
        for kind, params in (("flat", FlatParams()), ("hnsw", HnswParams())):
            with tempfile.TemporaryDirectory(prefix="ann-crossover-") as tmp:
                t0 = time.perf_counter()
                build_index(emb, ids, Path(tmp) / "idx", params=params, threads=args.build_threads)
                build_s = time.perf_counter() - t0
                index = RecallIndex.load(Path(tmp) / "idx")

            def one(
                i: int, index: Any = index, queries: np.ndarray = queries, seen: Any = seen
            ) -> np.ndarray:
                return index.search(queries[i : i + 1], CROSSOVER_K, exclude=[seen[i]])[0]

            found = np.vstack([one(i) for i in range(len(queries))])
            want = [t[~np.isin(t, s)] for t, s in zip(truth, seen, strict=True)]
            warm_lat = latency_ms(one, len(queries))
            times = np.empty(len(queries))
            for i in range(len(queries)):
                scratch.fill(i)
                t1 = time.perf_counter()
                one(i)
                times[i] = time.perf_counter() - t1
            row = {"stage": "crossover", "method": f"RecallIndex {kind}", "n_items": n,
                   "build_params": params.model_dump(mode="json"), "k": CROSSOVER_K,
                   "seen_excluded": CROSSOVER_SEEN, "build_s": round(build_s, 3),
                   "recall_at_500": recall_at(found, want),  # type: ignore[arg-type]
                   "warm_p50_ms": warm_lat["p50_ms"], "warm_p99_ms": warm_lat["p99_ms"],
                   "cold_p50_ms": float(np.percentile(times, 50) * 1e3),
                   "cold_p99_ms": float(np.percentile(times, 99) * 1e3)}  # fmt: skip
            print({k: v for k, v in row.items() if k != "build_params"}, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n")[0], seeds=1)
    p.add_argument("--n", type=int, default=1_000_000, help="items in the full stage")
    p.add_argument("--sweep-n", type=int, default=100_000, help="items in the sweep")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall")
    p.add_argument("--timed", type=int, default=1000, help="single queries timed per setting")
    p.add_argument("--exact-timed", type=int, default=200, help="timed queries, exact search")
    p.add_argument("--filter-queries", type=int, default=300, help="queries per filter case")
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--adapter-only", action="store_true", help="only the service adapter row")
    p.add_argument(
        "--crossover", type=int, nargs="+", default=None, metavar="N",
        help="only flat against HNSW at these catalogue sizes, k=500, warm and cold caches",
    )  # fmt: skip
    p.add_argument("--hnsw-m", type=int, default=32, help="full stage: faiss HNSW M")
    p.add_argument(
        "--hnsw-ef-construction", type=int, default=40, help="full stage: faiss HNSW efConstruction"
    )
    p.add_argument(
        "--hnsw-ef-search", type=int, nargs="+", default=[128, 256, 512],
        help="full stage: faiss HNSW efSearch values (filters at the middle one)",
    )  # fmt: skip
    p.add_argument(
        "--hnsw-only", action="store_true",
        help="only the full stage's faiss HNSW build, unfiltered, to its own results file",
    )  # fmt: skip
    args = p.parse_args(argv_of(argv))
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    hnsw_build = {"M": args.hnsw_m, "efConstruction": args.hnsw_ef_construction}
    if args.quick:
        args.n, args.sweep_n, args.queries, args.timed, args.filter_queries = (
            50_000, 20_000, 200, 200, 100,
        )  # fmt: skip
    started = time.perf_counter()
    sweep_plan, full_plan = plans(args.quick, hnsw_build, args.hnsw_ef_search, args.hnsw_only)
    rows: list[dict[str, Any]] = []
    if args.crossover:
        rows = crossover_stage(args.crossover, args)
        headers = ["catalogue", "index", "recall@500", "warm p50 ms", "cold p50 ms",
                   "cold p99 ms", "build s"]  # fmt: skip
        print(format_table(headers, [
            [r["n_items"], r["method"], r["recall_at_500"], r["warm_p50_ms"], r["cold_p50_ms"],
             r["cold_p99_ms"], r["build_s"]] for r in rows]))  # fmt: skip
        json_path, _ = output_paths("ann_index_crossover", args)
        payload = {"settings": {"dim": D, "k": CROSSOVER_K, "seen": CROSSOVER_SEEN,
                                "evict_bytes": EVICT_BYTES, "queries": args.filter_queries,
                                "seed": args.seed, "load_average_at_start": load_at_start},
                   "rows": rows}  # fmt: skip
        print("wrote", write_result(json_path, "ann_index", argv_of(argv), started, payload))
        return
    if args.adapter_only:
        rows += adapter_stage(args.n, args)
    else:
        if sweep_plan and not args.skip_sweep:
            rows += run_stage(sweep_plan, args.sweep_n, "sweep", args)
        rows += run_stage(full_plan, args.n, "full", args)

    headers = ["stage", "method", "build", "query", "recall@100", "p50 ms", "p99 ms", "build s",
               "index MB/M", "RSS MB/M"]  # fmt: skip
    table = [
        [r["stage"], r["method"], fmt(r["build_params"]), fmt(r["query_params"]),
         r["recall_at_100"], r["p50_ms"], r["p99_ms"], r["build_s"],
         r["index_mb_per_million"], r["rss_delta_mb_per_million"]]
        for r in rows if "filter" not in r
    ]  # fmt: skip
    print(format_table(headers, table))
    ftable = [
        [r["stage"], r["method"], fmt(r["query_params"]), r["filter"], r["how"],
         r["recall_at_100"], r["violations"], r["p50_ms"], r["p99_ms"]]
        for r in rows if "filter" in r
    ]  # fmt: skip
    if ftable:
        print(format_table(["stage", "method", "query", "filter", "how", "recall@100",
                            "violations", "p50 ms", "p99 ms"], ftable))  # fmt: skip

    import faiss
    import hnswlib

    if args.adapter_only:
        name = "ann_index_adapter"
    elif args.hnsw_only:
        name = f"ann_index_hnsw_m{args.hnsw_m}_efc{args.hnsw_ef_construction}"
    else:
        name = "ann_index"
    json_path, _ = output_paths(name, args)
    payload = {
        "settings": {
            "dim": D, "k": K, "clusters": N_CLUSTERS, "noise": NOISE, "n": args.n,
            "sweep_n": args.sweep_n, "queries": args.queries, "timed": args.timed,
            "filter_queries": args.filter_queries, "excluded_per_query": N_EXCLUDE,
            "categories": N_CATEGORIES, "build_threads": args.build_threads,
            "query_threads": 1, "seed": args.seed, "hnsw_build": hnsw_build,
            "hnsw_ef_search": args.hnsw_ef_search, "hnsw_only": args.hnsw_only,
            "load_average_at_start": load_at_start,
            "faiss": faiss.__version__, "hnswlib": getattr(hnswlib, "__version__", "0.8.0"),
        },
        "rows": rows,
    }  # fmt: skip
    print("wrote", write_result(json_path, "ann_index", argv_of(argv), started, payload))


def fmt(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items()) or "-"


if __name__ == "__main__":
    main()
