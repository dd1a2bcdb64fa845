"""item2vec: skip-gram item vectors from behaviour sessions, to initialise ranking embeddings.

    mtrank item2vec --data DIR --out runs/item2vec/item_id.npz [--dim 16] [--window 5]
        [--epochs 10] [--session-gap 1800] [--seed 0]
    # then, in a train config:  model: {embed_dim: 16, init_embeddings: {item_id: PATH}}

Barkan & Koenigstein, "Item2Vec: Neural Item Embedding for Collaborative Filtering" (MLSP 2016):
word2vec's skip-gram with negative sampling (Mikolov et al., NIPS 2013) where a sentence is a
user's session and a word an item. Items clicked near each other get near vectors, so a rare item
inherits what its neighbours' many impressions taught; that is the pretraining seed 000 describes
before fine-tuning in the ranking model.

Sessions: the train split's clicks of each user in time order, cut where two clicks are more than
``session_gap`` seconds apart; sessions of one click carry no co-occurrence and are dropped. Only
the train split is read, so the vectors leak nothing of valid or test. gensim's ``Word2Vec`` does
the training (one worker thread and a fixed seed: the output is the same on every run).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item2VecConfig:
    dim: int = 16
    window: int = 5
    epochs: int = 10
    negative: int = 5
    min_count: int = 1
    sample: float = 1e-3  # down-sampling of frequent items (word2vec's threshold); 0: none
    session_gap: int = 1800  # seconds between two clicks that ends a session
    seed: int = 0


def sessions(train_file: Path, gap: int) -> list[list[str]]:
    """Click sessions of the split: item ids (as str) per session, in time order."""
    table = pq.read_table(train_file, columns=["user_id", "item_id", "ts", "click"])
    table = table.filter(pc.equal(table.column("click"), 1))
    user = table.column("user_id").to_numpy()
    item = table.column("item_id").to_numpy()
    ts = table.column("ts").to_numpy()
    order = np.lexsort((ts, user))  # by user, then time
    user, item, ts = user[order], item[order], ts[order]
    # a new session where the user changes or the gap since the previous click is too long
    new = np.ones(len(user), dtype=bool)
    new[1:] = (user[1:] != user[:-1]) | (ts[1:] - ts[:-1] > gap)
    starts = np.flatnonzero(new)
    bounds = np.append(starts, len(user))
    words = item.astype(str)
    return [words[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b - a > 1]


def train_item2vec(train_file: Path, cfg: Item2VecConfig) -> tuple[np.ndarray, np.ndarray]:
    """(raw item ids (n,) int64, vectors (n, dim) float32) of every item in a session."""
    from gensim.models import Word2Vec

    corpus = sessions(train_file, cfg.session_gap)
    if not corpus:
        raise ValueError(f"{train_file}: no session with two or more clicks")
    model = Word2Vec(
        corpus,
        vector_size=cfg.dim,
        window=cfg.window,
        min_count=cfg.min_count,
        sg=1,  # skip-gram
        negative=cfg.negative,
        sample=cfg.sample,
        epochs=cfg.epochs,
        workers=1,  # with the seed: deterministic
        seed=cfg.seed,
    )
    words = list(model.wv.index_to_key)
    ids = np.asarray([int(w) for w in words], dtype=np.int64)
    vectors = np.asarray(model.wv[words], dtype=np.float32)  # (n, dim)
    return ids, vectors


def save(ids: np.ndarray, vectors: np.ndarray, out: Path) -> None:
    """``out`` (.npz: ids, vectors), written atomically: the layout training/pretrained.py reads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, ids=ids, vectors=vectors)
    os.replace(tmp, out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mtrank item2vec", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a `mtrank synth ecommerce` folder")
    p.add_argument("--out", type=Path, required=True, help="the .npz to write")
    defaults = Item2VecConfig()
    p.add_argument("--dim", type=int, default=defaults.dim)
    p.add_argument("--window", type=int, default=defaults.window)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--session-gap", type=int, default=defaults.session_gap)
    p.add_argument("--seed", type=int, default=defaults.seed)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = Item2VecConfig(
        dim=args.dim,
        window=args.window,
        epochs=args.epochs,
        session_gap=args.session_gap,
        seed=args.seed,
    )
    ids, vectors = train_item2vec(args.data / "train.parquet", cfg)
    save(ids, vectors, args.out)
    log.info("item2vec: %d items x %d dims -> %s", len(ids), vectors.shape[1], args.out)
    return 0
