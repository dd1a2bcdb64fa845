"""The training loop on tiny in-memory data: learning, seeds, early stopping, checkpoints, DDP."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.multiprocessing.spawn import spawn

from mtrank.spec import OOV_INDEX, DenseField, FeatureSpec, SparseField, TaskOutput
from training.checkpoint import load_checkpoint
from training.config import (
    ConfigError,
    DatasetSpec,
    EarlyStopping,
    ModelConfig,
    SparseColumn,
    TaskColumn,
    TrainConfig,
    WeightingConfig,
)
from training.data import Encoded, LabelReport, PreparedData
from training.train import parse_overrides, train

TASKS = [
    TaskColumn(name="ctr", label="click"),
    TaskColumn(name="cvr", label="purchase", depends_on="ctr"),
    TaskColumn(name="stay", label="stay", kind="regression"),
]
N_USERS, N_ITEMS = 20, 30


def tiny_data(n: int = 3000, seed: int = 0) -> PreparedData:
    """Click depends on price and on the item; conversion on age: a signal a tiny model finds."""
    rng = np.random.default_rng(seed)
    user = rng.integers(1, N_USERS + 1, n)
    item = rng.integers(1, N_ITEMS + 1, n)
    dense = rng.normal(size=(n, 2)).astype(np.float32)
    item_effect = rng.normal(size=N_ITEMS + 1)
    click = rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 2.0 * dense[:, 0] + item_effect[item])))
    cf_purchase = rng.random(n) < 1 / (1 + np.exp(-(-0.5 + 2.0 * dense[:, 1])))
    stay = dense[:, 0] + 0.1 * rng.normal(size=n)

    def split(rows: slice) -> Encoded:
        return Encoded(
            sparse=np.stack([user, item], axis=1)[rows].astype(np.int64),
            dense=dense[rows],
            labels={
                "ctr": click[rows].astype(np.float32),
                "cvr": (click & cf_purchase)[rows].astype(np.float32),
                "stay": stay[rows].astype(np.float32),
            },
            groups=user[rows].astype(np.int64),
            truth={"cf_purchase": cf_purchase[rows].astype(np.float32)},
        )

    spec = FeatureSpec(
        sparse=[
            SparseField(name="user", source="user", vocab=[f"u{i}" for i in range(N_USERS)]),
            SparseField(name="item", source="item", vocab=[f"i{i}" for i in range(N_ITEMS)]),
        ],
        dense=[
            DenseField(name="price", source="item", mean=0.0, std=1.0, default=0.0),
            DenseField(name="age", source="user", mean=0.0, std=1.0, default=0.0),
        ],
        outputs=[TaskOutput(name=t.name, kind=t.kind) for t in TASKS],
    )
    a, b = int(0.7 * n), int(0.85 * n)
    return PreparedData(
        spec=spec,
        train=split(slice(0, a)),
        valid=split(slice(a, b)),
        test=split(slice(b, n)),
        label_report=LabelReport(policy="drop"),
        fingerprint=f"tiny-{n}-{seed}",
        path=Path("/nonexistent"),
    )


def config(**update: object) -> TrainConfig:
    ds = DatasetSpec(
        name="tiny",
        train="unused.csv",
        sparse=[SparseColumn(name="user"), SparseColumn(name="item")],
        tasks=TASKS,
        user_column="user",
        truth_columns=["cf_purchase"],
    )
    model = ModelConfig(type="shared_bottom", embed_dim=4, bottom_units=[16], tower_units=[8])
    base: dict[str, object] = {
        "dataset": ds,
        "model": model,
        "epochs": 2,
        "batch_size": 128,
        "lr": 0.01,
        "device": "cpu",
    }
    return TrainConfig.model_validate({**base, **update})


def test_a_tiny_model_learns_the_planted_signal(tmp_path: Path) -> None:
    result = train(config(epochs=3), tmp_path, tiny_data())
    assert result.metrics["ctr_auc"] > 0.75
    assert result.metrics["cvr_auc_entire_space"] > 0.65  # conversion signal reaches cvr
    history = json.loads(result.history.read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"]["ctr"] < history[0]["train_loss"]["ctr"]
    assert history[0]["loss_weights"] == {"ctr": 1.0, "cvr": 1.0, "stay": 1.0}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    data = tiny_data(1200)
    runs = [
        train(
            config(
                seed=s,
                max_steps=6,
                model={
                    "type": "mmoe",
                    "embed_dim": 4,
                    "expert_units": [8],
                    "n_experts": 2,
                    "tower_units": [4],
                },
            ),
            tmp_path / f"r{i}",
            data,
        ).model
        for i, s in enumerate([3, 3, 4])
    ]
    a, b, c = (_state(m) for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path: Path) -> None:
    # lr 1e-12 cannot move float32 weights: valid AUC is identical every epoch, never "better"
    cfg = config(epochs=10, lr=1e-12, early_stopping=EarlyStopping(metric="ctr_auc", patience=2))
    result = train(cfg, tmp_path, tiny_data(600))
    assert result.stopped_early
    assert (result.best_epoch, result.epochs_run) == (1, 3)


def test_unknown_early_stopping_metric_is_a_config_error(tmp_path: Path) -> None:
    cfg = config(epochs=1, early_stopping=EarlyStopping(metric="nope_auc", patience=1))
    with pytest.raises(ConfigError, match="nope_auc"):
        train(cfg, tmp_path, tiny_data(300))


def test_checkpoint_carries_config_spec_and_reloads_identically(tmp_path: Path) -> None:
    data = tiny_data(800)
    cfg = config(epochs=1, model={"type": "esmm", "embed_dim": 4, "bottom_units": [8]})
    result = train(cfg, tmp_path, data)
    model, cfg2, spec, ckpt = load_checkpoint(result.best_checkpoint)
    assert cfg2 == cfg
    assert spec == data.spec
    assert ckpt["epoch"] == 1 and ckpt["data_fingerprint"] == data.fingerprint
    assert ckpt["metrics"]["ctr_auc"] == pytest.approx(result.metrics["ctr_auc"])
    assert set(ckpt["loss_weights"]) == {"ctr", "cvr", "stay"}
    batch = data.test.take(slice(0, 50))  # type: ignore[union-attr]
    sparse, dense = torch.from_numpy(batch.sparse), torch.from_numpy(batch.dense)
    result.model.eval()
    with torch.no_grad():
        want, got = result.model.predict(sparse, dense), model.predict(sparse, dense)
    assert list(got) == ["ctr", "cvr", "stay", "ctcvr"]
    for name in want:
        assert torch.equal(want[name], got[name])


def test_uncertainty_weights_are_learned_logged_and_saved(tmp_path: Path) -> None:
    cfg = config(epochs=2, weighting=WeightingConfig(type="uncertainty"))
    result = train(cfg, tmp_path, tiny_data(1500))
    history = json.loads(result.history.read_text())
    first = history[0]["loss_weights"]
    assert first["stay"] != pytest.approx(0.5, abs=1e-3)  # moved from c * exp(0)
    _, _, _, ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["weighting_state"]["log_vars"].shape == (3,)
    assert not torch.equal(ckpt["weighting_state"]["log_vars"], torch.zeros(3))


# ---------------------------------------------------------------- from step one
def test_output_bias_starts_at_train_base_rates_and_is_checkpointed(tmp_path: Path) -> None:
    data = tiny_data(1000)
    train_split = data.train
    click = np.asarray(train_split.labels["ctr"], dtype=np.float64)
    buy = np.asarray(train_split.labels["cvr"], dtype=np.float64)
    stay = np.asarray(train_split.labels["stay"], dtype=np.float64)
    want = {"ctr": click.mean(), "cvr": buy[click == 1].mean(), "stay": stay.mean()}
    # lr 1e-12: the single step cannot move the biases, so the model is as initialised
    result = train(config(epochs=1, max_steps=1, lr=1e-12), tmp_path, data)
    _, _, _, ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["base_rates"] == pytest.approx(want, abs=1e-9)
    layers = result.model.output_layers()
    for task in ("ctr", "cvr"):
        log_odds = float(np.log(want[task] / (1 - want[task])))
        assert abs(ckpt["output_bias"][task] - log_odds) < 1e-6
        assert abs(layers[task].bias.item() - log_odds) < 1e-6
    assert abs(layers["stay"].bias.item() - want["stay"]) < 1e-6


def test_without_bias_init_outputs_start_where_torch_put_them(tmp_path: Path) -> None:
    result = train(
        config(epochs=1, max_steps=1, lr=1e-12, init_output_bias=False), tmp_path, tiny_data(600)
    )
    _, _, _, ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["output_bias"] == {}
    assert abs(result.model.output_layers()["ctr"].bias.item()) < 1 / np.sqrt(8)  # default init


def test_validation_every_k_steps_records_each_point(tmp_path: Path) -> None:
    # 2100 train rows / 128 = 17 steps an epoch: points at 5 10 15 17 | 20 25 30 34
    cfg = config(epochs=2, validation={"every_steps": 5}, early_stopping={"patience": 100})
    result = train(cfg, tmp_path, tiny_data())
    history = json.loads(result.history.read_text())
    assert [h["step"] for h in history] == [5, 10, 15, 17, 20, 25, 30, 34]
    assert [h["epoch"] for h in history] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [h["epoch_end"] for h in history] == [False, False, False, True] * 2
    assert result.validations == 8 and result.epochs_run == 2
    assert all("ctr_auc" in h["valid"] for h in history)


def test_the_best_validation_point_is_saved_and_restored(tmp_path: Path) -> None:
    # lr 0.3 learns fast and then overfits: the best point is not the last one
    cfg = config(
        epochs=3,
        lr=0.3,
        validation={"every_steps": 4},
        early_stopping={"metric": "ctr_auc", "patience": 100},
    )
    data = tiny_data(1500)
    result = train(cfg, tmp_path, data)
    history = json.loads(result.history.read_text())
    aucs = [h["valid"]["ctr_auc"] for h in history]
    best = int(np.argmax(aucs))
    assert best != len(history) - 1, "precondition: the last point is not the best"
    assert (
        result.best_step
        == history[best]["step"]
        == torch.load(result.best_checkpoint, weights_only=True)["step"]
    )
    assert result.metrics["ctr_auc"] == aucs[best]
    # the returned model is the best point's, not the last step's
    from training.evaluate import evaluate

    again = evaluate(result.model, data.valid, cfg.dataset.tasks)["metrics"]  # type: ignore[arg-type]
    assert again["ctr_auc"] == pytest.approx(aucs[best], abs=1e-12)
    assert again["ctr_auc"] != pytest.approx(aucs[-1], abs=1e-6)


def test_early_stopping_counts_validation_points(tmp_path: Path) -> None:
    # lr 1e-12: every point scores the same AUC; patience 2 stops at the third point (step 15)
    cfg = config(
        epochs=5,
        lr=1e-12,
        validation={"every_steps": 5},
        early_stopping={"metric": "ctr_auc", "patience": 2},
    )
    result = train(cfg, tmp_path, tiny_data())
    assert result.stopped_early
    assert (result.validations, result.best_step, result.epochs_run) == (3, 5, 1)


def test_history_records_the_scheduled_learning_rate(tmp_path: Path) -> None:
    # 1 epoch of 17 steps, warm-up 4 then cosine to 0.5 x lr at step 16
    cfg = config(
        epochs=1,
        lr=0.01,
        validation={"every_steps": 2},
        early_stopping={"patience": 100},
        lr_schedule={"warmup_steps": 4, "decay": "cosine", "min_lr_ratio": 0.5},
    )
    history = json.loads(train(cfg, tmp_path, tiny_data()).history.read_text())
    lr = {h["step"]: h["lr"] for h in history}  # the rate of the point's last step (step - 1)
    assert lr[2] == pytest.approx(0.01 * 2 / 4)
    assert lr[4] == pytest.approx(0.01)
    assert lr[10] == pytest.approx(0.01 * (0.5 + 0.25 * (1 + np.cos(np.pi * 5 / 12))))
    assert lr[17] == pytest.approx(0.005)


def test_frequency_penalty_and_sparse_optimizer_train(tmp_path: Path) -> None:
    cfg = config(
        epochs=2,
        embedding_regularization={"type": "frequency", "weight": 0.1},
        embedding_optimizer={"type": "adagrad", "lr": 0.05},
    )
    result = train(cfg, tmp_path, tiny_data())
    history = json.loads(result.history.read_text())
    assert all(h["embedding_penalty"] > 0 for h in history)
    assert result.model.bottom.inputs.table.sparse  # type: ignore[union-attr]
    assert result.metrics["ctr_auc"] > 0.75


def test_parse_overrides_types_values() -> None:
    got = parse_overrides(["lr=3e-4", "model.type=ple", "model.bottom_units=[8, 4]"])
    assert got == {"lr": 3e-4, "model.type": "ple", "model.bottom_units": [8, 4]}
    with pytest.raises(ConfigError):
        parse_overrides(["oops"])


# ---------------------------------------------------------------- DDP on gloo, 2 processes
DDP_CONFIGS: dict[str, dict[str, object]] = {
    "uncertainty": {"weighting": WeightingConfig(type="uncertainty")},
    # sparse gradients through DDP (gloo), the penalty on each rank's batch, mid-epoch points
    "sparse_penalty_points": {
        "weighting": WeightingConfig(type="uncertainty"),
        "embedding_optimizer": {"type": "sparse_adam", "lr": 0.02},
        "embedding_regularization": {"type": "frequency", "weight": 0.1},
        "validation": {"every_steps": 3},
        "lr_schedule": {"warmup_steps": 3, "decay": "cosine"},
    },
}


def _ddp_worker(rank: int, port: int, root: str, variant: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    cfg = config(epochs=2, **DDP_CONFIGS[variant])
    result = train(cfg, Path(root) / f"rank{rank}", tiny_data(2000))
    state = {f"model.{k}": v for k, v in result.model.state_dict().items()}
    state.update({f"weighting.{k}": v for k, v in result.weighting.state_dict().items()})
    torch.save({"state": state, "metrics": result.metrics}, Path(root) / f"final{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("variant", sorted(DDP_CONFIGS))
def test_ddp_on_gloo_keeps_ranks_identical(tmp_path: Path, variant: str) -> None:
    spawn(_ddp_worker, args=(_free_port(), str(tmp_path), variant), nprocs=2, join=True)  # type: ignore[no-untyped-call]
    r0 = torch.load(tmp_path / "final0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "final1.pt", weights_only=True)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["metrics"]["ctr_auc"] > 0.75  # each rank saw half the data; together they learn
    assert r0["metrics"] == r1["metrics"]  # same weights, same validation, same decisions
    assert (tmp_path / "rank0" / "best.pt").exists()
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes
    # the learned loss weights moved, and moved alike: their gradients are averaged too
    assert not torch.equal(r0["state"]["weighting.log_vars"], torch.zeros(3))


def test_weight_averaging_validates_and_saves_the_average(tmp_path: Path) -> None:
    data = tiny_data(600)
    plain = train(config(epochs=1, max_steps=12), tmp_path / "plain", data)
    cfg = config(epochs=1, max_steps=12, weight_averaging={"decay": 0.9})
    averaged = train(cfg, tmp_path / "avg", data)
    # the same seed and batches: the iterates are identical, what is kept is not
    saved = torch.load(averaged.best_checkpoint, weights_only=True)["model_state"]
    last = torch.load(plain.best_checkpoint, weights_only=True)["model_state"]
    assert saved.keys() == last.keys()
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    for k, v in averaged.model.state_dict().items():
        assert torch.equal(v, saved[k])  # the returned model is the saved average
    from training.evaluate import evaluate

    again = evaluate(averaged.model, data.valid, cfg.dataset.tasks)["metrics"]  # type: ignore[arg-type]
    assert again["ctr_auc"] == pytest.approx(averaged.metrics["ctr_auc"], abs=1e-12)


def test_id_dropout_sends_the_chosen_share_of_one_column_to_oov() -> None:
    from training.train import IdDropout

    sparse = torch.arange(1, 3 * 20_000 + 1, dtype=torch.int64).reshape(20_000, 3)  # no OOV yet
    out = IdDropout({"b": 0.1, "c": 0.0}, ["a", "b", "c"], seed=0, rank=0)(sparse)
    assert torch.equal(out[:, [0, 2]], sparse[:, [0, 2]])  # other columns (and p = 0) untouched
    dropped = out[:, 1] == OOV_INDEX
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # about 10%, within 4 standard errors
    assert torch.equal(out[~dropped, 1], sparse[~dropped, 1])
    assert torch.equal(sparse[:, 1], torch.arange(2, 3 * 20_000 + 1, 3))  # the input is not mutated
    again = IdDropout({"b": 0.1}, ["a", "b", "c"], seed=0, rank=0)(sparse)
    assert torch.equal(again, out)  # seeded: runs repeat


def test_id_dropout_trains_the_oov_row_and_checks_its_columns(tmp_path: Path) -> None:
    from training.models import build_model
    from training.train import set_seed

    data = tiny_data(600)
    name = data.spec.sparse[0].name  # its rows start at 0: row 0 is its OOV row
    assert (np.asarray(data.train.sparse)[:, 0] != OOV_INDEX).all(), "precondition: no OOV value"
    set_seed(0)
    init = build_model(config(), data.spec).bottom.inputs.table.weight[0].detach().clone()  # type: ignore[union-attr]
    plain = train(config(epochs=1), tmp_path / "a", data).model
    dropped = train(config(epochs=1, id_dropout={name: 0.2}), tmp_path / "b", data).model
    assert torch.equal(plain.bottom.inputs.table.weight[0], init)  # type: ignore[union-attr]
    assert not torch.equal(dropped.bottom.inputs.table.weight[0], init)  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="id_dropout"):
        config(id_dropout={"nope": 0.1})
    with pytest.raises(ValidationError, match="id_dropout"):
        config(id_dropout={name: 1.0})
