"""Settings: environment parsing, defaults, and start-up errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from service.providers import CPU, CUDA
from service.settings import Settings, SettingsError, load_settings


def test_defaults_match_the_documented_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MTRANK_MODEL_NAMES", "MTRANK_MAX_CANDIDATES", "MTRANK_ADMIN_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    s = load_settings(ranking_config=Path(__file__))
    assert s.model_names == ["ecommerce"]
    assert s.max_candidates == 2000
    assert s.max_body_bytes == 1 << 20
    assert s.redis_url is None
    assert s.admin_token is None
    assert s.ort_intra_threads == 1
    assert s.ort_providers == "auto"
    assert s.snapshot_max_age_seconds == 36 * 3600


def test_environment_is_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTRANK_MODEL_NAMES", "ctr_model, cvr_model")
    monkeypatch.setenv("MTRANK_MAX_CANDIDATES", "50")
    monkeypatch.setenv("MTRANK_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MTRANK_RANKING_CONFIG", __file__)
    s = load_settings()
    assert s.model_names == ["ctr_model", "cvr_model"]
    assert s.max_candidates == 50
    assert s.log_level == "debug"


def test_json_list_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTRANK_MODEL_NAMES", '["a", "b"]')
    assert load_settings(ranking_config=Path(__file__)).model_names == ["a", "b"]


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("MTRANK_MAX_CANDIDATES", "0", "MTRANK_MAX_CANDIDATES"),
        ("MTRANK_PORT", "70000", "MTRANK_PORT"),
        ("MTRANK_REDIS_TIMEOUT_MS", "abc", "MTRANK_REDIS_TIMEOUT_MS"),
        ("MTRANK_LOG_LEVEL", "loud", "MTRANK_LOG_LEVEL"),
        ("MTRANK_ADMIN_TOKEN", "short", "MTRANK_ADMIN_TOKEN"),
        ("MTRANK_RANKING_CONFIG", "/nonexistent/ranking.yaml", "MTRANK_RANKING_CONFIG"),
        ("MTRANK_SNAPSHOT_PATH", "/nonexistent/snap.npz", "MTRANK_SNAPSHOT_PATH"),
        ("MTRANK_MODEL_NAMES", "a,a", "MTRANK_MODEL_NAMES"),
        ("MTRANK_SNAPSHOT_MAX_AGE_SECONDS", "0", "MTRANK_SNAPSHOT_MAX_AGE_SECONDS"),
        ("MTRANK_ORT_PROVIDERS", "gpu-please", "MTRANK_ORT_PROVIDERS"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    if env != "MTRANK_RANKING_CONFIG":
        monkeypatch.setenv("MTRANK_RANKING_CONFIG", __file__)
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(SettingsError, match="MTRANK_MAX_CANDIDATE"):
        load_settings(ranking_config=Path(__file__), max_candidate=3)


def test_settings_are_frozen() -> None:
    s = Settings(ranking_config=Path(__file__))
    with pytest.raises(ValueError, match="frozen"):
        s.port = 1  # type: ignore[misc]


def test_a_misspelt_setting_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTRANK_REDIS_ULR", "redis://typo:6379/0")
    with pytest.raises(SettingsError, match="unknown setting.*MTRANK_REDIS_ULR"):
        load_settings()


def test_a_provider_missing_from_the_onnxruntime_build_stops_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MTRANK_RANKING_CONFIG", __file__)
    monkeypatch.setenv("MTRANK_ORT_PROVIDERS", "cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])  # a CPU-only build
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert str(e.value) == (
        "invalid settings: MTRANK_ORT_PROVIDERS: execution providers ['CUDAExecutionProvider'] "
        "are not available in this onnxruntime build (available: ['CPUExecutionProvider'])"
    )
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])  # a CUDA build
    assert load_settings().ort_providers == "cuda"  # whether it starts: at model load
