"""Building blocks shared by every architecture: the input layer, MLPs, batched experts, towers.

The input layer keeps ONE embedding table for all sparse fields, each field owning a slice of
rows (``offsets``): a batch is embedded with a single gather instead of one lookup per field,
which is both faster and a single ``Gather`` node in the exported graph.

Experts of a mixture are stored as stacked weight tensors and applied with one ``einsum`` per
layer, so n experts cost one batched matmul rather than n small ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mtrank.spec import OOV_INDEX, FeatureSpec


INIT_STD = 0.05  # the embedding rows' random start


class InputLayer(nn.Module):
    """Embeds the sparse ids and concatenates the normalised dense values.

    Args:
        spec: the feature contract; fixes the order of the columns and each vocabulary size.
        embed_dim: width E of every field's embedding.

    Out-of-range ids (negative, or >= the field's vocabulary size) are mapped to the OOV row of
    their field rather than raising, so a serving request with a stale id cannot crash the graph.
    """

    offsets: Tensor
    sizes: Tensor

    def __init__(self, spec: FeatureSpec, embed_dim: int) -> None:
        super().__init__()
        sizes = [f.vocab_size for f in spec.sparse]
        self.n_sparse = len(sizes)
        self.n_dense = len(spec.dense)
        self.embed_dim = embed_dim
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.int64))  # (S,)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.int64))  # (S,)
        self.table = nn.Embedding(max(sum(sizes), 1), embed_dim)
        nn.init.normal_(self.table.weight, std=INIT_STD)
        self.out_dim = self.n_sparse * embed_dim + self.n_dense
        if self.out_dim == 0:
            raise ValueError("the feature spec has no sparse and no dense fields")

    def rows(self, sparse: Tensor) -> Tensor:
        """(B, S) per-field ids -> (B, S) rows of ``table``; out-of-range ids -> the field's OOV."""
        in_range = (sparse >= 0) & (sparse < self.sizes)  # (B, S)
        idx = torch.where(in_range, sparse, torch.full_like(sparse, OOV_INDEX))  # (B, S)
        return idx + self.offsets  # (B, S)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        B = sparse.shape[0]
        emb = self.table(self.rows(sparse))  # (B, S, E)
        emb = emb.reshape(B, self.n_sparse * self.embed_dim)  # (B, S*E)
        return torch.cat([emb, dense], dim=1)  # (B, S*E + D)


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout, once per entry of ``units``; ``units=[]`` is the identity."""

    def __init__(self, in_dim: int, units: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for u in units:
            layers += [nn.Linear(d, u), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = u
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)  # (B, in) -> (B, out)
        return out


class Experts(nn.Module):
    """n independent MLP experts evaluated together, one matmul per layer for all of them.

    ``forward`` takes one input row per expert, (B, n, in) (PLE gathers each expert's own input);
    ``forward_shared`` takes the one input every expert reads, (B, in), as in MoE/MMoE, and runs
    the first layer as a single (B, in) x (in, n*out) GEMM. Both return (B, n, out). The layers
    are written as batched MatMul rather than einsum: ONNX Runtime runs Einsum far slower on
    CPU (it was 70% of an MMoE's inference time at 500 candidates).
    """

    def __init__(self, n: int, in_dim: int, units: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        if not units:
            raise ValueError("experts need at least one layer (expert_units is empty)")
        self.n = n
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        d = in_dim
        for u in units:
            w = torch.empty(n, d, u)
            for i in range(n):  # the same init as n separate nn.Linear layers
                nn.init.kaiming_uniform_(w[i].T, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(d)
            self.weights.append(nn.Parameter(w))  # (n, in, out)
            self.biases.append(nn.Parameter(torch.empty(n, u).uniform_(-bound, bound)))  # (n, out)
            d = u
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out_dim = d

    def _layer(self, h: Tensor, i: int) -> Tensor:
        """Layer i over expert-major rows: (n, B, in) -> (n, B, out)."""
        h = torch.matmul(h, self.weights[i]) + self.biases[i].unsqueeze(1)  # (n, B, out)
        out: Tensor = self.dropout(torch.relu(h))
        return out

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(0, 1)  # (n, B, in)
        for i in range(len(self.weights)):
            h = self._layer(h, i)  # (n, B, out)
        return h.transpose(0, 1)  # (B, n, d)

    def forward_shared(self, x: Tensor) -> Tensor:
        w0 = self.weights[0]  # (n, in, out)
        n, d_in, d_out = w0.shape
        h = x @ w0.permute(1, 0, 2).reshape(d_in, n * d_out)  # (B, n*out): one GEMM
        h = h.reshape(-1, n, d_out) + self.biases[0]  # (B, n, out)
        h = torch.relu(h)
        h = self.dropout(h).transpose(0, 1)  # (n, B, out)
        for i in range(1, len(self.weights)):
            h = self._layer(h, i)  # (n, B, out)
        out: Tensor = h.transpose(0, 1)  # (B, n, d)
        return out


def mix(gate_logits: Tensor, experts: Tensor) -> Tensor:
    """Softmax-weighted sum of expert outputs: (B, n) logits, (B, n, d) outputs -> (B, d)."""
    w = torch.softmax(gate_logits, dim=-1)  # (B, n)
    return torch.matmul(w.unsqueeze(1), experts).squeeze(1)  # (B, 1, n) @ (B, n, d) -> (B, d)


class Tower(nn.Module):
    """A task's head: an MLP then one linear unit (a logit for binary tasks, a value otherwise)."""

    def __init__(self, in_dim: int, units: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, units, dropout)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.out(self.mlp(x))  # (B, 1)
        return y.squeeze(-1)  # (B,)
