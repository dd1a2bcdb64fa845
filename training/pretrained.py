"""Pretrained id embeddings: initialise a sparse field's rows, then freeze or fine-tune them.

    model:
      embed_dim: 16
      init_embeddings:
        item_id: {path: runs/item2vec/vectors.npz, freeze: false}

Seed 000 of the design notes trains id embeddings end to end or pretrains them (word2vec over
behaviour sequences, GraphSAGE) and fine-tunes them in the ranking model. A pretrained vector
carries what the behaviour log knows about an item even when the item has few impressions of its
own, which is where a randomly started row is weakest.

Two file layouts are read, both keyed by raw ids (the ranking vocabulary maps them to rows with the
one encoding rule, ``SparseField.encode_many``):

* ``.npz`` with ``ids`` (n,) (any dtype; compared as ``str``) and ``vectors`` (n, E) float;
  ``training.recall.item2vec`` writes this;
* a recall export directory (``item_ids.npy`` (n,) int64 raw ids by row, ``item_embeddings.npy``
  (n, E) float32, row 0 the padding / OOV row, which is skipped).

Rows of ids the file does not know keep their random start. The field's OOV row starts at the mean
of the loaded vectors (the average known item: what a new item is most like). With ``freeze`` the
loaded rows are put back after every optimiser step, whatever the optimiser (weight decay and Adam
moments included), so they stay exactly as loaded; the other rows of the field still learn.
``scale: init`` rescales the loaded vectors to the random start's root-mean-square (directions
kept): skip-gram vectors are several times larger than the other rows at the start, and would
otherwise dominate the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtrank.spec import OOV_INDEX, FeatureSpec
from training.config import ConfigError, PretrainedEmbedding
from training.models.base import MultiTaskModel
from training.models.layers import INIT_STD, InputLayer


def read_vectors(path: Path | str) -> tuple[list[str], np.ndarray]:
    """(raw ids as str, (n, E) float32 vectors) from an .npz or a recall export directory."""
    path = Path(path)
    if path.is_dir():
        ids_file, vec_file = path / "item_ids.npy", path / "item_embeddings.npy"
        if not ids_file.is_file() or not vec_file.is_file():
            raise ConfigError(f"{path}: a directory needs item_ids.npy and item_embeddings.npy")
        ids, vectors = np.load(ids_file), np.load(vec_file)
        ids, vectors = ids[1:], vectors[1:]  # row 0: the padding / OOV row of the export
    elif path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if "ids" not in z or "vectors" not in z:
                raise ConfigError(
                    f"{path}: an .npz of pretrained vectors needs 'ids' and 'vectors'"
                )
            ids, vectors = z["ids"], z["vectors"]
    else:
        raise ConfigError(f"{path}: no such pretrained embedding file or directory")
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise ConfigError(f"{path}: {len(ids)} ids but vectors of shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ConfigError(f"{path}: vectors hold NaN or infinite values")
    return [str(i) for i in ids.tolist()], vectors.astype(np.float32)


@dataclass
class FrozenRows:
    """Rows of one table to put back after each step (``freeze: true`` fields)."""

    table: Tensor  # the embedding weight, (R, E)
    rows: Tensor  # (K,) int64 table rows
    values: Tensor  # (K, E) the loaded vectors

    def restore(self) -> None:
        if self.rows.device != self.table.device:  # the model moved after loading
            self.rows, self.values = self.rows.to(self.table.device), self.values.to(self.table)
        with torch.no_grad():
            self.table.index_copy_(0, self.rows, self.values)


@dataclass(frozen=True)
class Loaded:
    """What one field's initialisation did, for the run's log and the checkpoint."""

    field: str
    path: str
    known: int  # vocabulary ids (OOV excluded) that got a pretrained vector
    vocab: int  # vocabulary ids (OOV excluded)
    freeze: bool


def init_embeddings(
    model: MultiTaskModel, spec: FeatureSpec, fields: dict[str, PretrainedEmbedding]
) -> tuple[list[Loaded], list[FrozenRows]]:
    """Copy pretrained vectors into every input layer of ``model`` (single_task has several)."""
    names = [f.name for f in spec.sparse]
    layers = [m for m in model.modules() if isinstance(m, InputLayer)]
    loaded: list[Loaded] = []
    frozen: list[FrozenRows] = []
    for name, setting in fields.items():
        if name not in names:
            raise ConfigError(f"model.init_embeddings: {name!r} is not a sparse field {names}")
        field = spec.sparse[names.index(name)]
        ids, vectors = read_vectors(setting.path)
        for layer in layers:
            if vectors.shape[1] != layer.embed_dim:
                raise ConfigError(
                    f"model.init_embeddings.{name}: {setting.path} holds {vectors.shape[1]}-d "
                    f"vectors but model.embed_dim is {layer.embed_dim}"
                )
        index = field.encode_many(ids)  # (n,) vocabulary index of each pretrained id
        _, first = np.unique(index, return_index=True)  # a repeated id: its first vector
        hit = np.zeros(len(index), dtype=bool)
        hit[first] = True
        hit &= index != OOV_INDEX
        if not hit.any():
            raise ConfigError(
                f"model.init_embeddings.{name}: no id of {setting.path} is in the vocab"
            )
        vocab_rows, values = index[hit], torch.from_numpy(vectors[hit])  # (K,), (K, E)
        if setting.scale == "init":  # the random start's RMS (InputLayer: normal, std 0.05)
            rms = values.pow(2).mean().sqrt().clamp_min(1e-12)
            values = values * (INIT_STD / rms)
        oov_value = values.mean(dim=0, keepdim=True)  # (1, E)
        start = int(layer_offset(spec, name))
        rows = torch.from_numpy(vocab_rows + start)  # (K,) rows of the shared table
        for layer in layers:
            weight = layer.table.weight
            with torch.no_grad():
                weight.index_copy_(0, rows, values)
                weight[start + OOV_INDEX] = oov_value[0]
            if setting.freeze:
                frozen.append(FrozenRows(weight, rows.clone(), values.clone()))
        vocab = field.vocab_size - 1
        loaded.append(Loaded(name, str(setting.path), int(hit.sum()), vocab, setting.freeze))
    return loaded, frozen


def layer_offset(spec: FeatureSpec, name: str) -> int:
    """First row of field ``name`` in the shared table (InputLayer's offsets)."""
    start = 0
    for f in spec.sparse:
        if f.name == name:
            return start
        start += f.vocab_size
    raise KeyError(name)
