"""RecallIndex: exact top-k on small catalogues, filters that hold, refusal of damaged indexes,
and concurrent searches. Every index here is built by the training side's real builder."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtrank.recall_index import (
    INDEX_FILE,
    ITEM_IDS_FILE,
    METADATA_FILE,
    NOT_AN_ITEM,
    FlatParams,
    HnswParams,
    IndexParams,
)
from mtrank.registry import sha256_file
from service.errors import RecallIndexInvalid, ReloadRejected
from service.recall.index import PAD_ID, RecallIndex
from training.recall.index_build import build_index

D = 16
N = 300
N_CATEGORIES = 30  # one category is ~3% of the catalogue: under EXACT_BELOW, so scanned
# ef_search >= the catalogue: the beam holds every reachable item, so HNSW answers exactly.
EXACT_HNSW = HnswParams(M=16, ef_construction=200, ef_search=N)
PARAMS = {"flat": FlatParams(), "hnsw": EXACT_HNSW}


class Catalogue:
    """What the export writes (row 0 OOV, some rows not items) and the truth to compare with."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.emb = rng.standard_normal((N + 1, D)).astype(np.float32)  # (N + 1, D)
        self.ids = np.concatenate([[NOT_AN_ITEM], 5000 + rng.permutation(N)]).astype(np.int64)
        self.ids[[10, 11]] = NOT_AN_ITEM  # cold rows of an id-only model
        self.emb[0] = 50.0  # OOV vector: the best match of every query if it were indexed
        items = self.ids != NOT_AN_ITEM
        self.item_ids = self.ids[items]  # (n,)
        self.vectors = self.emb[items]  # (n, D)
        self.categories = rng.integers(0, N_CATEGORIES, len(self.item_ids))

    def brute_force(
        self,
        q: np.ndarray,
        k: int,
        exclude: set[int] = frozenset(),  # type: ignore[assignment]
        allow: set[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        ok = ~np.isin(self.item_ids, list(exclude))
        if allow is not None:
            ok &= np.isin(self.categories, list(allow))
        scores = self.vectors[ok] @ q  # (n_ok,)
        top = np.argsort(-scores, kind="stable")[:k]
        return self.item_ids[ok][top], scores[top]


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue()


@pytest.fixture(scope="module", params=list(PARAMS))
def index(
    request: pytest.FixtureRequest, catalogue: Catalogue, tmp_path_factory: pytest.TempPathFactory
) -> RecallIndex:
    out = tmp_path_factory.mktemp("recall") / "idx"
    build_index(catalogue.emb, catalogue.ids, out, params=PARAMS[request.param])
    return RecallIndex.load(out, expected_dim=D).with_categories(
        catalogue.item_ids, catalogue.categories
    )


def queries(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


# ------------------------------------------------------------------ exact answers
@pytest.mark.parametrize("k", [1, 10, 100])
def test_the_top_k_is_the_exact_top_k(index: RecallIndex, catalogue: Catalogue, k: int) -> None:
    q = queries(20)
    ids, scores = index.search(q, k)
    assert ids.shape == scores.shape == (20, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    for r in range(20):
        want_ids, want_scores = catalogue.brute_force(q[r], k)
        np.testing.assert_array_equal(ids[r], want_ids)
        np.testing.assert_allclose(scores[r], want_scores, rtol=1e-5, atol=1e-5)


def test_row_zero_and_non_items_are_never_returned(
    index: RecallIndex, catalogue: Catalogue
) -> None:
    q = np.repeat(catalogue.emb[:1], 3, axis=0) + queries(3)  # aimed at the OOV vector
    ids, _ = index.search(q, index.count)
    assert index.count == N - 2
    assert NOT_AN_ITEM not in ids
    assert sorted(ids[0]) == sorted(catalogue.item_ids)  # k = everything: each item once


def test_asking_for_more_than_the_catalogue_pads_the_row(index: RecallIndex) -> None:
    ids, scores = index.search(queries(2), index.count + 5)
    assert (ids[:, : index.count] != PAD_ID).all()
    assert (ids[:, index.count :] == PAD_ID).all() and np.isneginf(scores[:, index.count :]).all()


# ------------------------------------------------------------------ filters
@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    k=st.integers(1, 40),
    allow=st.none() | st.sets(st.integers(0, N_CATEGORIES), max_size=8),
    seed=st.integers(0, 2**16),
)
def test_filters_hold_and_the_rest_is_exact(
    index: RecallIndex,
    catalogue: Catalogue,
    data: st.DataObject,
    k: int,
    allow: set[int] | None,
    seed: int,
) -> None:
    known = st.sampled_from(catalogue.item_ids.tolist())
    unknown = st.integers(-(10**6), 10**6)  # ids the index does not hold are ignored
    excludes = [data.draw(st.sets(known | unknown, max_size=N)) for _ in range(2)]
    q = queries(2, seed)
    ids, scores = index.search(q, k, exclude=excludes, allow_categories=allow)
    category = dict(zip(catalogue.item_ids.tolist(), catalogue.categories.tolist(), strict=True))
    for r in range(2):
        want_ids, want_scores = catalogue.brute_force(q[r], k, excludes[r], allow)
        got = ids[r][ids[r] != PAD_ID]
        assert not set(got.tolist()) & excludes[r]
        assert allow is None or {category[i] for i in got.tolist()} <= allow
        np.testing.assert_array_equal(got, want_ids)  # fewer than k only when nothing is left
        np.testing.assert_allclose(scores[r][: len(got)], want_scores, rtol=1e-5, atol=1e-5)


def test_excluding_all_but_three_items_returns_those_three(
    index: RecallIndex, catalogue: Catalogue
) -> None:
    keep = set(catalogue.item_ids[[3, 50, 200]].tolist())
    excluded = np.array([i for i in catalogue.item_ids.tolist() if i not in keep])
    ids, _ = index.search(queries(1), 10, exclude=[excluded])
    assert set(ids[0, :3].tolist()) == keep and (ids[0, 3:] == PAD_ID).all()


def test_a_restrictive_allow_list_is_still_exact_on_a_large_hnsw_catalogue(
    tmp_path: Path,
) -> None:
    # 20k clustered items and an allow-list of 1%: far below EXACT_BELOW, and a plain graph
    # search with a selector misses most of the allowed items (docs/recall_index.md).
    rng = np.random.default_rng(3)
    n = 20_000
    emb = rng.standard_normal((n + 1, D)).astype(np.float32)
    ids = np.arange(-1, n, dtype=np.int64)
    build_index(emb, ids, tmp_path / "idx", params=HnswParams(M=8, ef_construction=40))
    categories = rng.integers(0, 100, n)
    idx = RecallIndex.load(tmp_path / "idx").with_categories(ids[1:], categories)
    q = queries(5)
    allowed = np.flatnonzero(categories == 7)
    ranked = [allowed[np.argsort(-(emb[1:][allowed] @ q[r]))] for r in range(5)]
    seen = [set(ranked[r][[0, 3, 9]].tolist()) | {-7, n + 5} for r in range(5)]
    got, _ = idx.search(q, 50, allow_categories={7})
    got_seen, _ = idx.search(q, 50, exclude=seen, allow_categories={7})
    for r in range(5):
        np.testing.assert_array_equal(got[r], ranked[r][:50])
        np.testing.assert_array_equal(got_seen[r], [i for i in ranked[r] if i not in seen[r]][:50])


def test_categories_follow_raw_ids_in_any_order(index: RecallIndex, catalogue: Catalogue) -> None:
    order = np.random.default_rng(5).permutation(len(catalogue.item_ids))
    shuffled = index.with_categories(
        catalogue.item_ids[order], catalogue.categories[order]
    )  # same mapping, other order: same answers
    a, _ = index.search(queries(3), 20, allow_categories={1, 2})
    b, _ = shuffled.search(queries(3), 20, allow_categories={1, 2})
    np.testing.assert_array_equal(a, b)


def test_an_allow_list_needs_categories(catalogue: Catalogue, tmp_path: Path) -> None:
    build_index(catalogue.emb, catalogue.ids, tmp_path / "idx", params=FlatParams())
    with pytest.raises(ValueError, match="with_categories"):
        RecallIndex.load(tmp_path / "idx").search(queries(1), 5, allow_categories={1})


@pytest.mark.parametrize(
    ("vectors", "k", "message"),
    [
        (np.zeros((2, D + 1), np.float32), 5, r"\(B, 16\)"),
        (np.zeros(D, np.float32), 5, r"\(B, 16\)"),
        (np.full((1, D), np.nan, np.float32), 5, "NaN"),
        (np.zeros((1, D), np.float32), 0, "k must be"),
    ],
)
def test_bad_queries_are_refused(
    index: RecallIndex, vectors: np.ndarray, k: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        index.search(vectors, k)


# ------------------------------------------------------------------ concurrency
def test_concurrent_searches_give_the_serial_answers(index: RecallIndex) -> None:
    q = queries(64, seed=9)
    rng = np.random.default_rng(9)
    jobs = [
        (r, {int(i) for i in rng.choice(index.item_ids, 30)}, [None, {0, 1}, {4}][r % 3])
        for r in range(64)
    ]

    def one(job: tuple[int, set[int], set[int] | None]) -> np.ndarray:
        r, excluded, allow = job
        return index.search(q[r : r + 1], 25, exclude=[excluded], allow_categories=allow)[0]

    serial = [one(j) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            parallel = list(pool.map(one, jobs))
            for a, b in zip(serial, parallel, strict=True):
                np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ refusing damaged indexes
@pytest.fixture
def built(catalogue: Catalogue, tmp_path: Path) -> Path:
    out = tmp_path / "idx"
    build_index(catalogue.emb, catalogue.ids, out, params=HnswParams(M=8, ef_construction=32))
    return out


def rewrite_metadata(directory: Path, **changes: object) -> None:
    path = directory / METADATA_FILE
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_round_trip_loads_what_was_built(built: Path, catalogue: Catalogue) -> None:
    idx = RecallIndex.load(built, expected_dim=D)
    assert (idx.count, idx.dim, idx.metadata.params.kind) == (N - 2, D, "hnsw")
    np.testing.assert_array_equal(idx.item_ids, catalogue.item_ids)


def test_a_corrupt_index_file_fails_its_checksum(built: Path) -> None:
    flip_a_byte(built / INDEX_FILE)
    with pytest.raises(RecallIndexInvalid, match=r"index\.faiss: sha256 .* corrupt"):
        RecallIndex.load(built)


def test_a_corrupt_id_table_fails_its_checksum(built: Path) -> None:
    flip_a_byte(built / ITEM_IDS_FILE)
    with pytest.raises(RecallIndexInvalid, match=r"item_ids\.npy: sha256"):
        RecallIndex.load(built)


def test_a_truncated_index_with_a_matching_checksum_is_refused_by_faiss(built: Path) -> None:
    path = built / INDEX_FILE
    path.write_bytes(path.read_bytes()[:1000])
    rewrite_metadata(built, index_sha256=sha256_file(path))
    with pytest.raises(RecallIndexInvalid, match="faiss cannot read it"):
        RecallIndex.load(built)


def test_an_id_table_of_the_wrong_type_is_refused(built: Path) -> None:
    path = built / ITEM_IDS_FILE
    np.save(path, np.load(path).astype(np.int32))
    rewrite_metadata(built, item_ids_sha256=sha256_file(path))
    with pytest.raises(RecallIndexInvalid, match=r"must be int64 \(298,\)"):
        RecallIndex.load(built)


def test_metadata_that_disagrees_with_the_index_is_refused(built: Path) -> None:
    rewrite_metadata(built, dim=D * 2)
    with pytest.raises(RecallIndexInvalid, match="dim 16 != 32"):
        RecallIndex.load(built)


def test_a_user_tower_of_another_width_is_refused_at_load(built: Path) -> None:
    with pytest.raises(RecallIndexInvalid, match="dim 16 != the user vectors' 32"):
        RecallIndex.load(built, expected_dim=32)


@pytest.mark.parametrize("name", [INDEX_FILE, ITEM_IDS_FILE, METADATA_FILE])
def test_a_missing_file_is_refused(built: Path, name: str) -> None:
    (built / name).unlink()
    with pytest.raises(RecallIndexInvalid, match=name.replace(".", r"\.")):
        RecallIndex.load(built)


@pytest.mark.parametrize(
    "text", ["{not json", '{"format": 2}', json.dumps({"unknown_key": 1})], ids=str
)
def test_unreadable_metadata_is_refused(built: Path, text: str) -> None:
    (built / METADATA_FILE).write_text(text)
    with pytest.raises(RecallIndexInvalid, match="invalid metadata"):
        RecallIndex.load(built)


def test_a_load_failure_is_a_rejected_reload_for_the_caller(built: Path) -> None:
    flip_a_byte(built / INDEX_FILE)
    with pytest.raises(ReloadRejected) as caught:  # what serving_state catches to keep serving
        RecallIndex.load(built)
    assert caught.value.status_code == 409
    assert caught.value.body()["error"]["type"] == "recall_index_invalid"


def test_params_of_each_kind_round_trip(catalogue: Catalogue, tmp_path: Path) -> None:
    for name, params in PARAMS.items():
        out = tmp_path / name
        build_index(catalogue.emb, catalogue.ids, out, params=params)
        loaded: IndexParams = RecallIndex.load(out).metadata.params
        assert loaded == params
