"""Fixtures shared by every test folder: the models every test serves come from the real pipeline.

``trained_world`` generates tiny synthetic logs, trains an MMoE on them, exports it (parity-gated)
and builds its feature snapshot, once per session (about 6 s on two cores). ``exported_models``
adds a second version with the same features and other weights (about 1 s more) for tests that
must tell versions apart.
"""

from __future__ import annotations

import pytest

from harness.trained import TrainedWorld, build_trained_world
from tests.support.exported import ExportedModels, train_alternate


@pytest.fixture(scope="session")
def trained_world(tmp_path_factory: pytest.TempPathFactory) -> TrainedWorld:
    """A tiny MMoE trained on synthetic logs and exported by the real pipeline (read-only)."""
    return build_trained_world(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def exported_models(
    trained_world: TrainedWorld, tmp_path_factory: pytest.TempPathFactory
) -> ExportedModels:
    """The world's model and an alternate, to publish copies of into a test's registry."""
    alternate = train_alternate(trained_world, tmp_path_factory.mktemp("alternate"))
    return ExportedModels(trained_world.model, alternate)
