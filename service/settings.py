"""Service settings: one typed object read from ``MTRANK_*`` environment variables.

Everything the process needs to start is here and checked before anything is loaded, so a bad
value stops start-up with a message that names the variable instead of failing on the first
request. Lists accept either JSON (``["a","b"]``) or a comma-separated string (``a,b``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.providers import ProviderError, resolve_providers

ENV_PREFIX = "MTRANK_"
DEFAULT_RANKING_CONFIG = Path(__file__).parent / "config" / "ranking.yaml"


class SettingsError(ValueError):
    """A setting that does not validate; the message names the environment variable."""


class Settings(BaseSettings):
    """Process configuration. Field ``x`` is read from ``MTRANK_X``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model_dir: Path = Field(Path("models"), description="model registry root")
    model_names: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["ecommerce"],
        min_length=1,
        description="models served together; their outputs are merged by name",
    )
    redis_url: str | None = Field(None, description="None: embedded store from the snapshot file")
    snapshot_path: Path | None = Field(
        None, description="embedded store file; default: the registry's latest for the spec"
    )
    feature_namespace: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Redis key namespace; None: the first model name (as `mtrank features load`)",
    )
    recall_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="registry name of the recall model; None: /recall and /recommend are off",
    )
    recall_max_k: int = Field(1000, ge=1, le=100_000, description="the largest k of /recall")
    history_path: Path | None = Field(
        None, description="embedded history file; default: the newest under models/RECALL/"
    )
    history_namespace: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Redis namespace of the histories; None: the recall model's name",
    )
    ranking_config: Path = DEFAULT_RANKING_CONFIG
    max_candidates: int = Field(2000, ge=1, le=100_000)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    redis_timeout_ms: int = Field(50, ge=1, le=60_000)
    snapshot_max_age_seconds: float = Field(
        129_600.0, gt=0, description="feature snapshot age that fires MtrankFeatureSnapshotStale"
    )
    model_variant: Literal["fp32", "int8"] = Field(
        "fp32", description="graph to serve: model.onnx, or the int8 variant the export recorded"
    )
    ort_providers: str = Field("auto", description="'auto' or a comma-separated provider list")
    ort_intra_threads: int = Field(1, ge=0, le=256)
    inference_threads: int = Field(2, ge=1, le=64, description="executor threads for ONNX runs")
    events_max_batch: int = Field(1000, ge=1, le=100_000, description="events per POST /events")
    events_future_tolerance_s: float = Field(
        300.0, ge=0.0, description="how far in the future an event's ts may be (clock skew)"
    )
    events_dedup_hours: float = Field(
        1.0, gt=0.0, description="how long an accepted event_id is remembered (retries)"
    )
    events_retention_hours: float = Field(
        168.0, gt=0.0, description="how long the event stream keeps an entry (MINID trimming)"
    )
    events_timeout_ms: int = Field(1000, ge=1, le=60_000, description="deadline of one batch")
    events_key: str | None = Field(
        None, min_length=16, description="request-id key; None: derived from the deployment"
    )
    served_log_dir: Path | None = Field(
        None, description="served-feature log directory (mtrank.served_log); None: off"
    )
    served_log_sample: float = Field(
        0.01, ge=0.0, le=1.0, description="share of requests logged (drawn per request)"
    )
    served_log_flush_s: float = Field(5.0, gt=0.0, description="a segment at least this often")
    served_log_max_rows: int = Field(
        100_000, ge=1, description="rows (candidates) per segment at most"
    )
    shadow_max_in_flight: int = Field(
        4, ge=1, le=1024,
        description="shadow runs not yet finished beyond which new ones are skipped (busy)",
    )  # fmt: skip
    admin_token: str | None = Field(None, min_length=16, description="None: admin routes off")
    reload_poll_seconds: float = Field(10.0, ge=0.0, description="0: no background watcher")
    config_poll_seconds: float = Field(
        10.0, ge=0.0, description="ranking config file checks; 0: start-up and admin reload only"
    )
    workers: int = Field(1, ge=1, le=256)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("model_names", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("ort_providers")
    @classmethod
    def _providers_installed(cls, value: str) -> str:
        # Whether a named provider can start is only known with a session (runtime.py); whether
        # this onnxruntime build has it at all is known now.
        try:
            resolve_providers(value)
        except ProviderError as e:
            raise ValueError(str(e)) from e
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_files(self) -> Settings:
        if len(set(self.model_names)) != len(self.model_names):
            raise ValueError(f"MTRANK_MODEL_NAMES repeats a name: {self.model_names}")
        if not self.ranking_config.is_file():
            raise ValueError(f"MTRANK_RANKING_CONFIG: no such file {self.ranking_config}")
        if self.history_path is not None and not self.history_path.is_file():
            raise ValueError(f"MTRANK_HISTORY_PATH: no such file {self.history_path}")
        if self.snapshot_path is not None and not self.snapshot_path.is_file():
            raise ValueError(f"MTRANK_SNAPSHOT_PATH: no such file {self.snapshot_path}")
        return self


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus explicit overrides) or raise :class:`SettingsError`.

    The message lists every bad key as its environment variable, e.g. ``MTRANK_PORT``.
    """
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in fields)
    if unknown:
        # A misspelt setting would otherwise be ignored and its default silently used.
        raise SettingsError(f"unknown setting(s) {', '.join(unknown)}: see docs/configuration.md")
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise SettingsError(describe_errors(e)) from e


def describe_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        msg = str(item["msg"]).removeprefix("Value error, ")
        if item["loc"]:
            lines.append(f"{ENV_PREFIX}{str(item['loc'][0]).upper()}: {msg}")
        else:  # a cross-field check: its message already names the variable
            lines.append(msg)
    return "invalid settings: " + "; ".join(lines)
