"""training.pretrained: pretrained id vectors initialise a field's rows, frozen or fine-tuned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from training.config import ConfigError, ModelConfig, PretrainedEmbedding, load_train_config
from training.models.layers import INIT_STD
from training.pretrained import init_embeddings, layer_offset, read_vectors
from training.train import train

from .test_train import N_ITEMS, config, tiny_data
from .tiny import SPEC, build

E = 4  # embed_dim of test_train.config and tiny.SMALL


def write_npz(path: Path, ids: list[object], dim: int = E, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    np.savez(path, ids=np.asarray([str(i) for i in ids]), vectors=vectors)
    return vectors


def test_known_ids_get_their_vectors_the_rest_keep_their_start(tmp_path: Path) -> None:
    ids = ["i3", "i0", "zzz", "i3"]  # an id not in the vocabulary, and a repeat
    vectors = write_npz(tmp_path / "v.npz", ids)
    model = build("shared_bottom")
    table = model.bottom.inputs.table.weight  # type: ignore[union-attr]
    before = table.detach().clone()
    (loaded,), frozen = init_embeddings(
        model, SPEC, {"item": PretrainedEmbedding(path=str(tmp_path / "v.npz"))}
    )
    start = layer_offset(SPEC, "item")
    assert start == SPEC.sparse[0].vocab_size  # the item rows follow the user rows
    item_index = SPEC.sparse[1].index
    torch.testing.assert_close(table[start + item_index["i3"]], torch.from_numpy(vectors[0]))
    torch.testing.assert_close(table[start + item_index["i0"]], torch.from_numpy(vectors[1]))
    oov = torch.from_numpy(vectors[:2].mean(axis=0))  # the mean of the vectors that were used
    torch.testing.assert_close(table[start], oov)
    untouched = [r for r in range(len(table)) if r not in (start, start + 1, start + 4)]
    assert torch.equal(table[untouched], before[untouched])  # users and other items: as started
    assert (loaded.known, loaded.vocab, loaded.freeze, frozen) == (2, 9, False, [])


def test_a_recall_export_directory_skips_its_padding_row(tmp_path: Path) -> None:
    vectors = np.arange(3 * E, dtype=np.float32).reshape(3, E)
    np.save(tmp_path / "item_ids.npy", np.array([0, 7, 8], dtype=np.int64))
    np.save(tmp_path / "item_embeddings.npy", vectors)
    ids, got = read_vectors(tmp_path)
    assert ids == ["7", "8"]
    np.testing.assert_array_equal(got, vectors[1:])


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_rows_stay_as_loaded_fine_tuned_rows_learn(tmp_path: Path, freeze: bool) -> None:
    data = tiny_data(1500)
    ids = [f"i{k}" for k in range(N_ITEMS)]
    vectors = write_npz(tmp_path / "v.npz", ids)
    setting = {"item": {"path": str(tmp_path / "v.npz"), "freeze": freeze}}
    cfg = config(
        epochs=1,
        weight_decay=0.01,  # would move frozen rows if they were not put back
        model=ModelConfig(
            type="shared_bottom",
            embed_dim=E,
            bottom_units=[16],
            tower_units=[8],
            init_embeddings=setting,  # type: ignore[arg-type]
        ),
    )
    result = train(cfg, tmp_path / "run", data)
    table = result.model.bottom.inputs.table.weight  # type: ignore[union-attr]
    start = layer_offset(data.spec, "item")
    rows = [start + data.spec.sparse[1].index[i] for i in ids]
    same = torch.allclose(table[rows], torch.from_numpy(vectors), atol=0, rtol=0)
    assert same is freeze
    users = table[: data.spec.sparse[0].vocab_size]
    assert result.metrics["ctr_auc"] > 0.6 and users.abs().sum() > 0  # it still trained


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    model = build("shared_bottom")
    write_npz(tmp_path / "wide.npz", ["i1"], dim=E + 1)
    write_npz(tmp_path / "none.npz", ["nope"])
    np.savez(tmp_path / "bad.npz", keys=np.array(["i1"]))
    cases = {
        "item": (tmp_path / "wide.npz", "5-d vectors but model.embed_dim is 4"),
        "user": (tmp_path / "none.npz", "no id of"),
        "price": (tmp_path / "none.npz", "not a sparse field"),
    }
    for field, (path, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            init_embeddings(model, SPEC, {field: PretrainedEmbedding(path=str(path))})
    for path, message in ((tmp_path / "bad.npz", "needs 'ids'"), (tmp_path / "x", "no such")):
        with pytest.raises(ConfigError, match=message):
            read_vectors(path)


def test_config_takes_a_bare_path_relative_to_the_file(tmp_path: Path) -> None:
    here = Path(__file__).resolve().parents[2] / "training/configs/ecommerce_mmoe.yaml"
    body = yaml.safe_load(here.read_text())
    body["dataset"] = str(here.parent / body["dataset"])
    body["model"]["init_embeddings"] = {"item_id": "vectors/item.npz"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(body))
    got = load_train_config(path).model.init_embeddings["item_id"]
    assert got == PretrainedEmbedding(path=str(tmp_path / "vectors/item.npz"), freeze=False)


def test_scale_init_keeps_directions_at_the_random_start_rms(tmp_path: Path) -> None:
    ids = [f"i{k}" for k in range(9)]
    vectors = 3.0 * write_npz(tmp_path / "v.npz", ids)  # far larger than the random start
    np.savez(tmp_path / "v.npz", ids=np.asarray(ids), vectors=vectors)
    model = build("shared_bottom")
    setting = PretrainedEmbedding(path=str(tmp_path / "v.npz"), scale="init")
    init_embeddings(model, SPEC, {"item": setting})
    table = model.bottom.inputs.table.weight  # type: ignore[union-attr]
    start = layer_offset(SPEC, "item")
    rows = table[[start + SPEC.sparse[1].index[i] for i in ids]].detach()
    assert float(rows.pow(2).mean().sqrt()) == pytest.approx(INIT_STD, rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(rows, torch.from_numpy(vectors), dim=1)
    torch.testing.assert_close(cos, torch.ones(9), rtol=0, atol=1e-5)
