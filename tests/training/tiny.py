"""A tiny feature spec, the ecommerce task layout and helpers shared by the model test files:
build a model without data, run the real export parity gate on it, and fuse its outputs with
the default fusion formula."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrank.fusion import DEFAULT_FORMULA, DEFAULT_PARAMS, RULE_WEIGHT, Formula
from mtrank.spec import DenseField, FeatureSpec, SparseField, TaskOutput
from training.config import DatasetSpec, ModelConfig, SparseColumn, TaskColumn, TrainConfig
from training.export import check_parity, export_onnx, output_spec
from training.models import MultiTaskModel, build_model

TASKS = [
    TaskColumn(name="ctr", label="click"),
    TaskColumn(name="cvr", label="purchase", depends_on="ctr"),
    TaskColumn(name="cart", label="cart", depends_on="ctr"),
    TaskColumn(name="collect", label="collect", depends_on="ctr"),
    TaskColumn(name="stay", label="stay", kind="regression", transform="log1p"),
]


def spec_for(tasks: list[TaskColumn]) -> FeatureSpec:
    """Two id fields and two numbers, with one output per task."""
    return FeatureSpec(
        sparse=[
            SparseField(name="user", source="user", vocab=[f"u{i}" for i in range(6)]),
            SparseField(name="item", source="item", vocab=[f"i{i}" for i in range(9)]),
        ],
        dense=[
            DenseField(name="price", source="item", mean=0.0, std=1.0, default=0.0),
            DenseField(name="age", source="user", mean=0.0, std=1.0, default=0.0),
        ],
        outputs=[TaskOutput(name=t.name, kind=t.kind) for t in tasks],
    )


SPEC = spec_for(TASKS)
SMALL = {"embed_dim": 4, "bottom_units": [8, 6], "tower_units": [4], "expert_units": [8]}


def config(model_type: str, tasks: list[TaskColumn] | None = None, **model: Any) -> TrainConfig:
    ds = DatasetSpec(
        name="tiny",
        train="unused.csv",
        sparse=[SparseColumn(name="user"), SparseColumn(name="item")],
        tasks=TASKS if tasks is None else tasks,
    )
    return TrainConfig(
        dataset=ds, model=ModelConfig.model_validate({**SMALL, **model, "type": model_type})
    )


def build(model_type: str, tasks: list[TaskColumn] | None = None, **model: Any) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_model(config(model_type, tasks, **model), SPEC)


def inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([f.vocab_size for f in SPEC.sparse])
    sparse = (torch.rand(rows, 2, generator=g) * sizes).long()  # (R, 2)
    sparse[: rows // 4] = 0  # out-of-vocabulary rows
    return sparse, torch.randn(rows, 2, generator=g)  # (R, 2), (R, 2)


def export_parity(model: MultiTaskModel, out_dir: Path) -> dict[str, float]:
    """training.export's own graph and parity gate: max |onnxruntime - torch| per output."""
    model.eval()
    spec = output_spec(model, SPEC)
    path = out_dir / "model.onnx"
    export_onnx(model, spec, path)
    return check_parity(model, path, spec, rows=1000).max_abs_diff


def fuse(pred: dict[str, torch.Tensor]) -> np.ndarray:
    """The default fusion formula, unchanged, over a model's outputs (price 20, no rules)."""
    n = len(next(iter(pred.values())))
    env = {k: v.detach().double().numpy() for k, v in pred.items()}
    env |= {"price": np.full(n, 20.0), RULE_WEIGHT: np.ones(n)}
    formula = Formula.parse(DEFAULT_FORMULA, allowed=env, constants=DEFAULT_PARAMS)
    return formula.evaluate(env, n)
