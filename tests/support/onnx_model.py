"""A tiny real ONNX model and a random snapshot for service tests (until the exporter exists).

Each output ``k`` is ``sigmoid(sum_j table_k[offset_j + sparse[:, j]] + dense @ w_k + b_k)``: one
Gather over a table that stacks every field's vocabulary, a MatMul on the dense values and a
Sigmoid, shaped ``[batch]`` like the exporter's outputs. :func:`reference_outputs` recomputes it
in numpy from the initialisers stored in the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.registry import METADATA_FILE, MODEL_FILE, ModelVersion, Registry
from mtrank.snapshot import Snapshot, item_dtype, user_dtype
from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput

OUTPUTS = ("ctr", "cvr", "stay", "cart", "collect")
OPSET, IR_VERSION = 17, 8


def make_spec(outputs: Sequence[str] = OUTPUTS) -> FeatureSpec:
    """A small spec with fields from every source, interleaved so column order matters."""
    return FeatureSpec(
        sparse=[
            SparseField(name="item_id", source="item", vocab=[f"i{k}" for k in range(20)]),
            SparseField(name="user_id", source="user", vocab=[f"u{k}" for k in range(10)]),
            SparseField(name="device", source="context", vocab=["ios", "android", "web"]),
            SparseField(name="category", source="item", vocab=["shoes", "hats", "bags"]),
            SparseField(name="segment", source="user", vocab=["new", "vip"]),
        ],
        dense=[
            DenseField(name="price", source="item", mean=3.0, std=1.5, default=20.0, log1p=True),
            DenseField(name="hour", source="context", mean=12.0, std=7.0, default=12.0),
            DenseField(name="age", source="user", mean=35.0, std=10.0, default=30.0),
            DenseField(name="quality_score", source="item", mean=0.5, std=0.2, default=0.5),
        ],
        outputs=[
            TaskOutput(name=o, kind="regression" if o == "stay" else "binary") for o in outputs
        ],
    )


def build_graph(
    spec: FeatureSpec, seed: int = 0, sparse_input: str | None = None
) -> onnx.ModelProto:
    """The test graph for ``spec``; ``sparse_input`` renames the graph input (to break it)."""
    rng = np.random.default_rng(seed)
    sizes = [f.vocab_size for f in spec.sparse]
    offsets = np.cumsum([0, *sizes[:-1]]).astype(np.int64).reshape(1, -1)  # (1, S)
    s_in, d_in = sparse_input or spec.sparse_input, spec.dense_input
    inits = [numpy_helper.from_array(offsets, "offsets")]
    nodes = [helper.make_node("Add", [s_in, "offsets"], ["rows"])]  # (B, S)
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    outputs = []
    for name in spec.task_names:
        table = rng.normal(0, 0.5, size=sum(sizes)).astype(np.float32)  # (T,)
        w = rng.normal(0, 0.5, size=len(spec.dense)).astype(np.float32)  # (D,)
        b = rng.normal(0, 0.1, size=()).astype(np.float32)
        inits += [
            numpy_helper.from_array(table, f"{name}_table"),
            numpy_helper.from_array(w, f"{name}_w"),
            numpy_helper.from_array(np.asarray(b), f"{name}_b"),
        ]
        nodes += [
            helper.make_node("Gather", [f"{name}_table", "rows"], [f"{name}_emb"]),  # (B, S)
            helper.make_node("ReduceSum", [f"{name}_emb", "axis1"], [f"{name}_s"], keepdims=0),
            helper.make_node("MatMul", [d_in, f"{name}_w"], [f"{name}_d"]),  # (B,)
            helper.make_node("Add", [f"{name}_s", f"{name}_d"], [f"{name}_sd"]),
            helper.make_node("Add", [f"{name}_sd", f"{name}_b"], [f"{name}_logit"]),
            helper.make_node("Sigmoid", [f"{name}_logit"], [name]),  # (B,)
        ]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch"]))
    graph = helper.make_graph(
        nodes,
        "mtrank_test",
        [
            helper.make_tensor_value_info(s_in, TensorProto.INT64, ["batch", len(spec.sparse)]),
            helper.make_tensor_value_info(d_in, TensorProto.FLOAT, ["batch", len(spec.dense)]),
        ],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_test_model(
    root: Path,
    name: str,
    spec: FeatureSpec | None = None,
    seed: int = 0,
    outputs: Sequence[str] = OUTPUTS,
    *,
    sparse_input: str | None = None,
    promote: bool = True,
) -> ModelVersion:
    """Write model.onnx + spec.json + metadata.json, publish under ``root`` and promote it."""
    spec = spec or make_spec(outputs)
    registry = Registry(root)
    staging = registry.staging_dir(name)
    onnx.save(build_graph(spec, seed, sparse_input), str(staging / MODEL_FILE))
    spec.save(staging)
    meta = {"name": name, "tasks": spec.task_names, "seed": seed, "builder": "tests.support"}
    (staging / METADATA_FILE).write_text(json.dumps(meta))
    version = f"v{seed}-{os.urandom(3).hex()}"
    mv = registry.publish(name, staging, version)
    return registry.promote(name, mv.version) if promote else mv


def reference_outputs(
    mv: ModelVersion, sparse: np.ndarray, dense: np.ndarray
) -> dict[str, np.ndarray]:
    """The test graph recomputed in numpy from the initialisers in ``model.onnx``."""
    model = onnx.load(str(mv.model_path))
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    rows = sparse + w["offsets"].astype(np.int64)  # (N, S)
    names = [o.name for o in model.graph.output]
    return {
        k: 1.0 / (1.0 + np.exp(-(w[f"{k}_table"][rows].sum(1) + dense @ w[f"{k}_w"] + w[f"{k}_b"])))
        for k in names
    }


def build_test_snapshot(
    spec: FeatureSpec, n_users: int, n_items: int, seed: int = 0, version: str | None = None
) -> Snapshot:
    """Users ``u0..`` and items ``i0..`` with random raw attributes encoded per ``spec``."""
    rng = np.random.default_rng(seed)

    def raw_entity(source: str, k: int) -> dict[str, object]:
        sparse, dense = spec.fields(source)  # type: ignore[arg-type]
        raw: dict[str, object] = {}
        for f in sparse:  # some values unseen by the vocabulary -> OOV
            raw[f.name] = f.vocab[k % len(f.vocab)] if rng.random() < 0.8 else "unseen"
        for g in dense:
            raw[g.name] = float(rng.uniform(0.0, 50.0)) if rng.random() < 0.9 else None
        return raw

    users = np.zeros(n_users, dtype=user_dtype(spec))
    for k in range(n_users):
        users["sparse"][k], users["dense"][k] = spec.encode_entity("user", raw_entity("user", k))
    items = np.zeros(n_items, dtype=item_dtype(spec))
    for k in range(n_items):
        items["sparse"][k], items["dense"][k] = spec.encode_entity("item", raw_entity("item", k))
    for name, dtype in ITEM_ATTRIBUTES.record_fields():
        low, high = (0, 50) if name != "promoted" else (0, 2)
        items[name] = rng.uniform(low, high, n_items).astype(dtype)
    return Snapshot(
        spec_sha256=spec.sha256(),
        version=version or f"snap-{seed}",
        user_ids=np.array([f"u{k}" for k in range(n_users)]),
        users=users,
        item_ids=np.array([f"i{k}" for k in range(n_items)]),
        items=items,
        attribute_tables={"category": ["shoes", "hats", "bags"]},
    )
