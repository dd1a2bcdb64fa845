"""Warm start (``mtrank train --init-from``): old rows and weights kept, new ids get new rows.

Two "days" of synthetic logs from different seeds: day 2 holds ids day 1's train split never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.trained import ecommerce_config
from mtrank.spec import OOV_INDEX
from training.checkpoint import load_checkpoint
from training.data import prepare
from training.models import build_model
from training.synthetic import generate_ecommerce
from training.train import main as train_main
from training.train import train
from training.warm_start import load_warm_weights, prepare_warm_start


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(day-1 data, day-2 data, day-1 best checkpoint)."""
    base = tmp_path_factory.mktemp("warm")
    d1, d2 = base / "day1", base / "day2"
    generate_ecommerce(d1, 6000, seed=1)
    generate_ecommerce(d2, 6000, seed=2)
    cfg = ecommerce_config(d1, out_dir=base / "runs1", max_steps=20, epochs=1)
    result = train(cfg, base / "runs1" / "run", prepare(cfg.dataset, base / "cache1"))
    return d1, d2, result.best_checkpoint


def test_vocabularies_grow_and_known_ids_keep_their_index(
    days: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    d1, d2, ckpt = days
    cfg2 = ecommerce_config(d2, out_dir=tmp_path)
    day2 = prepare(cfg2.dataset, tmp_path / "cache2")
    warm, remapped = prepare_warm_start(ckpt, day2)
    _, _, old_spec, _ = load_checkpoint(ckpt)
    assert sum(warm.added.values()) > 0, "day 2 should bring ids day 1 did not have"
    for old, merged, new in zip(old_spec.sparse, warm.spec.sparse, day2.spec.sparse, strict=True):
        assert merged.vocab[: len(old.vocab)] == old.vocab  # nothing moves
        extra = merged.vocab[len(old.vocab) :]
        assert set(extra) == set(new.vocab) - set(old.vocab)
        assert warm.added[old.name] == len(extra)
    # every remapped day-2 id is the merged index of the same raw value
    for j, (new_f, merged_f) in enumerate(zip(day2.spec.sparse, warm.spec.sparse, strict=True)):
        raw = np.asarray(day2.train.sparse[:, j])
        got = remapped.train.sparse[:, j]
        want = np.array([OOV_INDEX if i == OOV_INDEX else merged_f.index[new_f.vocab[i - 1]]
                         for i in raw])  # fmt: skip
        np.testing.assert_array_equal(got, want)
    # dense values on the checkpoint's scale: back to raw with each spec, the same value
    for j, (old_f, new_f) in enumerate(zip(old_spec.dense, day2.spec.dense, strict=True)):
        raw_new = np.asarray(day2.train.dense[:, j], np.float64) * new_f.std + new_f.mean
        raw_old = np.asarray(remapped.train.dense[:, j], np.float64) * old_f.std + old_f.mean
        np.testing.assert_allclose(raw_old, raw_new, rtol=1e-4, atol=1e-4)


def test_the_warm_model_scores_day_one_exactly_as_the_checkpoint(
    days: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    d1, d2, ckpt = days
    old_model, ckpt_cfg, old_spec, _ = load_checkpoint(ckpt)
    cfg2 = ecommerce_config(d2, out_dir=tmp_path)
    warm, _ = prepare_warm_start(ckpt, prepare(cfg2.dataset, tmp_path / "cache2"))
    model = build_model(ckpt_cfg, warm.spec)
    copied = load_warm_weights(model, warm)
    assert copied == sum(f.vocab_size for f in old_spec.sparse)
    model.eval()
    day1 = prepare(ecommerce_config(d1).dataset, tmp_path / "cache1")
    sparse = torch.from_numpy(np.array(day1.valid.sparse[:500]))  # old indices == merged
    dense = torch.from_numpy(np.array(day1.valid.dense[:500]))
    with torch.no_grad():
        before, after = old_model(sparse, dense), model(sparse, dense)
    for task in before:
        torch.testing.assert_close(after[task], before[task])
    # a new row was not copied from anywhere: it keeps its fresh initialisation
    table = next(m for m in model.modules() if hasattr(m, "table")).table.weight
    assert table.shape[0] == sum(f.vocab_size for f in warm.spec.sparse)


def test_train_init_from_runs_and_its_checkpoint_keeps_the_old_vocab_first(
    days: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, d2, ckpt = days
    _, _, old_spec, _ = load_checkpoint(ckpt)
    cfg2 = ecommerce_config(
        d2, out_dir=tmp_path, max_steps=10, epochs=1, **{"model.embed_dim": 4}
    )  # the YAML's architecture is overruled
    result = train(cfg2, tmp_path / "run", init_from=ckpt)
    _, cfg_new, new_spec, _ = load_checkpoint(result.best_checkpoint)
    assert cfg_new.model.embed_dim == 8  # the checkpoint's
    for old, new in zip(old_spec.sparse, new_spec.sparse, strict=True):
        assert new.vocab[: len(old.vocab)] == old.vocab
        assert len(new.vocab) >= len(old.vocab)


def test_the_cli_takes_init_from(days: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, d2, ckpt = days
    cfg = ecommerce_config(d2, out_dir=tmp_path)
    config = tmp_path / "day2.yaml"
    config.write_text(cfg.model_dump_json())  # JSON is YAML
    rc = train_main(["--config", str(config), "--set", "max_steps=3", "--set", "epochs=1",
                     "--out", str(tmp_path / "cli"), "--init-from", str(ckpt)])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "cli" / "best.pt").is_file()
