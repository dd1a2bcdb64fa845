"""Export a trained checkpoint into the model registry as ONNX, with a parity gate.

    mtrank export --checkpoint runs/x/best.pt --name ecommerce [--root models] [--no-promote]

Writes ``models/NAME/VERSION/{model.onnx, spec.json, metadata.json}`` (see mtrank.registry):

- ``model.onnx``: opset 17, dynamic batch axis, two packed inputs (``sparse_ids`` int64 [B, S] and
  ``dense_values`` float32 [B, D], in spec order) and one named output per task holding what
  ``model.predict`` returns: a calibrated probability, or the regression value.
- ``spec.json``: the feature contract the data pipeline built, with the model's outputs.
- ``metadata.json``: tasks, outputs, training config, data fingerprint, evaluation metrics, the
  ONNX checksum, creation time, tool versions and the parity result.

Parity is not optional: onnxruntime and torch are compared on at least 1,000 rows that include
out-of-vocabulary ids and extreme dense values; a difference above 1e-5 on any output fails the
export, and nothing is published. The difference is absolute for probabilities and relative
above 1 (:func:`parity_error`): a regression output in seconds has float32 rounding near 1e-5.
Publishing is a rename of a fully written staging directory, and ``current`` moves only after
that.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mtrank.registry import METADATA_FILE, MODEL_FILE, ModelVersion, Registry, sha256_file
from mtrank.spec import FeatureSpec
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.data import Batch, prepare
from training.metrics import auc, rmse
from training.models.base import MultiTaskModel

INT8_FILE = "model.int8.onnx"
OPSET = 17
PARITY_ROWS = 1024
PARITY_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """The export could not produce a model the service may load; nothing was published."""


class _Predictor(nn.Module):
    """The exported graph: ``model.predict`` with its dict flattened to outputs in a fixed order."""

    def __init__(self, model: MultiTaskModel, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.predict(sparse, dense)  # task -> (B,)
        return tuple(out[n] for n in self.names)


@dataclass(frozen=True)
class ParityResult:
    rows: int
    max_abs_diff: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())


def parity_inputs(spec: FeatureSpec, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows spanning each vocabulary, the OOV index 0 included, and wide dense values."""
    rng = np.random.default_rng(seed)
    sparse = np.stack(
        [rng.integers(0, f.vocab_size, size=rows) for f in spec.sparse], axis=1
    ).astype(np.int64)  # (R, S)
    sparse[: rows // 8] = 0  # a block of rows entirely out of vocabulary: the cold-start path
    dense = rng.normal(0.0, 1.0, size=(rows, len(spec.dense))).astype(np.float32)  # (R, D)
    dense[rows // 8 : rows // 4] *= 6.0  # far outside the training distribution
    return sparse.reshape(rows, len(spec.sparse)), dense


def check_parity(
    model: MultiTaskModel, onnx_path: Path, spec: FeatureSpec, rows: int, seed: int = 0
) -> ParityResult:
    sparse, dense = parity_inputs(spec, rows, seed)
    with torch.no_grad():
        expected = model.predict(torch.from_numpy(sparse), torch.from_numpy(dense))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {spec.sparse_input: sparse, spec.dense_input: dense})
    names = [o.name for o in session.get_outputs()]
    return ParityResult(rows=rows, max_abs_diff={
        n: parity_error(g, expected[n].double().numpy()) for n, g in zip(names, got, strict=True)
    })  # fmt: skip


def parity_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, |want|): absolute for probabilities (all <= 1), relative for
    regression outputs in large units (dwell seconds), where float32 alone differs by ~1e-5."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(g - w) / np.maximum(1.0, np.abs(w))))


def export_onnx(model: MultiTaskModel, spec: FeatureSpec, path: Path) -> None:
    names = list(model.output_names)
    wrapper = _Predictor(model, names).eval()
    sparse, dense = parity_inputs(spec, 4, seed=1)
    axes = {spec.sparse_input: {0: "batch"}, spec.dense_input: {0: "batch"}}
    axes.update({n: {0: "batch"} for n in names})
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is the legacy path; it is the one that
        # produces a plain, fast graph for these models without extra dependencies.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(sparse), torch.from_numpy(dense)),
            str(path),
            input_names=[spec.sparse_input, spec.dense_input],
            output_names=names,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))


def output_spec(model: MultiTaskModel, spec: FeatureSpec) -> FeatureSpec:
    """The data pipeline's spec with the outputs the model really has (ESMM adds ctcvr)."""
    return spec.model_copy(update={"outputs": model.outputs})


def _variant_metrics(
    path: Path, spec: FeatureSpec, cfg: TrainConfig, batch: Batch
) -> dict[str, float]:
    """Per-task quality of one graph on held-out rows: AUC (binary; a conditional task on its
    parent's positives, as evaluate.py judges it) or RMSE (regression)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {spec.sparse_input: batch.sparse, spec.dense_input: batch.dense})
    pred = {o.name: v.astype(np.float64) for o, v in zip(session.get_outputs(), outs, strict=True)}
    result: dict[str, float] = {}
    for t in cfg.dataset.tasks:
        y, p = batch.labels[t.name].astype(np.float64), pred[t.name]
        if t.depends_on is not None:
            rows = batch.labels[t.depends_on] >= 0.5
            y, p = y[rows], p[rows]
        if t.kind == "binary":
            result[f"{t.name}_auc"] = auc(y, p)
        else:
            result[f"{t.name}_rmse"] = rmse(y, p)
    return result


def quantize_int8(
    onnx_path: Path, spec: FeatureSpec, cfg: TrainConfig, rows: int = 50_000
) -> dict[str, Any]:
    """Write the dynamically quantised (int8 weights) graph beside ``onnx_path`` and measure
    what it costs: per-task AUC/RMSE of both graphs on the validation (else test) split."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    data = prepare(cfg.dataset, Path(cfg.out_dir) / ".cache")
    split = data.valid if data.valid is not None else data.test
    if split is None:
        raise ExportError("an int8 variant needs a valid or test split to state its accuracy")
    batch = split.take(slice(0, min(rows, len(split))))
    q_path = onnx_path.with_name(INT8_FILE)
    quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8)
    before = _variant_metrics(onnx_path, spec, cfg, batch)
    after = _variant_metrics(q_path, spec, cfg, batch)
    return {
        "file": INT8_FILE,
        "sha256": sha256_file(q_path),
        "method": "onnxruntime quantize_dynamic, int8 weights (QInt8)",
        "eval_rows": len(batch.sparse),
        "metrics_fp32": before,
        "metrics_int8": after,
        "change": {k: after[k] - before[k] for k in before},
    }


def export(
    checkpoint: Path,
    name: str,
    root: Path = Path("models"),
    promote: bool = True,
    parity_rows: int = PARITY_ROWS,
    tolerance: float = PARITY_TOLERANCE,
    quantize: bool = False,
) -> ModelVersion:
    """Export, gate on parity, publish atomically, and optionally promote to ``current``.

    ``quantize`` adds the int8 variant, published only with its measured accuracy change.
    """
    model, cfg, spec, ckpt = load_checkpoint(checkpoint)
    model.eval()
    spec = output_spec(model, spec)
    registry = Registry(root)
    staging = registry.staging_dir(name)
    try:
        onnx_path = staging / MODEL_FILE
        export_onnx(model, spec, onnx_path)
        parity = check_parity(model, onnx_path, spec, max(parity_rows, 1000))
        if parity.worst > tolerance:
            raise ExportError(
                f"parity check failed: max |onnxruntime - torch| = {parity.worst:.3g} "
                f"> {tolerance:g} ({parity.max_abs_diff}); nothing was published"
            )
        spec.save(staging)
        meta = _metadata(name, cfg.model_dump(mode="json"), ckpt, spec, onnx_path, parity)
        if quantize:
            meta["variants"] = {"int8": quantize_int8(onnx_path, spec, cfg)}
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        mv = registry.publish(name, staging)
    except BaseException:
        registry.discard(staging)
        raise
    if promote:
        registry.promote(name, mv.version)
    return mv


def _metadata(
    name: str,
    config: dict[str, Any],
    ckpt: dict[str, Any],
    spec: FeatureSpec,
    onnx_path: Path,
    parity: ParityResult,
) -> dict[str, Any]:
    return {
        "name": name,
        "model_type": config["model"]["type"],
        "tasks": [t["name"] for t in config["dataset"]["tasks"]],
        "outputs": [o.model_dump() for o in spec.outputs],
        "inputs": {"sparse": spec.sparse_input, "dense": spec.dense_input},
        "training_config": config,
        "data_fingerprint": ckpt.get("data_fingerprint"),
        "metrics": ckpt.get("metrics", {}),
        "epoch": ckpt.get("epoch"),
        "onnx_sha256": sha256_file(onnx_path),
        "spec_sha256": spec.sha256(),
        "opset": OPSET,
        "parity": {"rows": parity.rows, "max_abs_diff": parity.max_abs_diff},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": tool_versions(),
    }


def tool_versions() -> dict[str, str]:
    """The libraries an export depends on, recorded in its metadata."""
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtrank export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--name", required=True, help="model name in the registry")
    parser.add_argument("--root", default=Path("models"), type=Path, help="registry root")
    parser.add_argument("--no-promote", action="store_true", help="publish without serving it")
    parser.add_argument(
        "--quantize", choices=["int8"], default=None,
        help="also write model.int8.onnx with its AUC before/after in metadata.json",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        mv = export(args.checkpoint, args.name, args.root, promote=not args.no_promote,
                    quantize=args.quantize == "int8")  # fmt: skip
    except ExportError as e:
        print(f"mtrank export: {e}", file=sys.stderr)
        return 1
    meta = mv.metadata()
    print(f"exported {mv.name} version {mv.version} -> {mv.path}")
    print(f"  outputs: {[o['name'] for o in meta['outputs']]}")
    print(
        f"  parity: max |diff| {max(meta['parity']['max_abs_diff'].values()):.2e} "
        f"on {meta['parity']['rows']} rows"
    )
    for variant, info in (meta.get("variants") or {}).items():
        changes = ", ".join(f"{k} {v:+.4f}" for k, v in info["change"].items())
        print(f"  {variant} variant: {info['file']} ({changes} on {info['eval_rows']} rows)")
    print(f"  current: {'promoted' if not args.no_promote else 'unchanged'}")
    return 0
