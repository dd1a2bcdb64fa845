"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

from tests.support.trained import TrainedWorld, build_trained_world


@pytest.fixture(scope="session")
def trained_world(tmp_path_factory: pytest.TempPathFactory) -> TrainedWorld:
    """A tiny MMoE trained on synthetic logs and exported by the real pipeline (read-only)."""
    return build_trained_world(tmp_path_factory.mktemp("trained"))
