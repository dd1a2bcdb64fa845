"""Warm start: train on new days from the last model, keeping what it knows and growing its vocab.

    mtrank train --config CONFIG --init-from runs/ecommerce_mmoe/best.pt

The new data is encoded as usual (training/data.py builds vocabularies from its train split);
then, before the first step:

- **Vocabularies grow, never move.** Each sparse field's merged vocabulary is the checkpoint's,
  in its order, followed by the new data's values it did not know. A known id keeps its index,
  so its embedding row and everything downstream of it stay valid; a new id gets a new row at
  the end of its field. The new data's encoded ids are remapped onto the merged indices.
- **Dense inputs keep the checkpoint's scale.** Their mean, std (and log1p) are the
  checkpoint's; the new data's values are re-normalised onto them, so the trained layers see
  inputs on the scale they learnt. (A raw value that was missing was replaced by the new data's
  default before normalising; mapped back it becomes that default on the old scale.)
- **Weights are copied.** The model is built with the checkpoint's architecture (its
  ``model`` config wins over the YAML's) and the merged spec; every parameter is copied from the
  checkpoint, and in the shared embedding table each field's old rows go to the same index of the
  same field. New rows keep their fresh initialisation (normal, std 0.05). The output biases are
  not re-initialised from the new base rates: the trained ones are the better start.

The optimiser starts fresh (its state would be for the old table's shape); the learning-rate
schedule runs again over the new data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrank.spec import OOV_INDEX, FeatureSpec
from training.checkpoint import load_checkpoint
from training.config import ConfigError, TrainConfig
from training.data import Encoded, PreparedData
from training.models.base import MultiTaskModel
from training.models.layers import InputLayer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStart:
    """The checkpoint's model and spec, and how the new data maps onto them."""

    checkpoint: Path
    old_spec: FeatureSpec
    spec: FeatureSpec  # merged: old vocabularies + new values, old dense scales
    maps: list[np.ndarray]  # per sparse field: new-data index -> merged index
    added: dict[str, int]  # per sparse field: ids the old vocabulary did not have
    state: dict[str, torch.Tensor]  # the checkpoint's model state
    model_config: Any  # the checkpoint's ModelConfig


def merge_specs(old: FeatureSpec, new: FeatureSpec) -> tuple[FeatureSpec, list[np.ndarray]]:
    """(merged spec, per sparse field the new index -> merged index map); see the docstring."""
    if [f.name for f in old.sparse] != [f.name for f in new.sparse] or [
        f.name for f in old.dense
    ] != [f.name for f in new.dense]:
        raise ConfigError(
            "--init-from: the checkpoint's features differ from the dataset's: sparse "
            f"{[f.name for f in old.sparse]} vs {[f.name for f in new.sparse]}, dense "
            f"{[f.name for f in old.dense]} vs {[f.name for f in new.dense]}"
        )
    fields, maps = [], []
    for o, n in zip(old.sparse, new.sparse, strict=True):
        known = set(o.vocab)
        vocab = [*o.vocab, *(v for v in n.vocab if v not in known)]
        index = {v: i + 1 for i, v in enumerate(vocab)}  # as SparseField.index numbers them
        m = np.empty(n.vocab_size, dtype=np.int64)
        m[OOV_INDEX] = OOV_INDEX
        m[1:] = [index[v] for v in n.vocab]
        fields.append({**o.model_dump(mode="json"), "vocab": vocab})
        maps.append(m)
    # validated afresh, not model_copy: a copy would carry the old fields' cached indexes
    doc = {**old.model_dump(mode="json"), "sparse": fields,
           "outputs": new.model_dump(mode="json")["outputs"]}  # fmt: skip
    return FeatureSpec.model_validate(doc), maps


def _renormalise(dense: np.ndarray, old: FeatureSpec, new: FeatureSpec) -> np.ndarray:
    out = np.empty_like(dense, dtype=np.float32)
    for j, (o, n) in enumerate(zip(old.dense, new.dense, strict=True)):
        if o.log1p != n.log1p:
            raise ConfigError(f"--init-from: dense field {o.name!r} changed its log1p setting")
        transformed = dense[:, j].astype(np.float64) * n.std + n.mean  # log1p(raw) or raw
        out[:, j] = ((transformed - o.mean) / o.std).astype(np.float32)
    return out


def _remap(split: Encoded | None, maps: list[np.ndarray], old: FeatureSpec,
           new: FeatureSpec) -> Encoded | None:  # fmt: skip
    if split is None:
        return None
    sparse = np.empty(split.sparse.shape, dtype=np.int64)
    for j, m in enumerate(maps):
        sparse[:, j] = m[np.asarray(split.sparse[:, j])]
    return replace(split, sparse=sparse, dense=_renormalise(np.asarray(split.dense), old, new))


def prepare_warm_start(path: Path | str, data: PreparedData) -> tuple[WarmStart, PreparedData]:
    """Read the checkpoint and remap ``data`` onto its (grown) vocabularies and scales."""
    model, ckpt_cfg, old_spec, _ = load_checkpoint(path)
    spec, maps = merge_specs(old_spec, data.spec)
    added = {f.name: f.vocab_size - o.vocab_size
             for f, o in zip(spec.sparse, old_spec.sparse, strict=True)}  # fmt: skip
    train = _remap(data.train, maps, old_spec, data.spec)
    assert train is not None
    remapped = replace(
        data, spec=spec, train=train,
        valid=_remap(data.valid, maps, old_spec, data.spec),
        test=_remap(data.test, maps, old_spec, data.spec),
    )  # fmt: skip
    log.info("--init-from %s: new ids per field %s", path, added)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return WarmStart(Path(path), old_spec, spec, maps, added, state, ckpt_cfg.model), remapped


def with_checkpoint_model(cfg: TrainConfig, warm: WarmStart) -> TrainConfig:
    """The run's config with the checkpoint's architecture (the weights must fit it)."""
    if cfg.model != warm.model_config:
        log.warning("--init-from: using the checkpoint's model config, not the YAML's")
    return cfg.model_copy(update={"model": warm.model_config})


def load_warm_weights(model: MultiTaskModel, warm: WarmStart) -> int:
    """Copy the checkpoint's weights into ``model`` (built on the merged spec); returns the
    number of embedding rows copied. Every non-table parameter must have the same shape."""
    old_sizes = [f.vocab_size for f in warm.old_spec.sparse]
    new_sizes = [f.vocab_size for f in warm.spec.sparse]
    old_starts = np.concatenate([[0], np.cumsum(old_sizes)[:-1]]).astype(np.int64)
    new_starts = np.concatenate([[0], np.cumsum(new_sizes)[:-1]]).astype(np.int64)
    rows_old = np.concatenate([s + np.arange(n) for s, n in zip(old_starts, old_sizes,
                                                                strict=True)])  # fmt: skip
    rows_new = np.concatenate([s + np.arange(n) for s, n in zip(new_starts, old_sizes,
                                                                strict=True)])  # fmt: skip
    tables = {f"{name}.table.weight" for name, m in model.named_modules()
              if isinstance(m, InputLayer)}  # fmt: skip
    target = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in warm.state.items():
            if key not in target:
                raise ConfigError(f"--init-from: the checkpoint has {key!r}, the model does not")
            if key in tables:
                target[key][torch.from_numpy(rows_new)] = value[torch.from_numpy(rows_old)]
                copied += len(rows_old)
            elif key.endswith((".offsets", ".sizes")):
                continue  # the merged spec's own offsets and sizes
            elif target[key].shape != value.shape:
                raise ConfigError(
                    f"--init-from: {key} is {tuple(value.shape)} in the checkpoint but "
                    f"{tuple(target[key].shape)} here"
                )
            else:
                target[key].copy_(value)
    missing = set(target) - set(warm.state)
    if missing:
        raise ConfigError(f"--init-from: the checkpoint lacks {sorted(missing)}")
    return copied
