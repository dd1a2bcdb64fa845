"""Model versions for the service tests, every one trained and exported by the real pipeline.

The session's trained world (harness/trained.py) holds one tiny MMoE; :func:`train_alternate`
trains a second one on the same data and features with another seed, so that a test can tell two
versions apart by their outputs. :meth:`ExportedModels.publish` copies either into a test's own
registry as a new version, optionally serving a cut-down spec (fewer outputs, another
normalisation) or broken on purpose by ``mutate``. Expected scores come from :func:`onnx_outputs`:
onnxruntime run directly on the published ``model.onnx``, outside the service's runtime.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from harness.trained import TrainedWorld, ecommerce_config
from mtrank.registry import METADATA_FILE, ModelVersion, Registry
from mtrank.snapshot import Snapshot
from mtrank.spec import FeatureSpec
from training.export import export
from training.train import train

ALTERNATE_SEED, ALTERNATE_STEPS = 1, 30


def train_alternate(world: TrainedWorld, base: Path) -> ModelVersion:
    """Another MMoE on ``world``'s prepared data (same spec, other weights), in ``base/models``.

    Seed 1 and 30 steps: about a second on two cores, and outputs far from the world's model.
    """
    cfg = ecommerce_config(world.data_dir, world.cfg.model.type, out_dir=base,
                           seed=ALTERNATE_SEED, max_steps=ALTERNATE_STEPS, epochs=1)  # fmt: skip
    result = train(cfg, base / "run", world.data)
    return export(result.best_checkpoint, world.model.name, base / "models", promote=False)


@dataclass(frozen=True)
class ExportedModels:
    """The session's exported models, to publish copies of into a test's registry."""

    main: ModelVersion  # the trained world's model
    alternate: ModelVersion  # same features, other weights

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.load(self.main.path)

    def publish(
        self,
        root: Path,
        name: str,
        *,
        alternate: bool = False,
        outputs: Sequence[str] | None = None,
        spec: FeatureSpec | None = None,
        mutate: Callable[[Path], None] | None = None,
        promote: bool = True,
    ) -> ModelVersion:
        """A copy of an exported version published under ``root/name`` (a new version).

        ``outputs`` keeps only those outputs in the copy's spec.json, ``spec`` replaces it
        (metadata.json is updated to match: the change is deliberate, not corruption); the graph
        is the exported one, so it still computes every output. ``mutate(staging_dir)`` may then
        break the copy (truncate model.onnx, rewrite a file) before it is published.
        """
        source = self.alternate if alternate else self.main
        registry = Registry(root)
        staging = registry.staging_dir(name)
        shutil.copytree(source.path, staging, dirs_exist_ok=True)
        if outputs is not None:
            base = spec or FeatureSpec.load(source.path)
            keep = [o for o in base.outputs if o.name in outputs]
            if [o.name for o in keep] != list(outputs):
                raise ValueError(f"outputs {outputs} are not in the order of {base.task_names}")
            spec = base.model_copy(update={"outputs": keep})
        if spec is not None:
            spec.save(staging)
            meta = json.loads((staging / METADATA_FILE).read_text())
            meta |= {"spec_sha256": spec.sha256(), "name": name,
                     "outputs": [o.model_dump() for o in spec.outputs]}  # fmt: skip
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if mutate is not None:
            mutate(staging)
        mv = registry.publish(name, staging)
        return registry.promote(name, mv.version) if promote else mv


@functools.lru_cache(maxsize=16)
def _session(model_path: str, sha: str) -> ort.InferenceSession:
    del sha  # part of the cache key only: a rewritten file gets a new session
    return ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])


def onnx_outputs(mv: ModelVersion, sparse: np.ndarray, dense: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of ``mv``'s model.onnx for these inputs, by plain onnxruntime: {name: (N,)}."""
    spec = FeatureSpec.load(mv.path)
    sess = _session(str(mv.model_path), str(mv.model_path.stat().st_mtime_ns))
    names = [o.name for o in sess.get_outputs()]
    feeds = {spec.sparse_input: sparse.astype(np.int64), spec.dense_input: dense.astype(np.float32)}
    outs = sess.run(names, feeds)
    n = len(sparse)
    return {k: np.asarray(o, np.float64).reshape(n) for k, o in zip(names, outs, strict=True)}


def random_inputs(spec: FeatureSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of in-vocabulary ids and standard-normal dense values for ``spec``."""
    rng = np.random.default_rng(seed)
    high = np.array([f.vocab_size for f in spec.sparse])
    sparse = rng.integers(0, high, size=(n, len(high))).astype(np.int64)  # (n, S)
    dense = rng.normal(size=(n, len(spec.dense))).astype(np.float32)  # (n, D)
    return sparse, dense


def short_id_snapshot(src: Snapshot, n_users: int, n_items: int, version: str) -> Snapshot:
    """The first real encoded records of ``src`` under the short ids tests address: ``u{k}``,
    ``i{k}``. Records are copies; callers set caps and categories on them as they need."""
    if n_users > len(src.user_ids) or n_items > len(src.item_ids):
        raise ValueError(f"the snapshot holds {len(src.user_ids)} users, {len(src.item_ids)} items")
    return Snapshot(
        spec_sha256=src.spec_sha256,
        version=version,
        user_ids=np.array([f"u{k}" for k in range(n_users)]),
        users=src.users[:n_users].copy(),
        item_ids=np.array([f"i{k}" for k in range(n_items)]),
        items=src.items[:n_items].copy(),
        attribute_tables=dict(src.attribute_tables),
    )
