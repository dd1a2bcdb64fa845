"""Feature snapshots: per-user and per-item records in one fixed binary layout.

A snapshot holds, for every known user and item, the model inputs already encoded per
``spec.json`` (vocabulary indices, normalised dense values) plus, for items, the raw attributes
the re-rank rules need. Every entity is one packed little-endian record, so the service turns the
values of one Redis ``MGET`` into arrays with a single ``numpy.frombuffer`` and no per-field
parsing. The embedded store loads the same records from the snapshot file.

Layouts (numpy packed structured dtypes, no padding)::

    user: sparse <i8[n_user_sparse] | dense <f4[n_user_dense]
    item: sparse <i8[n_item_sparse] | dense <f4[n_item_dense] | the item attributes of
          mtrank.attributes.ITEM_ATTRIBUTES, in table order (category <i4 | brand <i4 | ...)

``code`` attributes (category, brand) are indices into the snapshot's attribute tables (the rules
only compare them); ``first_seen_day`` counts days since 1970-01-01; ``exposure_cap`` < 0 means
"use the configured default". Cold-start values are the table's defaults: no category/brand
code (-1 never equals a real code, so diversity never groups unknown items), unknown price 0.

Redis keys are a pure function of (namespace, version, entity) — see :func:`user_key` and friends;
``mtrank:{ns}:snap`` points at the serving version and is switched only after the new version is
fully written.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.spec import FeatureSpec

# Version of the record layout. Bump it with every change to ITEM_ATTRIBUTES (and pin the new
# layout below): a snapshot written under one layout must never be read as another.
SNAPSHOT_FORMAT = 1
FORMAT_LAYOUTS: dict[int, str] = {1: "520ea0166f5ac005"}


def user_dtype(spec: FeatureSpec) -> np.dtype[Any]:
    sparse, dense = spec.fields("user")
    return np.dtype([("sparse", "<i8", (len(sparse),)), ("dense", "<f4", (len(dense),))])


def item_dtype(spec: FeatureSpec) -> np.dtype[Any]:
    sparse, dense = spec.fields("item")
    fields: list[tuple[Any, ...]] = [
        ("sparse", "<i8", (len(sparse),)),
        ("dense", "<f4", (len(dense),)),
    ]
    fields += ITEM_ATTRIBUTES.record_fields()
    return np.dtype(fields)


def default_user_record(spec: FeatureSpec) -> np.ndarray:
    rec = np.zeros((), dtype=user_dtype(spec))
    rec["sparse"], rec["dense"] = spec.default_entity("user")
    return rec


def default_item_record(spec: FeatureSpec) -> np.ndarray:
    rec = np.zeros((), dtype=item_dtype(spec))
    rec["sparse"], rec["dense"] = spec.default_entity("item")
    for name, value in ITEM_ATTRIBUTES.defaults().items():
        rec[name] = value
    return rec


def decode(values: list[bytes | None], default: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode raw values (``None`` for a miss) into a record array and a found-mask.

    Misses take the default record; a value of the wrong length is treated as a miss (a snapshot
    written for another spec must never be misread as features).
    """
    size = default.dtype.itemsize
    blank = default.tobytes()
    found = np.fromiter(
        (v is not None and len(v) == size for v in values), dtype=bool, count=len(values)
    )
    buf = b"".join(v if ok else blank for v, ok in zip(values, found, strict=True))  # type: ignore[misc]
    return np.frombuffer(buf, dtype=default.dtype), found


# -- Redis key encoding: pure, pinned byte-for-byte by tests --
def pointer_key(namespace: str) -> bytes:
    return f"mtrank:{namespace}:snap".encode()


def meta_key(namespace: str, version: str) -> bytes:
    return f"mtrank:{namespace}:snap:{version}:meta".encode()


def user_key(namespace: str, version: str, user_id: str) -> bytes:
    return f"mtrank:{namespace}:snap:{version}:u:{user_id}".encode()


def item_key_prefix(namespace: str, version: str) -> bytes:
    """``item_key`` without the id: a request builds its N keys as ``prefix + id`` bytes."""
    return f"mtrank:{namespace}:snap:{version}:i:".encode()


def item_key(namespace: str, version: str, item_id: str) -> bytes:
    return item_key_prefix(namespace, version) + item_id.encode()


def exposure_key_prefix(namespace: str, day: str) -> bytes:
    return f"mtrank:{namespace}:{{exp:{day}}}:".encode()


def exposure_key(namespace: str, day: str, item_id: str) -> bytes:
    """Daily exposure counter of one item; ``day`` is ``YYYYMMDD`` (UTC).

    The ``{...}`` hash tag keeps one day's counters in one Redis Cluster slot so the atomic
    cap-and-increment script can touch all of a request's counters at once.
    """
    return exposure_key_prefix(namespace, day) + item_id.encode()


@dataclass
class Snapshot:
    """Encoded users and items of one snapshot version, as stored in ``snapshot.npz``.

    ``built_at`` (unix time, set when the snapshot is built) travels in the meta, to the file and
    to Redis, so the service can report how old the features it serves are.
    """

    spec_sha256: str
    version: str
    user_ids: np.ndarray  # (U,) str
    users: np.ndarray  # (U,) user_dtype records
    item_ids: np.ndarray  # (I,) str
    items: np.ndarray  # (I,) item_dtype records
    attribute_tables: dict[str, list[str]] = field(default_factory=dict)
    built_at: float = field(default_factory=time.time)

    def meta(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "version": self.version,
            "spec_sha256": self.spec_sha256,
            "built_at": self.built_at,
            "n_users": int(len(self.user_ids)),
            "n_items": int(len(self.item_ids)),
            "user_record_bytes": int(self.users.dtype.itemsize),
            "item_record_bytes": int(self.items.dtype.itemsize),
            "attribute_tables": self.attribute_tables,
        }

    def save(self, path: Path) -> Path:
        """Write atomically: a reader never sees half a snapshot."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        meta = np.frombuffer(json.dumps(self.meta()).encode(), dtype=np.uint8)
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                meta=meta,
                user_ids=self.user_ids.astype(str),
                users=self.users.view(np.uint8).reshape(len(self.users), -1),
                item_ids=self.item_ids.astype(str),
                items=self.items.view(np.uint8).reshape(len(self.items), -1),
            )
        tmp.replace(path)
        # Sidecar meta, so a registry scan finds the snapshot for a spec without opening the npz.
        side = path.with_suffix(".json")
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(json.dumps(self.meta(), indent=1))
        side_tmp.replace(side)
        return path

    @classmethod
    def load(cls, path: Path, spec: FeatureSpec) -> Snapshot:
        """Read a snapshot and check it was encoded for ``spec``."""
        with zipfile.ZipFile(path) as zf:
            arrays = {n[:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist()}
        meta = json.loads(arrays["meta"].tobytes())
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path}: snapshot format {meta.get('format')} is not supported")
        if meta["spec_sha256"] != spec.sha256():
            raise ValueError(
                f"{path}: snapshot was built for spec {meta['spec_sha256'][:12]}, "
                f"the model's spec is {spec.sha256()[:12]}: rebuild it with `mtrank features build`"
            )
        udt, idt = user_dtype(spec), item_dtype(spec)
        return cls(
            spec_sha256=meta["spec_sha256"],
            version=meta["version"],
            user_ids=arrays["user_ids"],
            users=np.ascontiguousarray(arrays["users"]).view(udt).reshape(-1),
            item_ids=arrays["item_ids"],
            items=np.ascontiguousarray(arrays["items"]).view(idt).reshape(-1),
            attribute_tables={k: list(v) for k, v in meta.get("attribute_tables", {}).items()},
            # A file written before metas carried built_at: it was written when it was built.
            built_at=float(meta.get("built_at", Path(path).stat().st_mtime)),
        )
