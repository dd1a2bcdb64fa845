"""Recall models: shapes, unit vectors for cosine, padding never read, cold items."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.recall.conftest import small_config
from training.recall.data import RecallData
from training.recall.evaluate import catalog_items
from training.recall.models import DSSM, YouTubeDNN, build_recall_model
from training.recall.towers import CNNTextEncoder, LSTMTextEncoder, masked_mean


def test_masked_mean_ignores_padding_and_empty_rows_are_zero() -> None:
    emb = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    out = masked_mean(emb, torch.tensor([2, 0]))
    assert out.squeeze(1).tolist() == [2.0, 0.0]


@pytest.mark.parametrize("encoder", [CNNTextEncoder(20, 4, 6, 3), LSTMTextEncoder(20, 4, 6)])
def test_text_encoders_never_read_padding(encoder: torch.nn.Module) -> None:
    torch.manual_seed(0)
    tokens = torch.tensor([[3, 4, 0, 0], [3, 4, 9, 9], [5, 0, 0, 0]])
    lengths = torch.tensor([2, 2, 0])
    out = encoder(tokens, lengths)  # (3, C)
    assert out.shape == (3, 6)
    torch.testing.assert_close(out[0], out[1])  # only the padding differs
    assert torch.all(out[2] == 0)  # an empty title is the zero vector


@pytest.mark.parametrize("name", ["dssm", "cnn_dssm", "lstm_dssm", "youtube_dnn"])
def test_user_and_item_vectors(name: str, recall_dir: Path, recall_data: RecallData) -> None:
    cfg = small_config(recall_dir, name)
    model = build_recall_model(cfg.model, recall_data.spec).eval()
    items = catalog_items(recall_data.catalog)
    model.bind_catalog(items)
    ex = recall_data.train
    u = model(*(torch.from_numpy(a[:5]) for a in (ex.user_sparse, ex.history, ex.history_len)))
    v = model.item_vectors(items)
    assert u.shape == (5, 16) and v.shape == (len(recall_data.catalog), 16)
    if cfg.model.similarity == "cosine":
        torch.testing.assert_close(u.norm(dim=1), torch.ones(5))
    # values past the length are padding: changing them changes nothing
    hist = torch.from_numpy(ex.history[:5].copy())
    lengths = torch.from_numpy(ex.history_len[:5])
    noisy = torch.where(torch.arange(hist.shape[1]) >= lengths[:, None], 7, hist)
    u2 = model(torch.from_numpy(ex.user_sparse[:5]), noisy, lengths)
    torch.testing.assert_close(u, u2)
    if isinstance(model, YouTubeDNN):  # no item features: cold rows repeat the OOV row
        V = recall_data.spec.item_vocab.vocab_size
        torch.testing.assert_close(v[V:], v[0].expand_as(v[V:]))
    else:
        assert isinstance(model, DSSM)
        V = recall_data.spec.item_vocab.vocab_size
        assert not torch.allclose(v[V], v[V + 1])  # cold items differ by their features
