"""Building blocks of the recall towers: field embeddings, masked pooling, title encoders.

The two text encoders are the item-side text towers of the DSSM family:

- :class:`CNNTextEncoder`: Shen et al., "A Latent Semantic Model with Convolutional-Pooling
  Structure for Information Retrieval" (CIKM 2014, CLSM / CNN-DSSM): a convolution over a sliding
  window of word embeddings, then max-over-time pooling, so the strongest local n-gram feature of
  each filter anywhere in the title survives.
- :class:`LSTMTextEncoder`: Palangi et al., "Deep Sentence Embedding Using Long Short-Term Memory
  Networks" (IEEE/ACM TASLP 2016, LSTM-DSSM): an LSTM reads the title left to right and its last
  hidden state is the title vector.

Every sequence is left-aligned with a length (mtrank.recall_spec.pad_sequences): padded
positions are masked by the length, so a 0 inside the length is a real OOV value.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from mtrank.spec import OOV_INDEX


def in_vocab(ids: Tensor, vocab_size: int) -> Tensor:
    """Out-of-range ids (negative, or >= vocab_size) -> OOV, so a stale id cannot crash a graph."""
    ok = (ids >= 0) & (ids < vocab_size)
    return torch.where(ok, ids, torch.full_like(ids, OOV_INDEX))


class FieldEmbedding(nn.Module):
    """Several categorical fields in one table, each owning a slice of rows: (B, F) -> (B, F*E)."""

    offsets: Tensor
    sizes: Tensor

    def __init__(self, vocab_sizes: list[int], dim: int) -> None:
        super().__init__()
        starts = [0]
        for s in vocab_sizes[:-1]:
            starts.append(starts[-1] + s)
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.int64))  # (F,)
        self.register_buffer("sizes", torch.tensor(vocab_sizes, dtype=torch.int64))  # (F,)
        self.table = nn.Embedding(max(sum(vocab_sizes), 1), dim)
        nn.init.normal_(self.table.weight, std=0.05)
        self.out_dim = len(vocab_sizes) * dim

    def forward(self, ids: Tensor) -> Tensor:
        ok = (ids >= 0) & (ids < self.sizes)  # (B, F)
        rows = torch.where(ok, ids, torch.full_like(ids, OOV_INDEX)) + self.offsets  # (B, F)
        out: Tensor = self.table(rows).flatten(1)  # (B, F, E) -> (B, F*E)
        return out


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, L) float mask, 1 at positions < length."""
    positions = torch.arange(max_len, device=lengths.device)  # (L,)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, L)


def masked_mean(emb: Tensor, lengths: Tensor) -> Tensor:
    """Mean of the first ``length`` vectors of each row: (B, L, E), (B,) -> (B, E); 0 if empty."""
    mask = length_mask(lengths, emb.shape[1]).unsqueeze(-1)  # (B, L, 1)
    total = (emb * mask).sum(dim=1)  # (B, E)
    return total / lengths.clamp(min=1).unsqueeze(1).to(emb.dtype)  # (B, E)


class CNNTextEncoder(nn.Module):
    """CNN-DSSM title encoder (Shen et al., CIKM 2014): conv over k-token windows, tanh,
    max-over-time pooling over the real positions. (N, T), (N,) -> (N, C)."""

    def __init__(self, vocab_size: int, embed_dim: int, channels: int, kernel: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        nn.init.normal_(self.embed.weight, std=0.05)
        # 'same' padding so every real token is the centre of one window (short titles too)
        self.conv = nn.Conv1d(embed_dim, channels, kernel, padding=kernel // 2)
        self.kernel = kernel
        self.out_dim = channels

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        T = tokens.shape[1]
        mask = length_mask(lengths, T)  # (N, T)
        x = self.embed(in_vocab(tokens, self.vocab_size)) * mask.unsqueeze(-1)  # (N, T, E)
        h = torch.tanh(self.conv(x.transpose(1, 2)))[:, :, :T]  # (N, C, T)
        h = h.masked_fill(mask.unsqueeze(1) == 0, -1.0)  # tanh >= -1: padding never wins the max
        pooled = h.max(dim=2).values  # (N, C)
        return pooled * (lengths > 0).unsqueeze(1).to(pooled.dtype)  # empty title -> 0


class LSTMTextEncoder(nn.Module):
    """LSTM-DSSM title encoder (Palangi et al., TASLP 2016): the last hidden state of an LSTM
    over the real tokens (packed, so padding is never read). (N, T), (N,) -> (N, H)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        nn.init.normal_(self.embed.weight, std=0.05)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.out_dim = hidden

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        x = self.embed(in_vocab(tokens, self.vocab_size))  # (N, T, E)
        packed = pack_padded_sequence(
            x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)  # h: (1, N, H), the state after each row's last token
        last: Tensor = h.squeeze(0)  # (N, H)
        return last * (lengths > 0).unsqueeze(1).to(last.dtype)  # empty title -> 0


def build_text_encoder(
    kind: str, vocab_size: int, embed_dim: int, channels: int, kernel: int
) -> CNNTextEncoder | LSTMTextEncoder:
    if kind == "cnn":
        return CNNTextEncoder(vocab_size, embed_dim, channels, kernel)
    if kind == "lstm":
        return LSTMTextEncoder(vocab_size, embed_dim, channels)
    raise ValueError(f"unknown text tower {kind!r} (cnn or lstm)")
