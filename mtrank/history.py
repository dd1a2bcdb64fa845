"""User histories for the recall stage: one packed record per user, a file and Redis keys.

The user tower reads a user's most recent clicks and a few user attributes; the recall filter
reads the clicks again to leave out what the user has already seen. Both come from one record,
read with one ``GET`` per request (the Feast habit: one round trip, keys a pure function whose
tests pin their bytes). Layout of a record (little-endian, no padding)::

    codes <i4[A] | items <i8[n]

- ``codes``: one per attribute field of the snapshot (``HistorySnapshot.fields``, in order), an
  index into that field's table of raw values (``tables[field]``, in the meta), -1 for missing;
- ``items``: the raw ids of the user's last ``n <= max_len`` clicked items, oldest first (the
  order :class:`mtrank.recall_spec.HistoryField` expects). ``n`` follows from the length.

Why the attributes are here and not read from the ranking feature snapshot: that snapshot holds
the *ranking* model's vocabulary indices (its own min counts and OOV bucket), so a rare value is
already lost there, and reading it would tie recall to the ranking model's version and add a
second key to the round trip. Raw-value codes tie the record to neither model: a newly promoted
recall version maps each (small) table through its own vocabularies once, and every record stays
valid.

Redis keys mirror :mod:`mtrank.snapshot`: records under ``mtrank:{ns}:hist:{version}:u:{id}``,
the meta (fields, tables, ``built_at``) under ``...:{version}:meta``, and the pointer
``mtrank:{ns}:hist`` naming the served version, switched only after every record is written.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import redis

HISTORY_FORMAT = 1
HISTORY_DIR = "histories"  # models/NAME/histories/VERSION.npz: the files of a recall model NAME
CODE_DTYPE = np.dtype("<i4")
ITEM_DTYPE = np.dtype("<i8")
MISSING_CODE = -1


# -- Redis key encoding: pure, pinned byte-for-byte by tests --
def pointer_key(namespace: str) -> bytes:
    return f"mtrank:{namespace}:hist".encode()


def meta_key(namespace: str, version: str) -> bytes:
    return f"mtrank:{namespace}:hist:{version}:meta".encode()


def user_key(namespace: str, version: str, user_id: str) -> bytes:
    return f"mtrank:{namespace}:hist:{version}:u:{user_id}".encode()


# -- records --
def encode_record(codes: np.ndarray, items: np.ndarray) -> bytes:
    """One user's record: attribute codes (A,) then raw item ids (n,), oldest first."""
    return np.asarray(codes, CODE_DTYPE).tobytes() + np.asarray(items, ITEM_DTYPE).tobytes()


@dataclass(frozen=True)
class UserHistory:
    """A decoded record: attribute codes (A,) int32 and clicked raw item ids (n,) int64."""

    codes: np.ndarray
    items: np.ndarray


def decode_record(raw: bytes, n_fields: int) -> UserHistory | None:
    """The record's arrays (views on ``raw``), or None for a value of an impossible length
    (written under another layout: never misread as a history)."""
    head = n_fields * CODE_DTYPE.itemsize
    if len(raw) < head or (len(raw) - head) % ITEM_DTYPE.itemsize:
        return None
    return UserHistory(
        np.frombuffer(raw, CODE_DTYPE, count=n_fields),
        np.frombuffer(raw, ITEM_DTYPE, offset=head),
    )


@dataclass
class HistorySnapshot:
    """Every user's history record of one version, as stored in ``history.npz``.

    ``codes[u]`` are user u's attribute codes; the user's items are
    ``items[offsets[u]:offsets[u + 1]]`` (oldest first, at most ``max_len``).
    """

    version: str
    max_len: int
    fields: list[str]
    tables: dict[str, list[str]]  # field -> raw values; code c is tables[field][c]
    user_ids: np.ndarray  # (U,) str
    codes: np.ndarray  # (U, A) int32
    offsets: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (T,) int64 raw item ids
    built_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        n = len(self.user_ids)
        if self.codes.shape != (n, len(self.fields)) or self.offsets.shape != (n + 1,):
            raise ValueError(
                f"history: {n} users need codes ({n}, {len(self.fields)}) and offsets ({n + 1},),"
                f" got {self.codes.shape} and {self.offsets.shape}"
            )
        if set(self.tables) != set(self.fields):
            raise ValueError(f"history: tables {sorted(self.tables)} != fields {self.fields}")

    def record(self, u: int) -> bytes:
        return encode_record(self.codes[u], self.items[self.offsets[u] : self.offsets[u + 1]])

    def meta(self) -> dict[str, Any]:
        return {
            "format": HISTORY_FORMAT,
            "version": self.version,
            "built_at": self.built_at,
            "max_len": self.max_len,
            "fields": self.fields,
            "tables": self.tables,
            "n_users": int(len(self.user_ids)),
            "n_clicks": int(len(self.items)),
        }

    def save(self, path: Path) -> Path:
        """Write atomically (temp file, rename), with the meta beside it as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        meta = np.frombuffer(json.dumps(self.meta()).encode(), dtype=np.uint8)
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=meta, user_ids=self.user_ids.astype(str),
                     codes=self.codes.astype(CODE_DTYPE), offsets=self.offsets.astype(np.int64),
                     items=self.items.astype(ITEM_DTYPE))  # fmt: skip
        tmp.replace(path)
        side = path.with_suffix(".json")
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(json.dumps(self.meta(), indent=1))
        side_tmp.replace(side)
        return path

    @classmethod
    def load(cls, path: Path) -> HistorySnapshot:
        with zipfile.ZipFile(path) as zf:
            arrays = {n[:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist()}
        meta = check_meta(json.loads(arrays["meta"].tobytes()), str(path))
        return cls(
            version=meta["version"],
            max_len=int(meta["max_len"]),
            fields=list(meta["fields"]),
            tables={k: list(v) for k, v in meta["tables"].items()},
            user_ids=arrays["user_ids"],
            codes=arrays["codes"],
            offsets=arrays["offsets"],
            items=arrays["items"],
            built_at=float(meta["built_at"]),
        )


def check_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """The meta of a file or a Redis version; ValueError naming ``where`` if unusable."""
    if meta.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{where}: history format {meta.get('format')} is not supported")
    missing = [k for k in ("version", "max_len", "fields", "tables", "built_at") if k not in meta]
    if missing:
        raise ValueError(f"{where}: history meta lacks {missing}")
    return meta


def latest_history(directory: Path) -> Path | None:
    """The newest history file of a directory (versions sort by build time), or None."""
    files = sorted(Path(directory).glob("*.npz"))
    return files[-1] if files else None


def load_history_to_redis(
    client: redis.Redis,
    namespace: str,
    snapshot: HistorySnapshot,
    batch_size: int = 2000,
    ttl_old_s: int = 3600,
) -> dict[str, Any]:
    """Write every record under the version's keys in pipelined batches, then the pointer.

    Readers resolve the pointer, so they see the old version or the new, never a mix. The
    version replaced gets a TTL of ``ttl_old_s`` on its meta and records: a reader that resolved
    it a moment ago can finish, and a rollback (pointer back) stays possible for that long.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    start = time.perf_counter()
    version = snapshot.version
    raw = client.get(pointer_key(namespace))
    previous = raw.decode() if isinstance(raw, bytes) else raw
    client.set(meta_key(namespace, version), json.dumps(snapshot.meta()))
    ids = snapshot.user_ids.tolist()
    for lo in range(0, len(ids), batch_size):
        pipe = client.pipeline(transaction=False)
        for u in range(lo, min(lo + batch_size, len(ids))):
            pipe.set(user_key(namespace, version, str(ids[u])), snapshot.record(u))
        pipe.execute()
    client.set(pointer_key(namespace), version)  # the switch
    if previous is not None and previous != version:
        prefix = meta_key(namespace, previous)[: -len(b"meta")].decode()
        pipe = client.pipeline(transaction=False)
        for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            pipe.expire(key, ttl_old_s)
        pipe.execute()
    return {
        "namespace": namespace,
        "version": version,
        "previous_version": previous,
        "users": len(ids),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
