"""Relevance labels and their gains: the objective hierarchy, optionally split by value.

The hierarchy's grades (training/ltr/data.py :func:`grade_labels`) say what a user did, not what
it was worth: a purchase of a 5-unit item and of a 500-unit item both get grade 3. When the
business metric is GMV, ``value`` (:class:`training.ltr.config.ValueConfig`) splits one event's
grade into ``levels`` value levels (quantiles of the attribute, e.g. price, over that event's
train rows): a row of level l gets the label ``max grade + 1 + l`` and the gain
``scale x gain(event grade) x mean value of level l / mean value of the event``, so that the
event's gain is proportional to its value and, at ``scale`` 1, equal to its grade's on average.
Labels are integers because LightGBM's lambdarank looks each label's gain up in ``label_gain``.

The fitted level edges are saved in the version's metadata (``relevance``), so evaluation labels
a split exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mtrank.ltr_artefact import MAX_GRADE
from training.config import ConfigError
from training.ltr.config import LtrConfig, ValueConfig
from training.ltr.data import LtrSplit


@dataclass(frozen=True)
class Relevance:
    """Integer labels and the gain of each label (index = label)."""

    gains: list[float]
    value: ValueConfig | None = None
    event_grade: int = 0
    first_level: int = 0  # the label of value level 0
    edges: tuple[float, ...] = ()  # (levels - 1,) inner quantile edges

    @staticmethod
    def fit(cfg: LtrConfig, train: LtrSplit) -> Relevance:
        """The plain grades, or value levels fitted on ``train``'s event rows."""
        base = cfg.gains()
        v = cfg.value
        if v is None:
            return Relevance(base)
        rows, value = _event_rows(v, train)
        if rows.sum() < v.levels:
            raise ConfigError(f"value: {int(rows.sum())} train rows with {v.event}, fewer than "
                              f"levels ({v.levels})")  # fmt: skip
        first = len(base)
        if first + v.levels - 1 > MAX_GRADE:
            raise ConfigError(f"value.levels: labels would reach {first + v.levels - 1} > "
                              f"{MAX_GRADE}")  # fmt: skip
        x = value[rows]
        edges = np.quantile(x, np.linspace(0.0, 1.0, v.levels + 1)[1:-1])
        level = np.searchsorted(edges, x, side="right")
        means = np.array([x[level == lv].mean() if (level == lv).any() else 0.0
                          for lv in range(v.levels)])  # fmt: skip
        grade = cfg.grades[v.event]
        gains = base + [float(v.scale * base[grade] * m / x.mean()) for m in means]
        return Relevance(gains, v, grade, first, tuple(float(e) for e in edges))

    @staticmethod
    def from_metadata(
        grades: dict[str, int], label_gain: list[float], saved: dict[str, Any] | None
    ) -> Relevance:
        """The relevance a published version was trained with (its metadata's ``relevance``)."""
        if saved is None or saved.get("value") is None:
            return Relevance(list(label_gain))
        v = dict(saved["value"])
        first, edges = int(v.pop("first_label")), tuple(float(e) for e in v.pop("edges"))
        value = ValueConfig.model_validate(v)
        return Relevance(list(label_gain), value, grades[value.event], first, edges)

    @property
    def base_gains(self) -> list[float]:
        """The gains of the plain grades (labels below the first value level)."""
        return self.gains[: self.first_level] if self.value is not None else self.gains

    def labels(self, split: LtrSplit) -> np.ndarray:
        """(n,) int32 labels of a split whose ``grades`` are the plain hierarchy grades."""
        out = np.asarray(split.grades, dtype=np.int32).copy()
        if self.value is None:
            return out
        rows, value = _event_rows(self.value, split)
        rows &= out == self.event_grade  # a higher-graded event on the row keeps its grade
        out[rows] = self.first_level + np.searchsorted(self.edges, value[rows], side="right")
        return out

    def apply(self, split: LtrSplit) -> LtrSplit:
        """``split`` with its grades replaced by these labels."""
        return replace(split, grades=self.labels(split))

    def to_json(self) -> dict[str, Any]:
        return {
            "label_gain": self.gains,
            "value": None if self.value is None else {
                **self.value.model_dump(), "first_label": self.first_level,
                "edges": list(self.edges),
            },
        }  # fmt: skip


def _event_rows(v: ValueConfig, split: LtrSplit) -> tuple[np.ndarray, np.ndarray]:
    if v.event not in split.labels:
        raise ConfigError(
            f"value.event: {v.event!r} is not a label column ({sorted(split.labels)})"
        )
    if v.attribute not in split.env:
        raise ConfigError(f"value.attribute: {v.attribute!r} is not in the fusion env")
    return np.asarray(split.labels[v.event]) > 0, np.asarray(split.env[v.attribute], np.float64)


def ideal_dcg(gains: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """(G,) ideal DCG@k of each group of a group-sorted split, from per-row gains (n,)."""
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    group_of = np.repeat(np.arange(len(sizes)), sizes)
    order = np.lexsort((-gains, group_of))  # by group, gain descending
    rank = np.arange(len(gains)) - np.repeat(starts, sizes)
    discounted = np.where(rank < k, gains[order] / np.log2(rank + 2.0), 0.0)
    out: np.ndarray = np.add.reduceat(discounted, starts) if len(gains) else np.zeros(0)
    return out
