"""Export a trained LTR model to ONNX, gate it on parity, and publish it as a registry version.

    trained model -> ltr.onnx (LightGBM: onnxmltools; BPR: torch.onnx)
                  -> parity: onnxruntime vs the native model on validation inputs, <= 1e-5
                  -> metadata.json ("kind": "ltr", inputs, trainer, grades, metrics, sha256)
                  -> staging directory renamed into models/NAME/VERSION, optionally promoted

Parity is not optional: the validation inputs (and the same rows scaled far outside the range
the model saw, and all-zero rows) are scored by onnxruntime and by the native model (LightGBM's
booster, torch); a difference above 1e-5 on any row fails the export and nothing is published.
The difference is :func:`training.export.parity_error`, as for the ranker: absolute for scores
up to 1 in magnitude, relative above, because an LTR score is unbounded and float32 alone
rounds a score of 40 by 4e-6 (BPR on rows far out of range reaches such scores, and torch and
onnxruntime sum in different orders). Tree ensembles compare float32 inputs with thresholds: a
threshold that rounds to a different float32 than LightGBM's double sends a row down another
branch, a difference of a whole leaf value; the gate caught one on the single-model baseline,
and :func:`training.ltr.lambdamart.float32_exact` now lowers every threshold to a float32 before
conversion, which leaves the booster's scores of float32 inputs unchanged.
"""

from __future__ import annotations

import json
import platform
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import onnx
import onnxmltools
import onnxruntime as ort
import torch

from mtrank.ltr_artefact import (
    INPUT_NAME,
    LTR_KIND,
    LTR_MODEL_FILE,
    METADATA_FILE,
    InputSpace,
    LtrMetadata,
    RankerRef,
    Trainer,
    checksums,
    promote,
    publish,
)
from mtrank.registry import ModelVersion, Registry
from training.export import parity_error
from training.ltr.bpr import BprScorer
from training.ltr.config import LtrConfig
from training.ltr.relevance import Relevance

PARITY_TOLERANCE = 1e-5
BPR_OPSET = 17
BPR_OUTPUT = "score"


class LtrExportError(RuntimeError):
    """The export could not produce a model the service may load; nothing was published."""


@dataclass(frozen=True)
class Trained:
    """A fitted LTR model: its native scorer, its ONNX graph and what training reported."""

    trainer: Trainer
    input_space: InputSpace
    inputs: tuple[str, ...]
    native: Callable[[np.ndarray], np.ndarray]  # (n, F) float32 -> (n,) float64
    graph: onnx.ModelProto
    info: dict[str, Any] = field(default_factory=dict)


def bpr_to_onnx(model: BprScorer, n_inputs: int) -> onnx.ModelProto:
    """The scorer as an ONNX graph: float32 ``inputs`` [N, F] -> float32 ``score`` [N]."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is the legacy path; it is the one that
        # writes a plain graph without extra dependencies (as training/export.py).
        warnings.simplefilter("ignore")
        path = Path(tmp) / LTR_MODEL_FILE
        torch.onnx.export(
            model, (torch.zeros(2, n_inputs),), str(path), input_names=[INPUT_NAME],
            output_names=[BPR_OUTPUT], dynamic_axes={INPUT_NAME: {0: "n"}, BPR_OUTPUT: {0: "n"}},
            opset_version=BPR_OPSET, dynamo=False,
        )  # fmt: skip
        graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    return graph


def parity_inputs(x: np.ndarray, rows: int) -> np.ndarray:
    """Validation rows, the same rows scaled by 10 (out of range), and a block of zeros."""
    head = np.asarray(x[:rows], dtype=np.float32)  # (R, F)
    far = head[: max(1, len(head) // 8)] * np.float32(10.0)
    zeros = np.zeros((8, x.shape[1]), dtype=np.float32)
    return np.concatenate([head, far, zeros], axis=0)


def onnx_scores(graph: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime scores (n,) float64 of ``graph`` on float32 rows (one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    (out,) = session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
    return np.asarray(out, dtype=np.float64).reshape(-1)


def check_parity(trained: Trained, x: np.ndarray, rows: int) -> dict[str, float]:
    """The parity error over :func:`parity_inputs` (module docstring) and the largest absolute
    difference; raises :class:`LtrExportError` above the tolerance."""
    probe = parity_inputs(x, rows)
    got, want = onnx_scores(trained.graph, probe), trained.native(probe)
    diff = np.abs(got - want) / np.maximum(1.0, np.abs(want))  # parity_error, row by row
    worst = parity_error(got, want) if len(probe) else 0.0
    if not worst <= PARITY_TOLERANCE:
        raise LtrExportError(
            f"ONNX parity failed: |onnx - native| / max(1, |native|) = {worst:.3g} > "
            f"{PARITY_TOLERANCE:g} on {len(probe)} rows (row {int(np.argmax(diff))}); "
            "nothing was published"
        )
    return {
        "rows": float(len(probe)),
        "max_error": worst,
        "max_abs_diff": float(np.max(np.abs(got - want))) if len(probe) else 0.0,
        "tolerance": PARITY_TOLERANCE,
    }


def tool_versions() -> dict[str, str]:
    """The libraries an LTR export depends on, recorded in its metadata."""
    return {
        "lightgbm": lgb.__version__,
        "onnxmltools": onnxmltools.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


def export_ltr(
    cfg: LtrConfig,
    trained: Trained,
    parity_x: np.ndarray,
    metrics: dict[str, float],
    ranker: RankerRef | None,
    registry: Registry | None = None,
    relevance: Relevance | None = None,
) -> ModelVersion:
    """Gate ``trained`` on parity, then publish it as a new version of ``cfg.name``."""
    registry = registry or Registry(cfg.root)
    registry.model_dir(cfg.name)  # checks the name before any work
    parity = check_parity(trained, parity_x, cfg.parity_rows)
    outputs = [o.name for o in trained.graph.graph.output]
    if len(outputs) != 1:
        raise LtrExportError(f"the LTR graph has {len(outputs)} outputs, expected one score")
    staging = registry.staging_dir(cfg.name)
    try:
        onnx.save(trained.graph, str(staging / LTR_MODEL_FILE))
        meta: dict[str, Any] = {
            "kind": LTR_KIND,
            "name": cfg.name,
            "trainer": trained.trainer,
            "input_space": trained.input_space,
            "inputs": list(trained.inputs),
            "input_name": INPUT_NAME,
            "output_name": outputs[0],
            "grades": dict(cfg.grades),
            "label_gain": relevance.gains if relevance is not None else cfg.gains(),
            "relevance": None if relevance is None else relevance.to_json(),
            "ranker": None if ranker is None else ranker.model_dump(),
            "metrics": metrics,
            "parity": parity,
            "training": trained.info,
            "config": cfg.model_dump(mode="json"),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tool_versions": tool_versions(),
            "sha256": checksums(staging),
        }
        LtrMetadata.parse(meta)  # what the service will check, checked before publishing
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        mv = publish(registry, cfg.name, staging)
    except BaseException:
        registry.discard(staging)
        raise
    return promote(registry, cfg.name, mv.version) if cfg.promote else mv


def read_graph(path: Path) -> onnx.ModelProto:
    """A published ltr.onnx, loaded (for evaluation and tests)."""
    return onnx.load(str(path))
