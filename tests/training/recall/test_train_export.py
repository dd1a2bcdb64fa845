"""End to end: train on a toy log where personalisation pays, beat popularity, export with
parity, evaluate from the checkpoint through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mtrank.cli import main as mtrank_main
from mtrank.recall_spec import RecallSpec
from tests.training.recall.conftest import small_config
from tests.training.recall.toy import write_toy_world
from training.config import ConfigError
from training.recall.baselines import PopularityRetriever
from training.recall.checkpoint import load_recall_checkpoint
from training.recall.config import RecallTrainConfig, load_recall_config
from training.recall.data import RecallData, prepare
from training.recall.evaluate import evaluate_model, evaluate_retriever
from training.recall.export import RecallExportError, export_recall, parity_inputs
from training.recall.train import train


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_world(tmp_path_factory.mktemp("toy"))


def _toy_config(toy_dir: Path, name: str) -> RecallTrainConfig:
    return small_config(
        toy_dir, name,
        **{"eval.ks": [10, 50], "early_stopping.metric": "recall@10", "epochs": 10,
           "batch_size": 256, "lr": 0.01},
    )  # fmt: skip


@pytest.mark.parametrize("name", ["dssm", "youtube_dnn"])
def test_a_short_run_beats_popularity(name: str, toy_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = _toy_config(toy_dir, name)
    data = prepare(cfg)
    result = train(cfg, tmp_path / name, data, log=False)
    assert data.test is not None
    model = evaluate_model(result.model, data.catalog, data.test, [10, 50])["metrics"]
    pop = evaluate_retriever(
        PopularityRetriever(data.past["test"], data.catalog), data.test, [10, 50]
    )["metrics"]
    # a user's category is 1 of 20: knowing it should at least double popularity's hit rate
    assert model["hr@10"] > 2 * pop["hr@10"], (model, pop)
    history = json.loads(result.history.read_text())
    assert len(history["points"]) == result.epochs_run
    _, cfg_back, spec, catalog, ckpt = load_recall_checkpoint(result.best_checkpoint)
    assert cfg_back == cfg and ckpt["epoch"] == result.best_epoch
    assert spec == data.spec and np.array_equal(catalog.item_ids, data.catalog.item_ids)


def test_export_writes_the_index_inputs_with_parity(recall_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(recall_dir, "cnn_dssm", epochs=1, max_steps=3)
    result = train(cfg, tmp_path / "run", log=False)
    out = export_recall(result.best_checkpoint, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "item_embeddings.npy", "item_ids.npy", "metadata.json", "recall_spec.json",
        "user_tower.onnx",
    ]  # fmt: skip
    assert not list(tmp_path.glob(".export*"))  # the staging folder was renamed away
    spec = RecallSpec.load(out)
    emb, ids = np.load(out / "item_embeddings.npy"), np.load(out / "item_ids.npy")
    meta = json.loads((out / "metadata.json").read_text())
    assert emb.dtype == np.float32 and emb.shape == (len(ids), spec.embedding_dim)
    assert ids.dtype == np.int64 and ids[0] == -1 and (ids[1:] > 0).all()  # DSSM: cold rows too
    assert [str(i) for i in ids[1 : spec.item_vocab.vocab_size]] == spec.item_vocab.vocab
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)  # cosine
    assert meta["parity"]["max_abs_diff"] <= 1e-5 and meta["item_rows"] == len(ids) - 1
    # the graph takes the spec's inputs in order, any batch size, and matches torch
    session = ort.InferenceSession(str(out / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == spec.inputs.order
    feed = spec.encode_users([{"gender": "F"}, {}, {"age_bucket": 3}], [[999], [], []])
    (got,) = session.run([spec.inputs.output], feed)
    with torch.no_grad():
        want = result.model(*(torch.from_numpy(feed[n]) for n in spec.inputs.order)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(RecallExportError, match="exists"):
        export_recall(result.best_checkpoint, out)


def test_parity_inputs_cover_cold_and_full_histories(recall_data: RecallData) -> None:
    spec = recall_data.spec
    feed = parity_inputs(spec, 1000, seed=0)
    lengths = feed[spec.inputs.history_length]
    assert lengths.min() == 0 and lengths.max() == spec.history.max_len
    assert (feed[spec.inputs.user_sparse] == 0).all(axis=1).any()
    assert (feed[spec.inputs.history] >= spec.item_vocab.vocab_size).any()


def test_cli_train_and_evaluate(
    toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "recall.yaml"
    config.write_text(
        f"data: {{data_dir: {toy_dir}}}\nmodel: {{type: youtube_dnn, output_dim: 8, embed_dim: 8,"
        " user_units: [16], similarity: dot, temperature: 1.0}\nloss: {type: sampled,"
        " num_negatives: 32}\neval: {ks: [10, 50]}\nearly_stopping: {metric: hr@10}\nepochs: 1\n"
        "device: cpu\n"
    )
    assert mtrank_main(["train-recall", str(config), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "run" / "best.pt"
    rc = mtrank_main(["evaluate-recall", str(ckpt), "--split", "test", "--baselines",
                      "--out", str(tmp_path / "report.json")])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"model", "popularity", "cooccurrence"} <= set(report)
    assert report["model"]["users"] == report["popularity"]["users"] > 0
    rc = mtrank_main(["export-recall", str(ckpt), "--out", str(tmp_path / "exp")])
    assert rc == 0 and (tmp_path / "exp" / "user_tower.onnx").is_file()
    ids = np.load(tmp_path / "exp" / "item_ids.npy")
    V = RecallSpec.load(tmp_path / "exp").item_vocab.vocab_size
    assert (ids[V:] == -1).all()  # YouTube DNN: cold rows have no vector of their own


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {data_dir: x}\nmodel: {type: dssm, tower: cnn}\n")
    with pytest.raises(ConfigError, match="model.tower: unknown key"):
        load_recall_config(bad)
    bad.write_text("data: {data_dir: x}\nearly_stopping: {metric: recall@20}\n")
    with pytest.raises(ConfigError, match="K in eval.ks"):
        load_recall_config(bad)
    bad.write_text("data: {data_dir: x}\nmodel: {type: youtube_dnn, text_tower: lstm}\n")
    with pytest.raises(ConfigError, match="dssm only"):
        load_recall_config(bad)
