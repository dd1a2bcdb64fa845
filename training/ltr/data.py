"""LTR examples from the logs: per-candidate inputs, graded relevance and request groups.

**Groups.** A ranking request is one user with a list of candidates. The generator's logs
(training/synthetic.py) carry no request or page-view id: every impression is drawn on its own,
and a user's impressions in a split spread over days. The closest stand-in, and the one
``mtrank tune-fusion`` uses, is the user within a split (the encoded ``groups`` column), so a
group is every impression of one user in the split. LightGBM wants each group's rows
contiguous: a split is sorted by group once, here, stably (row order within a group is kept).

**Grades** come from the objective hierarchy (seed 004: purchase > cart > click > impression):
a row's grade is the highest grade among the events that happened on it, ``impression`` when
none did. The grade per event is configuration (:class:`training.ltr.config.LtrConfig`).

**Inputs.** For a fusion model, the columns are names of the fusion namespace, computed exactly
as the service computes them: the served multi-task model (the exported ONNX graph from the
registry, run with onnxruntime as in tune-fusion) scores the split; item attributes the formula
may read (price, quality, promoted) are recovered by inverting the spec's normalisation; dense
request-context fields likewise. The single-model baseline instead reads the spec's encoded
columns (sparse vocabulary indices as numbers, then the normalised dense values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.fusion import RULE_WEIGHT
from mtrank.ltr_artefact import RankerRef, fusion_names, missing_inputs
from mtrank.registry import Registry
from mtrank.spec import FeatureSpec
from training.config import ConfigError, DatasetSpec, load_dataset_spec
from training.data import Encoded, PreparedData, prepare
from training.ltr.config import IMPRESSION, LtrConfig
from training.tune_fusion import raw_attribute

CHUNK_ROWS = 65_536


# ---------------------------------------------------------------- pure parts
def grade_labels(labels: Mapping[str, np.ndarray], grades: Mapping[str, int]) -> np.ndarray:
    """(n,) int32 grade of each row: the highest grade among the events that happened on it.

    ``labels`` maps a label column (click, cart, purchase, ...) to its (n,) values (> 0: the
    event happened); ``grades`` maps events, and ``impression`` for a row with none, to grades.
    """
    events = [k for k in grades if k != IMPRESSION]
    missing = [k for k in events if k not in labels]
    if missing:
        raise ConfigError(f"grades: {missing} are not label columns (have {sorted(labels)})")
    n = len(next(iter(labels.values()))) if labels else 0
    out = np.full(n, grades.get(IMPRESSION, 0), dtype=np.int32)
    for event in events:
        out = np.where(np.asarray(labels[event]) > 0, np.maximum(out, grades[event]), out)
    return out


def group_order(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, sizes): rows sorted by group, stably, and each group's row count in that order."""
    order = np.argsort(groups, kind="stable")
    _, sizes = np.unique(groups[order], return_counts=True)
    return order, sizes.astype(np.int64)


def group_starts(sizes: np.ndarray) -> np.ndarray:
    """(G,) first row of each group of a group-sorted split."""
    starts: np.ndarray = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    return starts


def informative_rows(grades: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Mask of the rows in groups holding at least two distinct grades (a group-sorted split).

    Only those groups have a pair to learn from; lambdarank gives every other row a zero
    gradient, so dropping them changes nothing but the time a tree takes to build.
    """
    starts = group_starts(sizes)
    top = np.maximum.reduceat(grades, starts)
    low = np.minimum.reduceat(grades, starts)
    mask: np.ndarray = np.repeat(np.asarray(top > low), sizes)
    return mask


# ---------------------------------------------------------------- a split, ready to rank
@dataclass(frozen=True)
class LtrSplit:
    """One split sorted by group: the model inputs and what evaluation needs.

    ``x`` (n, F) float32 columns named ``inputs``; ``env`` the fusion namespace as float64
    columns (ranker outputs, price/quality/promoted, context fields, rule_weight 1) for formula
    baselines and GMV; ``labels`` and ``truth`` by column name; ``groups`` (n,) and ``sizes``
    (G,) the request groups.
    """

    x: np.ndarray
    inputs: tuple[str, ...]
    grades: np.ndarray
    groups: np.ndarray
    sizes: np.ndarray
    env: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.groups)

    def subset(self, rows: np.ndarray) -> LtrSplit:
        """The split restricted to a row mask that keeps or drops whole groups."""
        groups = self.groups[rows]
        _, sizes = np.unique(groups, return_counts=True)
        return LtrSplit(
            self.x[rows], self.inputs, self.grades[rows], groups, sizes.astype(np.int64),
            {k: v[rows] for k, v in self.env.items()}, {k: v[rows] for k, v in self.labels.items()},
            {k: v[rows] for k, v in self.truth.items()},
        )  # fmt: skip


def ranker_outputs(
    session: ort.InferenceSession, spec: FeatureSpec, sparse: np.ndarray, dense: np.ndarray
) -> dict[str, np.ndarray]:
    """Every output of the exported ranker for encoded rows, float64 (n,), in chunks."""
    names = [o.name for o in session.get_outputs()]
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(sparse), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        feeds = {
            spec.sparse_input: np.ascontiguousarray(sparse[rows], dtype=np.int64),
            spec.dense_input: np.ascontiguousarray(dense[rows], dtype=np.float32),
        }
        for n, v in zip(names, session.run(None, feeds), strict=True):
            outs[n].append(np.asarray(v, dtype=np.float64).reshape(-1))
    return {n: np.concatenate(v) if v else np.empty(0) for n, v in outs.items()}


def context_fields(spec: FeatureSpec) -> list[str]:
    """The spec's dense request-context fields (the service passes them to fusion as scalars)."""
    return [f.name for f in spec.dense if f.source == "context"]


def fusion_inputs(cfg: LtrConfig, spec: FeatureSpec) -> tuple[str, ...]:
    """The configured fusion inputs, checked against what the ranker and the spec provide."""
    allowed_context = context_fields(spec)
    bad_context = [c for c in cfg.context if c not in allowed_context]
    if bad_context:
        raise ConfigError(
            f"context: {bad_context} are not dense context fields of the ranker's spec "
            f"(have {allowed_context})"
        )
    names = cfg.inputs
    if names is None:
        names = [*spec.task_names, *ITEM_ATTRIBUTES.formula_names]
    names = [*names, *(c for c in cfg.context if c not in names)]
    missing = missing_inputs(names, fusion_names(spec.task_names, cfg.context))
    if missing:
        raise ConfigError(
            f"inputs: {missing} are neither outputs of the ranker {spec.task_names}, item "
            f"attributes {list(ITEM_ATTRIBUTES.formula_names)} nor context: {cfg.context}"
        )
    return tuple(names)


def feature_names(spec: FeatureSpec) -> tuple[str, ...]:
    """The single-model baseline's columns: sparse fields, then dense fields, in spec order."""
    return tuple([f.name for f in spec.sparse] + [f.name for f in spec.dense])


def encoded_features(sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """(n, S + D) float32: vocabulary indices as numbers (exact below 2**24), then dense."""
    return np.concatenate(
        [np.asarray(sparse, dtype=np.float32), np.asarray(dense, dtype=np.float32)], axis=1
    )


@dataclass(frozen=True)
class Source:
    """The data and (for a fusion model) the ranker one config reads."""

    dataset: DatasetSpec
    data: PreparedData
    spec: FeatureSpec
    session: ort.InferenceSession | None
    ranker: RankerRef | None


def open_source(cfg: LtrConfig, base: Path) -> Source:
    """Prepare the dataset and, for a fusion model, open its ranker (checked against the data)."""
    ds = load_dataset_spec(base / cfg.dataset)
    data = prepare(ds, Path(cfg.cache_dir))
    if cfg.ranker is None:
        return Source(ds, data, data.spec, None, None)
    mv = Registry(cfg.root).resolve(cfg.ranker)
    spec = FeatureSpec.load(mv.path)
    if (
        spec.model_copy(update={"outputs": []}).sha256()
        != data.spec.model_copy(update={"outputs": []}).sha256()
    ):
        raise ConfigError(f"{mv.path}: the ranker was not trained on this dataset's encoding")
    session = ort.InferenceSession(str(mv.model_path), providers=["CPUExecutionProvider"])
    return Source(ds, data, spec, session, RankerRef(name=mv.name, version=mv.version,
                                                    spec_sha256=spec.sha256()))  # fmt: skip


def namespace(
    source: Source, sparse: np.ndarray, dense: np.ndarray, context: Sequence[str]
) -> dict[str, np.ndarray]:
    """The fusion env of encoded rows: ranker outputs, item attributes, context, rule_weight."""
    enc = Encoded(sparse=sparse, dense=dense, labels={}, groups=None, truth={})
    env: dict[str, np.ndarray] = {}
    if source.session is not None:
        env.update(ranker_outputs(source.session, source.spec, sparse, dense))
    for name in [*ITEM_ATTRIBUTES.formula_names, *context]:
        env[name] = raw_attribute(source.spec, enc, name)
    env[RULE_WEIGHT] = np.ones(len(sparse))
    return env


def load_split(cfg: LtrConfig, source: Source, split: str) -> LtrSplit:
    """One split of ``source`` as an :class:`LtrSplit` (module docstring)."""
    enc: Encoded | None = getattr(source.data, split)
    if enc is None or enc.groups is None:
        raise ConfigError(f"split {split!r} is missing or has no user column for grouping")
    order, sizes = group_order(np.asarray(enc.groups))
    sparse, dense = np.asarray(enc.sparse)[order], np.asarray(enc.dense)[order]
    env = namespace(source, sparse, dense, cfg.context)
    if cfg.trainer == "single_model":
        inputs = feature_names(source.spec)
        x = encoded_features(sparse, dense)
    else:
        inputs = fusion_inputs(cfg, source.spec)
        x = np.stack([env[n] for n in inputs], axis=1).astype(np.float32)  # (n, F)
    labels = {
        t.label: np.asarray(enc.labels[t.name], np.float64)[order] for t in source.dataset.tasks
    }
    truth = {k: np.asarray(v, np.float64)[order] for k, v in enc.truth.items()}
    return LtrSplit(
        x, inputs, grade_labels(labels, cfg.grades), np.asarray(enc.groups)[order], sizes,
        env, labels, truth,
    )  # fmt: skip
