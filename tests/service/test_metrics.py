"""Counters that alerts read with rate()/increase() exist at 0 before their first event."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import service
from service.metrics import DEGRADED_REASONS, Metrics


def test_degraded_reasons_list_every_reason_the_service_emits() -> None:
    root = Path(service.__file__).parent
    emitted = {
        m
        for path in root.rglob("*.py")
        for m in re.findall(r'degraded\.append\("([a-z_]+)"\)', path.read_text())
    }
    assert emitted == set(DEGRADED_REASONS)


@pytest.mark.parametrize(
    "series",
    [f'mtrank_degraded_responses_total{{reason="{r}"}} 0.0' for r in DEGRADED_REASONS]
    + [f'mtrank_model_reloads_total{{result="{r}"}} 0.0' for r in ("success", "failure")],
)
def test_alerted_counters_start_at_zero(series: str) -> None:
    # A counter series born at 1 makes increase() miss its first event, and the alert with it.
    text = Metrics().exposition()[0].decode()
    assert series in text
