"""The recall contract between training and serving (``recall_spec.json``).

Training writes one :class:`RecallSpec` beside each exported user tower (``user_tower.onnx``) and
item embedding matrix; the recall service and the ANN index builder read it and never declare
recall features again. It fixes:

- the user tower's ONNX inputs, by name and in order (:class:`RecallInputs`): the user's sparse
  fields as one int64 ``[B, U]`` matrix, the click history as int64 ``[B, L]`` item indices and
  its int64 ``[B]`` length; and its one output, the float32 ``[B, D]`` user vector;
- how raw values become indices: every vocabulary is a :class:`mtrank.spec.SparseField`, so the
  OOV rule is the ranking contract's own (index 0 for unseen, rare and missing values);
- how a sequence becomes a fixed-width row (:func:`pad_sequences`): a history keeps its most
  recent ``max_len`` clicks, oldest first; a title keeps its first ``max_len`` tokens. Rows are
  left-aligned and the positions at and after ``length`` hold :data:`PAD_INDEX` (0). Padding is
  masked by the length, never read: a 0 *inside* the length is a real, out-of-vocabulary value;
- the item side (id, attribute and title fields) the item tower was trained with, and the
  embedding dimension and similarity the index must use (``cosine`` vectors are unit length, so
  the inner product is the cosine).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtrank.spec import OOV_INDEX, DenseField, SparseField

RECALL_SPEC_FILE = "recall_spec.json"
PAD_INDEX = OOV_INDEX  # padding shares index 0 with OOV; the length tells them apart
Similarity = Literal["dot", "cosine"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def pad_sequences(
    seqs: Sequence[np.ndarray], max_len: int, keep: Literal["first", "last"]
) -> tuple[np.ndarray, np.ndarray]:
    """Index sequences -> (ids int64 [n, max_len], lengths int64 [n]).

    Each row is left-aligned; a sequence longer than ``max_len`` keeps its first or last
    ``max_len`` entries (``keep``) in their original order; positions >= length are PAD_INDEX.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = np.full((len(seqs), max_len), PAD_INDEX, dtype=np.int64)
    lengths = np.zeros(len(seqs), dtype=np.int64)
    for r, seq in enumerate(seqs):
        s = np.asarray(seq, dtype=np.int64)
        s = s[:max_len] if keep == "first" else s[max(len(s) - max_len, 0) :]
        ids[r, : len(s)] = s
        lengths[r] = len(s)
    return ids, lengths


class HistoryField(_Frozen):
    """A user's click history: raw item ids through the item vocabulary, most recent kept."""

    items: SparseField = Field(description="the item id vocabulary (shared with the item tower)")
    max_len: int = Field(ge=1, description="clicks kept: the most recent max_len, oldest first")

    def encode(self, histories: Iterable[Sequence[object]]) -> tuple[np.ndarray, np.ndarray]:
        """Raw item-id histories (each oldest first) -> (ids [n, L], lengths [n])."""
        seqs = [self.items.encode_many(h) for h in histories]
        return pad_sequences(seqs, self.max_len, keep="last")


class TextField(_Frozen):
    """A title: lower-cased, split on white space, tokens through a vocabulary, first kept."""

    tokens: SparseField = Field(description="the token vocabulary")
    max_len: int = Field(ge=1, description="tokens kept: the first max_len")

    @staticmethod
    def tokenize(text: str | None) -> list[str]:
        return [] if text is None else text.lower().split()

    def encode(self, texts: Iterable[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Raw titles -> (token ids [n, T], lengths [n]); a missing title has length 0."""
        seqs = [self.tokens.encode_many(self.tokenize(t)) for t in texts]
        return pad_sequences(seqs, self.max_len, keep="first")


class RecallInputs(_Frozen):
    """Names of the user tower's ONNX inputs (in this order) and of its output."""

    user_sparse: str = "user_sparse"  # int64 [B, U], RecallSpec.user_sparse order
    history: str = "history_ids"  # int64 [B, L]
    history_length: str = "history_length"  # int64 [B]
    output: str = "user_embedding"  # float32 [B, D]

    @property
    def order(self) -> list[str]:
        return [self.user_sparse, self.history, self.history_length]


class RecallSpec(_Frozen):
    """The whole recall contract. ``user_sparse`` is in ONNX column order."""

    format_version: Literal[1] = 1
    model_type: str
    user_sparse: list[SparseField]
    history: HistoryField
    item_sparse: list[SparseField] = Field(description="item tower id/attribute fields, in order")
    item_dense: list[DenseField] = Field(description="item tower numeric fields, in order")
    title: TextField | None = Field(None, description="None: the item tower reads no text")
    embedding_dim: int = Field(ge=1)
    similarity: Similarity
    inputs: RecallInputs = RecallInputs()

    @model_validator(mode="after")
    def _check(self) -> RecallSpec:
        names = [f.name for f in self.user_sparse]
        if len(set(names)) != len(names):
            raise ValueError(f"user_sparse field names repeat: {names}")
        if any(f.source != "user" for f in self.user_sparse):
            raise ValueError("user_sparse fields must have source 'user'")
        if len(set(self.inputs.order + [self.inputs.output])) != 4:
            raise ValueError(f"input and output names must differ: {self.inputs}")
        return self

    @property
    def item_vocab(self) -> SparseField:
        return self.history.items

    def encode_users(
        self, users: Sequence[Mapping[str, object]], histories: Sequence[Sequence[object]]
    ) -> dict[str, np.ndarray]:
        """The user tower's ONNX feed for raw users and their raw item-id histories (oldest
        first). A missing attribute or an unknown id is OOV: the cold-start path."""
        if len(users) != len(histories):
            raise ValueError(f"{len(users)} users but {len(histories)} histories")
        sparse = np.zeros((len(users), len(self.user_sparse)), dtype=np.int64)
        for j, f in enumerate(self.user_sparse):
            sparse[:, j] = f.encode_many(u.get(f.name) for u in users)
        ids, lengths = self.history.encode(histories)
        return {
            self.inputs.user_sparse: sparse,
            self.inputs.history: ids,
            self.inputs.history_length: lengths,
        }

    # -- serialisation --
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: Path) -> Path:
        path = Path(directory) / RECALL_SPEC_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: Path) -> RecallSpec:
        path = Path(path)
        if path.is_dir():
            path = path / RECALL_SPEC_FILE
        return cls.model_validate_json(path.read_text())
