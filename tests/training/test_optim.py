"""training.optim: the learning-rate schedule, the embedding optimisers, the frequency penalty."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtrank.spec import FeatureSpec, SparseField, TaskOutput
from training.config import (
    ConfigError,
    DatasetSpec,
    LRSchedule,
    SparseColumn,
    TaskColumn,
    TrainConfig,
)
from training.models import build_model
from training.models.base import MultiTaskModel
from training.optim import (
    FrequencyRegularizer,
    WeightAverage,
    build_optimizers,
    embedding_layers,
    lr_factor,
)

TASKS = [TaskColumn(name="ctr", label="click")]
SPEC = FeatureSpec(
    sparse=[
        SparseField(name="user", source="user", vocab=["a", "b", "c"]),  # rows 0..3
        SparseField(name="item", source="item", vocab=["x", "y"]),  # rows 4..6
    ],
    dense=[],
    outputs=[TaskOutput(name="ctr", kind="binary")],
)


def config(**update: object) -> TrainConfig:
    ds = DatasetSpec(
        name="t",
        train="unused.csv",
        sparse=[SparseColumn(name="user"), SparseColumn(name="item")],
        tasks=TASKS,
    )
    model = {"type": "shared_bottom", "embed_dim": 3, "bottom_units": [4], "tower_units": []}
    return TrainConfig.model_validate({"dataset": ds, "model": model, "lr": 0.01, **update})


def model_of(cfg: TrainConfig) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_model(cfg, SPEC)


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("schedule", "step", "want"),
    [
        (LRSchedule(), 0, 1.0),
        (LRSchedule(), 500, 1.0),
        (LRSchedule(warmup_steps=10), 0, 0.1),  # (step + 1) / warmup
        (LRSchedule(warmup_steps=10), 4, 0.5),
        (LRSchedule(warmup_steps=10), 9, 1.0),
        (LRSchedule(warmup_steps=10), 50, 1.0),
        (LRSchedule(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), 10, 1.0),
        (LRSchedule(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), 60, 0.55),  # halfway
        (LRSchedule(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), 110, 0.1),  # last step
        (LRSchedule(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), 500, 0.1),  # beyond
        (LRSchedule(decay="cosine", min_lr_ratio=0.0), 25, 0.5 * (1 + math.cos(math.pi / 4))),
        (LRSchedule(decay="linear", min_lr_ratio=0.2), 0, 1.0),
        (LRSchedule(decay="linear", min_lr_ratio=0.2), 50, 0.6),
        (LRSchedule(decay="linear", min_lr_ratio=0.2), 100, 0.2),
    ],
)
def test_lr_factor_at_given_steps(schedule: LRSchedule, step: int, want: float) -> None:
    total = 111 if schedule.warmup_steps else 101  # the last step is total - 1
    assert lr_factor(step, schedule, total) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------- optimisers
def test_same_optimizer_is_one_adam_over_everything() -> None:
    cfg = config()
    model = model_of(cfg)
    (opt,) = build_optimizers(cfg, model)
    assert type(opt) is torch.optim.Adam
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("kind", "cls", "sparse"),
    [
        ("adam", torch.optim.Adam, False),
        ("sparse_adam", torch.optim.SparseAdam, True),
        ("adagrad", torch.optim.Adagrad, True),
    ],
)
def test_embedding_optimizer_owns_the_tables(
    kind: str, cls: type[torch.optim.Optimizer], sparse: bool
) -> None:
    cfg = config(embedding_optimizer={"type": kind, "lr": 0.5})
    model = model_of(cfg)
    main, emb = build_optimizers(cfg, model)
    (table,) = [layer.table for layer in embedding_layers(model)]
    assert type(emb) is cls and emb.param_groups[0]["lr"] == 0.5
    assert [p for g in emb.param_groups for p in g["params"]] == [table.weight]
    main_params = {id(p) for g in main.param_groups for p in g["params"]}
    assert id(table.weight) not in main_params and main.param_groups[0]["lr"] == 0.01
    assert len(main_params) == len(list(model.parameters())) - 1
    assert table.sparse is sparse


def _step(model: MultiTaskModel, opts: list[torch.optim.Optimizer], sparse: torch.Tensor) -> None:
    labels = {"ctr": torch.ones(len(sparse))}
    losses = model.compute_losses(model(sparse, torch.zeros(len(sparse), 0)), labels)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    torch.autograd.backward(losses["ctr"])
    for opt in opts:
        opt.step()


@pytest.mark.parametrize(("kind", "absent_rows_move"), [("same", True), ("sparse_adam", False)])
def test_sparse_optimizer_leaves_absent_rows_alone(kind: str, absent_rows_move: bool) -> None:
    """Dense Adam keeps moving a row by momentum after its id left the batch; SparseAdam not."""
    cfg = config(embedding_optimizer={"type": kind})
    model = model_of(cfg)
    opts = build_optimizers(cfg, model)
    (table,) = [layer.table for layer in embedding_layers(model)]
    _step(model, opts, torch.tensor([[1, 1], [2, 1]]))  # user rows 1, 2; item row 4 + 1 = 5
    before = table.weight.detach().clone()
    _step(model, opts, torch.tensor([[3, 2]]))  # user row 3, item row 6: rows 1, 2, 5 absent
    moved = (table.weight.detach() != before).any(dim=1)  # (7,)
    assert moved[3] and moved[6]
    assert bool(moved[[1, 2, 5]].any()) is absent_rows_move
    assert not moved[[0, 4]].any()  # never seen (OOV rows): no gradient, no moment, no move


# ---------------------------------------------------------------- frequency penalty
def test_frequency_penalty_touches_only_batch_rows_scaled_by_inverse_count() -> None:
    cfg = config()
    model = model_of(cfg)
    counts = [np.array([0, 10, 2, 5]), np.array([1, 40, 4])]  # per field, as Encoded.id_counts
    reg = FrequencyRegularizer.for_model(model, counts, weight=0.3)
    (table,) = [layer.table for layer in embedding_layers(model)]
    sparse = torch.tensor([[1, 1], [1, 2], [2, 1]])  # user rows 1, 1, 2; item rows 5, 6, 5
    penalty = reg(sparse)
    torch.autograd.backward(penalty)
    e = table.weight.detach()
    n = torch.tensor([1.0, 10, 2, 5, 1, 40, 4])  # flat row counts; a count of 0 counts as 1
    rows = [1, 2, 5, 6]  # each distinct row once, however often it is in the batch
    want = 0.5 * 0.3 * sum(float(e[j].pow(2).sum() / n[j]) for j in rows)
    assert penalty.item() == pytest.approx(want, rel=1e-6)
    grad = table.weight.grad
    assert grad is not None
    for j in range(7):  # DIN's update: lambda * e_j / n_j on the batch's rows, nothing elsewhere
        expected = 0.3 * e[j] / n[j] if j in rows else torch.zeros(3)
        assert torch.allclose(grad[j], expected, atol=1e-7), j


def test_frequency_penalty_keeps_gradients_sparse_for_sparse_tables() -> None:
    cfg = config(embedding_optimizer={"type": "adagrad"})
    model = model_of(cfg)
    build_optimizers(cfg, model)  # switches the table to sparse gradients
    reg = FrequencyRegularizer.for_model(model, [np.ones(4), np.ones(3)], weight=1.0)
    torch.autograd.backward(reg(torch.tensor([[1, 2]])))
    (table,) = [layer.table for layer in embedding_layers(model)]
    assert table.weight.grad is not None and table.weight.grad.is_sparse


@pytest.mark.parametrize("n_rows", [50, 100_000])  # a pass over the rows, and a sort
def test_distinct_rows_either_way(n_rows: int) -> None:
    from training.optim import distinct_rows

    rows = torch.tensor([[7, 3, 7], [0, 3, 49]])
    assert distinct_rows(rows, n_rows).tolist() == [0, 3, 7, 49]


@pytest.mark.parametrize(
    "update",
    [
        {"embedding_regularization": {"type": "frequency"}},  # no weight: would do nothing
        {"embedding_optimizer": {"type": "same", "lr": 0.1}},  # an lr nothing would use
    ],
)
def test_settings_that_would_be_ignored_are_errors(update: dict[str, object]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="embedding_"):
        config(**update)


# ---------------------------------------------------------------- weight averaging
def test_weight_average_follows_the_warmed_up_ema_formula() -> None:
    model = model_of(config())
    avg = WeightAverage(model, decay=0.9)
    param = next(model.parameters())
    expected = None
    for n in range(100):
        with torch.no_grad():
            param.add_(torch.randn_like(param))  # a fake step
        d = min(0.9, (1 + n) / (10 + n))  # update n (from 0; update 0 copies)
        expected = param.detach().clone() if n == 0 else d * expected + (1 - d) * param.detach()
        avg.update(model)
    averaged = next(avg.module.parameters())
    torch.testing.assert_close(averaged, expected, rtol=0, atol=1e-5)
    assert not torch.equal(averaged, param), "the average is not the last iterate"
    assert avg.current_decay() == 0.9  # warm-up over: (1 + 100) / 110 > 0.9


def test_weight_average_copies_buffers_and_rejects_bad_decay() -> None:
    model = model_of(config())
    avg = WeightAverage(model, decay=0.99)
    for (ka, a), (kb, b) in zip(
        avg.module.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(a, b)  # same keys: best.pt loads into the model class
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="weight_averaging.decay"):
            WeightAverage(model, decay=bad)
