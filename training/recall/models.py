"""Recall models: a user tower and an item side that score by one inner product.

- :class:`DSSM`: the two-tower Deep Structured Semantic Model of Huang et al., "Learning Deep
  Structured Semantic Models for Web Search using Clickthrough Data" (CIKM 2013), with users in
  place of queries and items in place of documents. The user tower is an MLP over the user's
  attribute embeddings and the mean of their history's item embeddings; the item tower is an MLP
  over the item id, attribute and price features and, with ``text_tower: cnn | lstm``, a title
  vector (CNN-DSSM, Shen et al. 2014; LSTM-DSSM, Palangi et al. 2016; training/recall/towers.py).
  The title lets the tower embed items no one has clicked yet.
- :class:`YouTubeDNN`: the candidate generator of Covington et al., "Deep Neural Networks for
  YouTube Recommendations" (RecSys 2016): average-pooled embeddings of the watched (here clicked)
  items and the user's attributes, through a ReLU MLP, give the user vector u; the item side is
  the softmax's own weight table, one row per item of the vocabulary, and P(item j | user) is
  softmax_j(u . v_j). Items outside the vocabulary share the OOV row.

Both return index-ready vectors: with ``similarity: cosine`` they are unit length (so the inner
product an ANN index computes is the cosine); with ``dot`` they are raw. Training multiplies the
similarity by ``scale`` = 1 / temperature (learned unless ``learn_temperature: false``), which
changes the softmax but not any ranking. ``forward`` is the user tower: what export writes to ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrank.recall_spec import RecallSpec
from training.models.layers import MLP
from training.recall.config import RecallModelConfig
from training.recall.towers import (
    CNNTextEncoder,
    FieldEmbedding,
    LSTMTextEncoder,
    build_text_encoder,
    in_vocab,
    masked_mean,
)

MAX_SCALE = 100.0  # temperature floor 0.01: a sharper softmax only overfits the batch


@dataclass(frozen=True)
class ItemBatch:
    """Item features of N catalog rows (training/recall/data.py Catalog, as tensors)."""

    sparse: Tensor  # (N, 1 + A) int64: item id index, attribute indices
    dense: Tensor  # (N, P) float32
    title: Tensor  # (N, T) int64
    title_len: Tensor  # (N,) int64

    @staticmethod
    def from_arrays(
        sparse: np.ndarray,
        dense: np.ndarray,
        title: np.ndarray,
        title_len: np.ndarray,
        device: torch.device | str = "cpu",
    ) -> ItemBatch:
        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return ItemBatch(t(sparse), t(dense), t(title), t(title_len))

    def take(self, rows: Tensor) -> ItemBatch:
        """The features of catalog rows ``rows`` (any shape (...,) -> leading dims (...))."""
        return ItemBatch(
            self.sparse[rows], self.dense[rows], self.title[rows], self.title_len[rows]
        )

    def __len__(self) -> int:
        return int(self.sparse.shape[0])


class RecallModel(nn.Module):
    """A user tower, an item side and a learned softmax scale."""

    def __init__(self, cfg: RecallModelConfig, spec: RecallSpec) -> None:
        super().__init__()
        self.similarity = cfg.similarity
        self.n_items = spec.item_vocab.vocab_size
        init = math.log(1.0 / cfg.temperature)
        self.log_scale = nn.Parameter(torch.tensor(init), requires_grad=cfg.learn_temperature)

    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)  # ()

    def finish(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.similarity == "cosine" else x  # (B, D)

    def forward(self, user_sparse: Tensor, history: Tensor, history_len: Tensor) -> Tensor:
        """The user tower: (B, U), (B, L), (B,) -> (B, D) index-ready user vectors."""
        raise NotImplementedError

    def item_vectors(self, items: ItemBatch) -> Tensor:
        """(N, D) index-ready vectors of catalog rows."""
        raise NotImplementedError

    def bind_catalog(self, items: ItemBatch) -> None:
        """Copy what the user tower needs to know of the items (nothing by default) into the
        model's buffers: it then travels in the state dict and the ONNX graph."""


class DSSM(RecallModel):
    """Two towers (Huang et al., CIKM 2013), an optional title encoder in the item tower.

    Args:
        cfg: sizes; ``text_tower`` picks the title encoder (none, cnn, lstm).
        spec: the recall contract; fixes the vocabulary sizes and the order of the fields.
    """

    def __init__(self, cfg: RecallModelConfig, spec: RecallSpec) -> None:
        super().__init__(cfg, spec)
        E, D = cfg.embed_dim, cfg.output_dim
        self.item_ids = nn.Embedding(self.n_items, E)  # shared by the item tower and the history
        nn.init.normal_(self.item_ids.weight, std=0.05)
        self.history_ids = self.item_ids
        if not cfg.share_item_embeddings:
            self.history_ids = nn.Embedding(self.n_items, E)
            nn.init.normal_(self.history_ids.weight, std=0.05)
        self.item_fields = FieldEmbedding([f.vocab_size for f in spec.item_sparse[1:]], E)
        # each vocabulary item's attribute indices (category, brand): the history is pooled over
        # the item tower's attribute embeddings as well as the ids, because a user's few clicks
        # say far more about the categories they like than about any one item
        n_attrs = len(spec.item_sparse) - 1
        self.register_buffer("item_attrs", torch.zeros(self.n_items, n_attrs, dtype=torch.int64))
        self.user_fields = FieldEmbedding([f.vocab_size for f in spec.user_sparse], E)
        pooled = E + self.item_fields.out_dim
        self.user_mlp = MLP(self.user_fields.out_dim + pooled, cfg.user_units, cfg.dropout)
        self.user_out = nn.Linear(self.user_mlp.out_dim, D)

        self.text: CNNTextEncoder | LSTMTextEncoder | None = None
        text_dim = 0
        if cfg.text_tower != "none":
            if spec.title is None:
                raise ValueError(f"text_tower {cfg.text_tower!r} needs a title field in the spec")
            self.text = build_text_encoder(
                cfg.text_tower,
                spec.title.tokens.vocab_size,
                cfg.text_embed_dim,
                cfg.text_channels,
                cfg.cnn_kernel,
            )
            text_dim = self.text.out_dim
        item_in = E + self.item_fields.out_dim + len(spec.item_dense) + text_dim
        self.item_mlp = MLP(item_in, cfg.item_units, cfg.dropout)
        self.item_out = nn.Linear(self.item_mlp.out_dim, D)

    item_attrs: Tensor

    def bind_catalog(self, items: ItemBatch) -> None:
        self.item_attrs.copy_(items.sparse[: self.n_items, 1:])  # catalog row i = vocab index i

    def forward(self, user_sparse: Tensor, history: Tensor, history_len: Tensor) -> Tensor:
        B, L = history.shape
        ids = in_vocab(history, self.n_items)  # (B, L)
        attrs = self.item_fields(self.item_attrs[ids].reshape(B * L, -1)).reshape(B, L, -1)
        hist = torch.cat([self.history_ids(ids), attrs], dim=2)  # (B, L, E + A*E)
        x = torch.cat([self.user_fields(user_sparse), masked_mean(hist, history_len)], dim=1)
        return self.finish(self.user_out(self.user_mlp(x)))  # (B, U*E + E + A*E) -> (B, D)

    def item_vectors(self, items: ItemBatch) -> Tensor:
        parts = [
            self.item_ids(in_vocab(items.sparse[:, 0], self.n_items)),  # (N, E)
            self.item_fields(items.sparse[:, 1:]),  # (N, A*E)
            items.dense,  # (N, P)
        ]
        if self.text is not None:
            parts.append(self.text(items.title, items.title_len))  # (N, C)
        x = torch.cat(parts, dim=1)  # (N, E + A*E + P + C)
        return self.finish(self.item_out(self.item_mlp(x)))  # (N, D)


class YouTubeDNN(RecallModel):
    """Candidate generation of Covington et al. (RecSys 2016).

    Args:
        cfg: sizes (``embed_dim`` for the input embeddings, ``output_dim`` = D for u and the
            softmax table, ``user_units`` for the ReLU MLP).
        spec: the recall contract; the softmax table has one row per item vocabulary index.
    """

    def __init__(self, cfg: RecallModelConfig, spec: RecallSpec) -> None:
        super().__init__(cfg, spec)
        E, D = cfg.embed_dim, cfg.output_dim
        self.watched = nn.Embedding(self.n_items, E)  # input side: the history's items
        nn.init.normal_(self.watched.weight, std=0.05)
        self.user_fields = FieldEmbedding([f.vocab_size for f in spec.user_sparse], E)
        self.mlp = MLP(self.user_fields.out_dim + E, cfg.user_units, cfg.dropout)
        self.out = nn.Linear(self.mlp.out_dim, D)
        self.softmax_items = nn.Embedding(self.n_items, D)  # output side: v_j of the softmax
        nn.init.normal_(self.softmax_items.weight, std=0.05)

    def forward(self, user_sparse: Tensor, history: Tensor, history_len: Tensor) -> Tensor:
        watched = masked_mean(self.watched(in_vocab(history, self.n_items)), history_len)  # (B, E)
        x = torch.cat([self.user_fields(user_sparse), watched], dim=1)  # (B, U*E + E)
        return self.finish(self.out(self.mlp(x)))  # (B, D)

    def item_vectors(self, items: ItemBatch) -> Tensor:
        rows = in_vocab(items.sparse[:, 0], self.n_items)  # (N,) cold items -> the OOV row
        return self.finish(self.softmax_items(rows))  # (N, D)


def build_recall_model(cfg: RecallModelConfig, spec: RecallSpec) -> RecallModel:
    if cfg.type == "dssm":
        return DSSM(cfg, spec)
    if cfg.type == "youtube_dnn":
        return YouTubeDNN(cfg, spec)
    raise ValueError(f"unknown recall model type {cfg.type!r}")
