"""Typed configuration of an LTR run (``mtrank train-ltr``), loaded from strict YAML.

One document, :class:`LtrConfig`: which multi-task model's outputs to rank over (``ranker``),
on which data (``dataset``, the same dataset spec the ranker was trained with), the inputs, the
relevance grades of the objective hierarchy, the trainer and its settings, and where to publish.
An unknown key or a bad value is an error naming the file and the key; the resolved config is
saved in the published version's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mtrank.ltr_artefact import MAX_GRADE, Trainer
from mtrank.yamlio import load_yaml_model
from training.config import ConfigError

IMPRESSION = "impression"  # the grade key of a row on which no graded event happened
DEFAULT_GRADES: dict[str, int] = {IMPRESSION: 0, "click": 1, "cart": 2, "purchase": 3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LambdaMartConfig(_Strict):
    """LightGBM ``objective=lambdarank``. The size sets the serving cost: ORT walks every tree
    for every candidate, so trees x depth is what /rank pays (docs/ltr.md has the figures)."""

    num_trees: int = Field(
        50, ge=1, description="boosting rounds at most (early stopping); 50 keep /rank's added "
        "cost under 1 ms at 500 candidates (docs/ltr.md)"
    )  # fmt: skip
    num_leaves: int = Field(15, ge=2)
    max_depth: int = Field(5, ge=-1, description="-1: unlimited")
    learning_rate: float = Field(0.1, gt=0.0)
    min_data_in_leaf: int = Field(100, ge=1)
    feature_fraction: float = Field(1.0, gt=0.0, le=1.0)
    truncation_level: int = Field(
        30, ge=1, description="lambdarank_truncation_level: pairs within the top this many"
    )
    eval_at: int = Field(20, ge=1, description="validation NDCG@K for early stopping")
    early_stopping_rounds: int = Field(20, ge=0, description="0: no early stopping")
    num_threads: int = Field(1, ge=1)
    group_weight: Literal["none", "ideal_dcg"] = Field(
        "none",
        description="ideal_dcg: weight each group by its ideal DCG, so the objective is DCG, not "
        "NDCG, and a group with a valuable purchase counts for more (with value grades)",
    )


class BprConfig(_Strict):
    """Pairwise BPR (Rendle et al., UAI 2009) over the same inputs, in torch."""

    hidden_units: list[int] = Field([32], description="[]: a linear scorer")
    log_inputs: bool = Field(
        True,
        description="score log(max(x, 1e-6)) of non-negative inputs: a linear scorer is then a "
        "power product like the fusion formula",
    )
    pairs_per_positive: int = Field(4, ge=1, description="lower-graded rows drawn per row")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(4096, ge=1, description="pairs per step")
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grade_gap_weight: bool = Field(
        True, description="weight a pair by its grade gap, as lambdarank weighs its gain gap"
    )


class ValueConfig(_Strict):
    """Split one event's grade by value (training/ltr/relevance.py): its gain is then
    proportional to the value, e.g. a purchase's gain to the price (GMV)."""

    event: str = "purchase"
    attribute: str = Field("price", description="a fusion-env column holding the value")
    levels: int = Field(16, ge=2, description="value quantiles over the event's train rows")
    scale: float = Field(
        1.0, gt=0.0, description="an average-value event's gain over its plain grade's gain"
    )


class LtrConfig(_Strict):
    """What to rank over, with which labels, trained how, published where."""

    name: str = Field(description="the registry name the LTR versions are published under")
    root: str = Field("models", description="the registry directory")
    promote: bool = Field(False, description="point NAME/current at the new version")
    trainer: Trainer = "lambdamart"
    ranker: str | None = Field(
        None, description="registry name of the multi-task model (lambdamart, bpr); None for "
        "single_model, which reads the encoded features"
    )  # fmt: skip
    dataset: str = Field(description="dataset spec YAML, relative to this file")
    cache_dir: str = "data/cache"
    train_split: Literal["train", "valid", "test"] = "train"
    valid_split: Literal["train", "valid", "test"] = "valid"
    inputs: list[str] | None = Field(
        None, description="fusion inputs in order; None: every ranker output, then price, "
        "quality, promoted"
    )  # fmt: skip
    context: list[str] = Field(
        default_factory=list, description="dense request-context fields added as inputs"
    )
    grades: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_GRADES))
    label_gain: list[float] | None = Field(
        None, description="NDCG gain per grade (index = grade); None: the grade itself"
    )
    value: ValueConfig | None = Field(None, description="None: the plain hierarchy grades")
    lambdamart: LambdaMartConfig = LambdaMartConfig()
    bpr: BprConfig = BprConfig()
    parity_rows: int = Field(20_000, ge=1, description="validation rows in the ONNX parity gate")
    seed: int = 0

    @field_validator("grades")
    @classmethod
    def _grades(cls, v: dict[str, int]) -> dict[str, int]:
        if IMPRESSION not in v:
            raise ValueError(f"needs the key {IMPRESSION!r} (the grade of a row with no event)")
        bad = {k: g for k, g in v.items() if not 0 <= g <= MAX_GRADE}
        if bad:
            raise ValueError(f"grades must lie in [0, {MAX_GRADE}], got {bad}")
        if all(g == v[IMPRESSION] for g in v.values()):
            raise ValueError("every grade is the same: there is nothing to rank")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LtrConfig:
        if self.trainer == "single_model":
            if self.inputs is not None or self.context:
                raise ValueError("single_model reads the encoded features: drop inputs/context")
        elif self.ranker is None:
            raise ValueError(f"trainer {self.trainer} ranks over a model's outputs: set ranker")
        if self.value is not None and self.value.event not in self.grades:
            raise ValueError(f"value.event {self.value.event!r} has no grade")
        if self.label_gain is not None and len(self.label_gain) <= max(self.grades.values()):
            raise ValueError(
                f"label_gain has {len(self.label_gain)} entries; grades go up to "
                f"{max(self.grades.values())}"
            )
        return self

    def gains(self) -> list[float]:
        """The NDCG gain of each grade 0..max (index = grade)."""
        if self.label_gain is not None:
            return list(self.label_gain)
        return [float(g) for g in range(max(self.grades.values()) + 1)]


def load_ltr_config(path: Path | str) -> LtrConfig:
    """Read an LTR config; a bad key or value is a :class:`ConfigError` naming file and key."""
    return load_yaml_model(
        Path(path), LtrConfig, ConfigError, "LTR config", "expected a mapping at the top level"
    )
