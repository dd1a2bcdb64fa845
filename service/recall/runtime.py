"""The served recall version (user tower + index + popularity), verified, hot-swappable.

:meth:`RecallModel.load` refuses a version that is not whole before anything is swapped: a file
that does not match its sha256 in metadata.json (mtrank.recall_artefact), a user tower whose
inputs or output width disagree with ``recall_spec.json``, an index that fails its own checks
(service/recall/index.py) or whose dimension is not the tower's, a tower that fails its warm-up.

:class:`RecallManager` serves the registry's ``current`` version of one recall model and follows
it like :class:`service.runtime.ModelManager` follows the rankers: a reload builds the new version
beside the old and swaps one reference; a failed one (counted in
``mtrank_recall_reloads_total{result="failure"}``) leaves the old one serving and is not retried
until ``current`` names another version. A service that started without a loadable version
answers ``/recall`` and ``/recommend`` with 503 until one is promoted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mtrank.recall_artefact import (
    INDEX_DIR,
    ITEM_CATEGORIES_FILE,
    POPULARITY_FILE,
    USER_TOWER_FILE,
    problems,
)
from mtrank.recall_spec import RecallSpec
from mtrank.registry import ModelVersion, Registry, RegistryError
from service.errors import RecallIndexInvalid
from service.recall.index import RecallIndex

log = logging.getLogger(__name__)


class RecallLoadError(RuntimeError):
    """A recall version that cannot be served; the message names the version and the file."""


@dataclass(frozen=True, eq=False)
class RecallModel:
    """One loaded recall version; immutable, safe to share between threads."""

    model: ModelVersion
    spec: RecallSpec
    metadata: dict[str, Any]
    session: ort.InferenceSession
    index: RecallIndex
    popularity: np.ndarray  # (P,) int64 raw ids, most clicked first
    ids_sorted: np.ndarray  # (count,) int64 the index's raw ids, ascending
    categories_sorted: np.ndarray  # (count,) int64 their categories (-1: unknown)

    @classmethod
    def load(cls, mv: ModelVersion, intra_op_threads: int = 1) -> RecallModel:
        where = f"recall model {mv.name}/{mv.version} ({mv.path})"
        try:
            metadata = mv.metadata()
        except (OSError, ValueError) as e:
            raise RecallLoadError(f"{where}: cannot read metadata.json: {e}") from e
        found = problems(mv.path, metadata)
        if found:
            raise RecallLoadError(f"{where}: " + "; ".join(found))
        try:
            spec = RecallSpec.load(mv.path)
            popularity = np.load(mv.path / POPULARITY_FILE, allow_pickle=False)
            categories = np.load(mv.path / ITEM_CATEGORIES_FILE, allow_pickle=False)
        except Exception as e:  # bad JSON, failed validation, unreadable .npy
            raise RecallLoadError(f"{where}: {e}") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(
                str(mv.path / USER_TOWER_FILE), sess_options=options,
                providers=["CPUExecutionProvider"],
            )  # fmt: skip
        except Exception as e:  # ORT's pybind errors share no public base class
            raise RecallLoadError(f"{where}: onnxruntime cannot load user_tower.onnx: {e}") from e
        try:
            index = RecallIndex.load(mv.path / INDEX_DIR, expected_dim=spec.embedding_dim)
        except RecallIndexInvalid as e:
            raise RecallLoadError(f"{where}: {e.message}") from e
        if categories.shape != index.item_ids.shape or categories.dtype != np.int64:
            raise RecallLoadError(f"{where}: {ITEM_CATEGORIES_FILE} does not match the index")
        index = index.with_categories(index.item_ids, categories)
        order = np.argsort(index.item_ids, kind="stable")
        model = cls(mv, spec, metadata, session, index, popularity.astype(np.int64),
                    index.item_ids[order], categories[order])  # fmt: skip
        model.warm_up()
        return model

    def categories_of(self, raw_ids: np.ndarray) -> np.ndarray:
        """(n,) category of each raw id; -1 for an unknown category or an id not indexed."""
        if len(self.ids_sorted) == 0:
            return np.full(len(raw_ids), -1, dtype=np.int64)
        pos = np.searchsorted(self.ids_sorted, raw_ids).clip(0, len(self.ids_sorted) - 1)
        return np.where(self.ids_sorted[pos] == raw_ids, self.categories_sorted[pos], -1)

    def feed(self, user_sparse: np.ndarray, histories: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The tower's inputs for encoded user fields (B, U) and raw item-id histories."""
        ids, lengths = self.spec.history.encode([h.tolist() for h in histories])
        i = self.spec.inputs
        return {i.user_sparse: user_sparse, i.history: ids, i.history_length: lengths}

    def user_vectors(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """float32 (B, D) user vectors."""
        (out,) = self.session.run([self.spec.inputs.output], feed)
        return np.asarray(out, dtype=np.float32)

    def warm_up(self) -> None:
        where = f"recall model {self.model.name}/{self.model.version}"
        users = np.zeros((2, len(self.spec.user_sparse)), dtype=np.int64)
        history = [np.empty(0, np.int64), self.popularity[: self.spec.history.max_len]]
        try:
            vectors = self.user_vectors(self.feed(users, history))
        except Exception as e:  # a graph whose inputs are not the spec's
            raise RecallLoadError(f"{where}: warm-up failed: {e}") from e
        if vectors.shape != (2, self.index.dim) or not np.isfinite(vectors).all():
            raise RecallLoadError(
                f"{where}: warm-up gave {vectors.shape} vectors (index dim {self.index.dim}) "
                "or non-finite values"
            )
        self.index.search(vectors, 1)


@dataclass(frozen=True)
class RecallReload:
    """What one reload did: success (swapped), failure (kept the old) or unchanged."""

    result: str
    version: str | None  # served after the reload
    requested: str | None
    error: str | None = None
    seconds: float = 0.0


class RecallManager:
    """Serves ``current`` of one recall model and follows it (module docstring).

    Args:
        registry_root: the registry directory.
        name: the recall model's name (``MTRANK_RECALL_MODEL``).
        on_reload: called with every :class:`RecallReload` (the metrics hook).
    """

    def __init__(
        self,
        registry_root: Path | str,
        name: str,
        on_reload: Callable[[RecallReload], None] | None = None,
        intra_op_threads: int = 1,
    ) -> None:
        self.registry = Registry(registry_root)
        self.name = name
        self.on_reload = on_reload
        self.intra_op_threads = intra_op_threads
        self._model: RecallModel | None = None
        self._failed: str | None = None  # the version of the last failed reload
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def current(self) -> RecallModel | None:
        return self._model

    def reload(self, force: bool = False) -> RecallReload:
        with self._lock:
            result = self._reload_locked(force)
        if result.result == "failure":
            log.error("recall reload failed, still serving %s: %s", result.version, result.error)
        elif result.result == "success":
            log.info("recall model %s/%s served (%.2fs)", self.name, result.version,
                     result.seconds)  # fmt: skip
        if self.on_reload is not None:
            self.on_reload(result)
        return result

    def _reload_locked(self, force: bool) -> RecallReload:
        start = time.perf_counter()
        old = self._model
        serving = old.model.version if old else None
        requested = None
        try:
            requested = self.registry.current(self.name)
            if requested is None:
                raise RegistryError(f"recall model {self.name!r} has no current version "
                                    f"under {self.registry.root}")  # fmt: skip
            if requested == serving and not force:
                return RecallReload("unchanged", serving, requested)
            model = RecallModel.load(self.registry.resolve(self.name, requested),
                                     self.intra_op_threads)  # fmt: skip
        except Exception as e:  # any failure leaves the served version alone
            self._failed = requested
            self.last_error = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - start
            return RecallReload("failure", serving, requested, self.last_error, seconds)
        self._model, self._failed, self.last_error = model, None, None
        seconds = time.perf_counter() - start
        return RecallReload("success", model.model.version, requested, None, seconds)

    async def watch(self, interval_s: float) -> None:
        """Poll ``current`` and reload on change (run as a task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                requested = self.registry.current(self.name)
            except (RegistryError, OSError) as e:
                log.warning("recall watch: %s", e)
                continue
            serving = self._model.model.version if self._model else None
            if requested is not None and requested not in (serving, self._failed):
                await asyncio.to_thread(self.reload)
