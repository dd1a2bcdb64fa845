"""Typed configuration of a recall training run, loaded from strict YAML.

One document, :class:`RecallTrainConfig`: where the generated data lives and how it becomes
features (``data``), the architecture (``model``), the retrieval loss (``loss``), how candidates
are judged (``eval``) and the optimisation. An unknown key or a bad value is an error naming the
file and the key; the resolved config is saved in every checkpoint and export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtrank.yamlio import read_yaml_mapping, validation_messages
from training.config import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserColumn(_Strict):
    name: str
    min_count: int = Field(1, ge=1, description="rarer values (in train clicks) go to OOV")


class RecallDataConfig(_Strict):
    """The generator's folder (``mtrank synth ecommerce``) and the feature settings."""

    data_dir: str = Field(description="{train,valid,test}.parquet, users/items/titles.parquet")
    user_columns: list[UserColumn] = [
        UserColumn(name="age_bucket"),
        UserColumn(name="city_tier"),
        UserColumn(name="gender"),
    ]
    item_columns: list[str] = Field(
        ["category", "brand"], description="item attributes embedded by the item tower"
    )
    price_column: str | None = Field("price", description="log1p-normalised dense input; None")
    item_min_count: int = Field(1, ge=1, description="train clicks for an item id to get a row")
    history_max_len: int = Field(20, ge=1, description="most recent clicks kept in a history")
    title_max_len: int = Field(12, ge=1, description="first title tokens kept")
    token_min_count: int = Field(2, ge=1, description="train items a token must title")
    min_history: int = Field(
        0, ge=0, description="train examples need this many earlier clicks (0: cold starts too)"
    )


class RecallModelConfig(_Strict):
    """Architecture and sizes; see training/recall/models.py."""

    type: Literal["dssm", "youtube_dnn"] = "dssm"
    text_tower: Literal["none", "cnn", "lstm"] = Field(
        "none", description="dssm only: the item title encoder (CNN-DSSM, LSTM-DSSM)"
    )
    embed_dim: int = Field(32, ge=1, description="width of every id embedding")
    output_dim: int = Field(64, ge=1, description="D: the user and item vector width")
    user_units: list[int] = [128]
    item_units: list[int] = [128]
    similarity: Literal["dot", "cosine"] = "cosine"
    temperature: float = Field(0.05, gt=0, description="initial softmax temperature")
    learn_temperature: bool = True
    share_item_embeddings: bool = Field(
        True, description="dssm: the history pooling and the item tower share item id rows"
    )
    text_embed_dim: int = Field(32, ge=1)
    text_channels: int = Field(64, ge=1, description="CNN filters / LSTM hidden units")
    cnn_kernel: int = Field(3, ge=1, description="CNN window in tokens (Shen et al.: 3)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _text_needs_dssm(self) -> RecallModelConfig:
        if self.type == "youtube_dnn" and self.text_tower != "none":
            raise ValueError("text_tower applies to type dssm only (youtube_dnn has no item tower)")
        return self


class RecallLossConfig(_Strict):
    """Softmax over candidates; see training/recall/losses.py."""

    type: Literal["in_batch", "sampled", "both", "full"] = "in_batch"
    log_q_correction: bool = Field(
        True, description="subtract log q(item), q from train click frequencies (Yi et al.)"
    )
    num_negatives: int = Field(256, ge=1, description="sampled / both: shared negatives a step")
    hard_negatives: int = Field(0, ge=0, description="same-category negatives per example")
    purchase_weight: float = Field(
        1.0, ge=0.0, description="weight of an example whose click led to a purchase"
    )


class RecallEvalConfig(_Strict):
    ks: list[int] = [50, 100, 500]
    exclude_seen: bool = Field(
        True, description="drop items the user clicked before the evaluated period"
    )
    batch_users: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _positive_ks(self) -> RecallEvalConfig:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be non-empty and >= 1, got {self.ks}")
        return self


class RecallEarlyStopping(_Strict):
    metric: str = Field("recall@100", description="hr@K, recall@K or ndcg@K on valid")
    patience: int = Field(2, ge=1, description="validation points without improvement")


class RecallTrainConfig(_Strict):
    data: RecallDataConfig
    model: RecallModelConfig = RecallModelConfig()
    loss: RecallLossConfig = RecallLossConfig()
    eval: RecallEvalConfig = RecallEvalConfig()
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    early_stopping: RecallEarlyStopping = RecallEarlyStopping()
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: int | None = Field(None, ge=1)
    out_dir: str = "runs"

    @model_validator(mode="after")
    def _metric_is_evaluated(self) -> RecallTrainConfig:
        name, _, k = self.early_stopping.metric.partition("@")
        if name not in ("hr", "recall", "ndcg") or not k.isdigit() or int(k) not in self.eval.ks:
            raise ValueError(
                f"early_stopping.metric {self.early_stopping.metric!r} must be hr@K, recall@K "
                f"or ndcg@K with K in eval.ks {self.eval.ks}"
            )
        return self

    @property
    def run_name(self) -> str:
        text = "" if self.model.text_tower == "none" else f"_{self.model.text_tower}"
        return f"recall_{self.model.type}{text}"


def load_recall_config(
    path: Path | str, overrides: dict[str, Any] | None = None
) -> RecallTrainConfig:
    """Load a recall config; ``data.data_dir`` is relative to the file; ``overrides`` are dotted
    keys (``{"model.output_dim": 32}``) applied before validation."""
    path = Path(path)
    data = read_yaml_mapping(path, ConfigError, "config", "expected a mapping at the top level")
    block = data.get("data")
    if isinstance(block, dict) and isinstance(block.get("data_dir"), str):
        block["data_dir"] = str((path.parent / block["data_dir"]).resolve())
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return RecallTrainConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  {line}" for line in validation_messages(e)]
        raise ConfigError(f"{path}: invalid RecallTrainConfig:\n" + "\n".join(lines)) from e
