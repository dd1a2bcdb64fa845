"""Typed configuration of the offline half, loaded from YAML.

Two documents: a :class:`DatasetSpec` (which columns exist and what role each plays) and a
:class:`TrainConfig` (model, loss weighting, optimisation), which embeds or points at a dataset
spec. Unknown keys are errors naming the key; a missing column is an error naming the column
(checked when data is read). The resolved config is saved in every checkpoint and export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mtrank.yamlio import read_yaml_mapping, validation_messages

Source = Literal["user", "item", "context"]


class ConfigError(ValueError):
    """A configuration file that does not validate; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- dataset
class SparseColumn(_Strict):
    name: str
    source: Source = "item"
    min_count: int = Field(1, ge=1, description="rarer values go to the OOV bucket")


class DenseColumn(_Strict):
    name: str
    source: Source = "item"
    log1p: bool = False
    default: float | None = Field(None, description="raw value for missing; training mean if None")


class TaskColumn(_Strict):
    name: str
    label: str
    kind: Literal["binary", "regression"] = "binary"
    depends_on: str | None = Field(None, description="funnel parent task (cvr depends on ctr)")
    transform: Literal["none", "log1p"] = Field(
        "none",
        description="regression only: fit log1p(label) (heavy-tailed targets such as dwell "
        "seconds); the exported output is inverted back to the label's units",
    )

    elapsed: str | None = Field(
        None,
        description="a delayed binary label: column with the days from the row's event (the "
        "click) to the observation cut-off; model.delayed_feedback reads it",
    )
    delay: str | None = Field(
        None,
        description="with elapsed: column with the days from the row's event to the conversion, "
        "read where the label is 1 (may be missing elsewhere)",
    )

    @model_validator(mode="after")
    def _transform_needs_regression(self) -> TaskColumn:
        if self.transform != "none" and self.kind != "regression":
            raise ValueError(f"task {self.name!r}: transform applies to regression tasks only")
        return self

    @model_validator(mode="after")
    def _timing_of_binary_labels(self) -> TaskColumn:
        if (self.elapsed or self.delay) and self.kind != "binary":
            raise ValueError(f"task {self.name!r}: elapsed and delay apply to binary tasks only")
        if self.delay is not None and self.elapsed is None:
            raise ValueError(f"task {self.name!r}: delay needs elapsed")
        return self


def timing_key(task: str, column: Literal["elapsed", "delay"]) -> str:
    """The key under which a delayed task's timing column travels beside its labels (the data
    pipeline stores it there, the delayed-feedback loss reads it): ``cvr@elapsed``."""
    return f"{task}@{column}"


class DatasetSpec(_Strict):
    name: str
    format: Literal["csv", "parquet", "served"] = "csv"
    train: str
    valid: str | None = None
    test: str | None = None
    sparse: list[SparseColumn]
    dense: list[DenseColumn] = []
    tasks: list[TaskColumn]
    user_column: str | None = Field(None, description="user id column, for GAUC")
    truth_columns: list[str] = Field(
        default_factory=list, description="ground-truth columns kept for evaluation, never trained"
    )
    funnel_policy: Literal["error", "drop", "fix_parent"] = Field(
        "drop",
        description="rows whose child label is positive while the parent is 0: fail, drop them, "
        "or set the parent label to 1",
    )
    # format: served (training/served_data.py): rows exported by ``mtrank logs export``, whose
    # inputs are already encoded with this spec's vocabularies and normalisation.
    feature_spec: str | None = Field(
        None, description="format served only: the served model's spec.json (the rows' encoding)"
    )

    @model_validator(mode="after")
    def _served_rows_name_their_spec(self) -> DatasetSpec:
        if (self.format == "served") != (self.feature_spec is not None):
            raise ValueError("feature_spec: format 'served' needs it, the other formats take none")
        return self

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        names = [t.name for t in self.tasks]
        for t in self.tasks:
            if t.depends_on is not None and t.depends_on not in names:
                raise ValueError(f"task {t.name!r} depends_on unknown task {t.depends_on!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        return self

    def task(self, name: str) -> TaskColumn:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


# ---------------------------------------------------------------- model
# The one list of architectures: ``model.type`` -> "module:Class" under training.models, where
# the class is. Names, not imports: training.models imports this module, so importing it back
# would be an import circle (and would pull torch into every config load). training.models
# resolves the paths into MODELS; a test checks that every entry resolves.
MODEL_TYPES: dict[str, str] = {
    "single_task": "single_task:SingleTaskModel",
    "shared_bottom": "shared_bottom:SharedBottomModel",
    "omoe": "omoe:OMoEModel",
    "mmoe": "mmoe:MMoEModel",
    "mmoe_attention": "mmoe_attention:AttentionMMoEModel",
    "ple": "ple:PLEModel",
    "cross_stitch": "soft_sharing:CrossStitchModel",
    "l2_constrained": "soft_sharing:L2ConstrainedModel",
    "aitm": "aitm:AITMModel",
    "esmm": "esmm:ESMMModel",
    "base": "esmm:BASEModel",
    "escm2_ips": "escm2:ESCM2IPSModel",
    "escm2_dr": "escm2:ESCM2DRModel",
    "ips": "dr_jl:IPSModel",
    "dr_jl": "dr_jl:DRJLModel",
}


class DebiasConfig(_Strict):
    """Selection-bias correction of a funnel's CVR: models ``escm2_ips``, ``escm2_dr`` (ESCM²,
    on ESMM), ``ips`` and ``dr_jl`` (on BASE). See training/models/debias.py."""

    clip: float = Field(
        0.02,
        gt=0.0,
        le=1.0,
        description="propensity floor: a clicked row's IPS weight is 1 / max(pCTR, clip)",
    )
    weight: float = Field(
        1.0, ge=0.0, description="ESCM² only: lambda_g, weight of the counterfactual CVR risk"
    )
    imputation_weight: float = Field(
        1.0, ge=0.0, description="DR only (escm2_dr, dr_jl): weight of the imputation loss"
    )


DELAYED_FEEDBACK_MODELS = ("esmm", "base")  # model types whose funnel child loss takes it


class DelayedFeedbackConfig(_Strict):
    """Conversions that arrive after the training cut-off (models ``esmm`` and ``base``): how
    the funnel child's loss treats a click that has not converted yet. The child task names its
    ``elapsed`` (and ``delay``) columns. See training/models/delayed.py."""

    method: Literal["naive", "window", "dfm", "es_dfm"] = Field(
        "naive",
        description="naive: not yet converted counts as negative; window: only rows older than "
        "window_days; dfm: Chapelle's delayed feedback model; es_dfm: elapsed-time sampling",
    )
    window_days: float | None = Field(
        None, gt=0.0, description="window only: rows younger than this leave the child's loss"
    )
    elapsed_hours: float = Field(
        0.25,
        ge=0.0,
        description="es_dfm: c, the wait before a click enters the stream with the label seen "
        "by then (the authors' default, 15 minutes)",
    )
    complete_after_days: float | None = Field(
        None,
        gt=0.0,
        description="es_dfm only: rows at least this old count as fully labelled; the "
        "true-negative and delayed-positive heads learn from them",
    )
    stream_days: float | None = Field(
        None,
        gt=0.0,
        description="es_dfm only: the stream is the events of this many days before the "
        "cut-off (a click's first entry if it entered then, a conversion if it arrived then), "
        "and older rows serve the two heads and their late conversions; None: every row's entries",
    )
    aux_weight: float = Field(
        1.0, ge=0.0, description="es_dfm: weight of those two heads' losses in the child's loss"
    )

    @model_validator(mode="after")
    def _keys_of_the_method(self) -> DelayedFeedbackConfig:
        m = self.method
        if (m == "window") != (self.window_days is not None):
            raise ValueError(
                "window_days: method 'window' needs it, the other methods take none"
                f" (method {m!r}, window_days {self.window_days})"
            )
        if (m == "es_dfm") != (self.complete_after_days is not None):
            raise ValueError(
                "complete_after_days: method 'es_dfm' needs it, the other methods take none"
                f" (method {m!r}, complete_after_days {self.complete_after_days})"
            )
        if self.stream_days is not None and m != "es_dfm":
            raise ValueError(f"stream_days: only method 'es_dfm' takes it (method {m!r})")
        if self.complete_after_days is not None and self.complete_after_days * 24.0 <= (
            self.elapsed_hours
        ):
            raise ValueError(
                "complete_after_days must exceed elapsed_hours: a row must outlive the wait "
                "before its label counts as final"
            )
        return self


class AITMConfig(_Strict):
    """Adaptive Information Transfer Multi-task (Xi et al., KDD 2021): ``type: aitm``."""

    chain: list[str] | None = Field(
        None,
        description="binary tasks in funnel order (e.g. [ctr, cart, cvr]); None: the longest "
        "depends_on path, the first among equals ([ctr, cvr] for the ecommerce tasks)",
    )
    calibrator_weight: float = Field(
        0.6, ge=0.0, description="alpha of the behavioural expectation calibrator"
    )

    @model_validator(mode="after")
    def _chain_shape(self) -> AITMConfig:
        if self.chain is not None and (
            len(self.chain) < 2 or len(set(self.chain)) < len(self.chain)
        ):
            raise ValueError(f"aitm.chain needs at least two distinct tasks, got {self.chain}")
        return self


class CrossStitchConfig(_Strict):
    """Cross-stitch units (Misra et al., CVPR 2016): ``type: cross_stitch``."""

    self_weight: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="initial weight of a task's own column in each mix (alpha_S); the other "
        "columns share 1 - self_weight equally (alpha_D). 1.0 starts as the identity mix",
    )


class L2ConstrainedConfig(_Strict):
    """L2-constrained soft sharing (Duong et al., ACL 2015): ``type: l2_constrained``."""

    weight: float = Field(
        0.01, ge=0.0, description="lambda of sum over task pairs s<t of ||W_s - W_t||^2"
    )


class PretrainedEmbedding(_Strict):
    """Pretrained vectors for one sparse field's rows (training/pretrained.py)."""

    path: str = Field(description=".npz with ids and vectors, or a recall export directory")
    freeze: bool = Field(False, description="keep the loaded rows as loaded; false: fine-tune")
    scale: Literal["as_is", "init"] = Field(
        "as_is",
        description="as_is: the vectors as stored; init: rescaled to the random start's "
        "root-mean-square (directions kept), so they enter at the scale of the other rows",
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class ModelConfig(_Strict):
    """Architecture and sizes. ``type`` is a key of :data:`MODEL_TYPES`."""

    type: str = "mmoe"
    embed_dim: int = Field(16, ge=1)
    # shared_bottom / single_task / base; the per-task columns of aitm, cross_stitch, l2_constrained
    bottom_units: list[int] = [128, 64]
    expert_units: list[int] = [128, 64]  # omoe / mmoe / ple experts
    n_experts: int = Field(4, ge=1)
    tower_units: list[int] = [32]
    # PLE (Tang et al., RecSys 2020): CGC levels with task-specific and shared experts.
    ple_levels: int = Field(2, ge=1)
    ple_specific_experts: int = Field(2, ge=1)
    ple_shared_experts: int = Field(2, ge=1)
    # ESMM's CVR/CTR towers may sit on any bottom: "shared_bottom", "mmoe", ...
    esmm_bottom: Literal["shared_bottom", "mmoe", "ple"] = "shared_bottom"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    debias: DebiasConfig = DebiasConfig()
    delayed_feedback: DelayedFeedbackConfig = DelayedFeedbackConfig()
    aitm: AITMConfig = AITMConfig()
    cross_stitch: CrossStitchConfig = CrossStitchConfig()
    l2_constrained: L2ConstrainedConfig = L2ConstrainedConfig()
    init_embeddings: dict[str, PretrainedEmbedding] = Field(
        default_factory=dict,
        description="sparse field -> pretrained vectors (a path, or {path, freeze})",
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in MODEL_TYPES:
            known = ", ".join(MODEL_TYPES)
            raise ValueError(f"unknown model type {value!r}; known types: {known}")
        return value

    @model_validator(mode="after")
    def _delayed_feedback_on_a_funnel(self) -> ModelConfig:
        method = self.delayed_feedback.method
        if method != "naive" and self.type not in DELAYED_FEEDBACK_MODELS:
            raise ValueError(
                f"delayed_feedback.method {method!r} needs model.type "
                f"{' or '.join(DELAYED_FEEDBACK_MODELS)} (a funnel whose child loss it replaces), "
                f"got {self.type!r}"
            )
        return self


class TaskWeights(_Strict):
    label_weight: float = Field(1.0, gt=0, description="weight of positive labels (binary only)")
    loss_weight: float = Field(1.0, ge=0, description="static loss weight")


class WeightingConfig(_Strict):
    type: Literal["static", "uncertainty", "mgda", "pe_ltr"] = "static"
    # PE-LTR (Lin et al., RecSys 2019): lower bound of each task's weight.
    lower_bounds: dict[str, float] = {}


class EarlyStopping(_Strict):
    metric: str = Field("valid_loss", description="valid_loss or '<task>_auc'")
    patience: int = Field(2, ge=1, description="validation points without improvement")


class ValidationConfig(_Strict):
    """When the validation split is scored; each scoring is one validation point."""

    every_steps: int | None = Field(
        None,
        ge=1,
        description="also validate every K optimiser steps (global count); None: only at the end "
        "of each epoch",
    )


class WeightAveraging(_Strict):
    """An exponential moving average of the weights, validated, checkpointed and exported."""

    decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="per-step decay of the average (horizon about 1 / (1 - decay) steps; "
        "0: no averaging); early steps use min(decay, (1 + n) / (10 + n))",
    )


class LRSchedule(_Strict):
    """A factor on every optimiser's learning rate: linear warm-up, then decay over the plan."""

    warmup_steps: int = Field(0, ge=0, description="steps the factor climbs linearly to 1 over")
    decay: Literal["none", "linear", "cosine"] = Field(
        "none", description="from 1 after warm-up to min_lr_ratio at the last planned step"
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="the factor at the last step")


class EmbeddingRegularization(_Strict):
    """Frequency-aware L2 on the id embedding rows a batch touches (DIN's mini-batch aware
    regularisation, Zhou et al., KDD 2018): (weight / 2) * sum over distinct rows j of the batch
    of ||e_j||^2 / n_j, with n_j the row's count in the train split."""

    type: Literal["none", "frequency"] = "none"
    weight: float = Field(0.0, ge=0.0, description="lambda of the penalty")

    @model_validator(mode="after")
    def _weight_with_type(self) -> EmbeddingRegularization:
        if self.type == "frequency" and self.weight <= 0:
            raise ValueError("embedding_regularization: type frequency needs a weight > 0")
        return self


class EmbeddingOptimizer(_Strict):
    """How the embedding tables are updated: with everything else, or by their own optimiser."""

    type: Literal["same", "adam", "sparse_adam", "adagrad"] = Field(
        "same",
        description="same: the one Adam of every parameter; adam: a second dense Adam; "
        "sparse_adam / adagrad: sparse gradients, only the rows of the batch are updated",
    )
    lr: float | None = Field(None, gt=0, description="None: the main lr")

    @model_validator(mode="after")
    def _lr_needs_own_optimizer(self) -> EmbeddingOptimizer:
        if self.type == "same" and self.lr is not None:
            raise ValueError("embedding_optimizer.lr needs a type other than 'same'")
        return self


class TrainConfig(_Strict):
    dataset: DatasetSpec
    model: ModelConfig = ModelConfig()
    tasks: dict[str, TaskWeights] = Field(
        default_factory=dict, description="per-task weights by task name; missing = defaults"
    )
    weighting: WeightingConfig = WeightingConfig()
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    early_stopping: EarlyStopping = EarlyStopping()
    validation: ValidationConfig = ValidationConfig()
    lr_schedule: LRSchedule = LRSchedule()
    weight_averaging: WeightAveraging = WeightAveraging()
    init_output_bias: bool = Field(
        True,
        description="start every output at the train split's base rate: binary log-odds, "
        "regression mean (after its transform), conditional tasks over parent-positive rows",
    )
    embedding_regularization: EmbeddingRegularization = EmbeddingRegularization()
    embedding_optimizer: EmbeddingOptimizer = EmbeddingOptimizer()
    id_dropout: dict[str, float] = Field(
        default_factory=dict,
        description="sparse column -> probability that a train row's value is replaced by the OOV "
        "index, so the OOV row learns what an unseen id (a new item or user) means at serving",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (smoke runs)")
    out_dir: str = "runs"

    @model_validator(mode="after")
    def _tasks_known(self) -> TrainConfig:
        known = {t.name for t in self.dataset.tasks}
        unknown = sorted(set(self.tasks) - known)
        if unknown:
            raise ValueError(f"tasks: {unknown} not in dataset tasks {sorted(known)}")
        return self

    @model_validator(mode="after")
    def _id_dropout_columns(self) -> TrainConfig:
        known = {c.name for c in self.dataset.sparse}
        for name, p in self.id_dropout.items():
            if name not in known:
                raise ValueError(f"id_dropout: {name!r} is not a sparse column {sorted(known)}")
            if not 0.0 <= p < 1.0:
                raise ValueError(f"id_dropout.{name}: probability must be in [0, 1), got {p}")
        return self

    def weights(self, task: str) -> TaskWeights:
        return self.tasks.get(task, TaskWeights())


_M = TypeVar("_M", bound=BaseModel)


def _read_yaml(path: Path) -> dict[str, Any]:
    """Strict YAML (a repeated key is an error, as in every config mtrank reads)."""
    return read_yaml_mapping(path, ConfigError, "config", "expected a mapping at the top level")


def _validate(cls: type[_M], data: dict[str, Any], path: Path) -> _M:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = [f"  {line}" for line in validation_messages(e)]
        raise ConfigError(f"{path}: invalid {cls.__name__}:\n" + "\n".join(lines)) from e


def load_dataset_spec(path: Path | str) -> DatasetSpec:
    path = Path(path)
    data = _read_yaml(path)
    for key in ("train", "valid", "test", "feature_spec"):
        if isinstance(data.get(key), str):
            data[key] = str((path.parent / data[key]).resolve())
    return _validate(DatasetSpec, data, path)


def load_train_config(path: Path | str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a training config; ``dataset`` may be inline or a path relative to the file."""
    path = Path(path)
    data = _read_yaml(path)
    ds = data.get("dataset")
    if isinstance(ds, str):
        data["dataset"] = load_dataset_spec(path.parent / ds).model_dump()
    elif isinstance(ds, dict):
        for key in ("train", "valid", "test", "feature_spec"):
            if isinstance(ds.get(key), str):
                ds[key] = str((path.parent / ds[key]).resolve())
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("init_embeddings"), dict):
        for name, value in model["init_embeddings"].items():  # paths relative to this file
            entry = {"path": value} if isinstance(value, str) else value
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                entry["path"] = str((path.parent / entry["path"]).resolve())
            model["init_embeddings"][name] = entry
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _validate(TrainConfig, data, path)
