"""The served-feature log's contract: what a segment file holds, so training reads what served.

The service (service/served_log.py) writes, for a sample of ranking requests, exactly what the
models saw and said; ``mtrank logs export`` (training/logs.py) joins those rows with the events
that followed and writes Parquet a dataset spec reads. Training on those rows cannot suffer from
training/serving skew: the inputs are the served ones, byte for byte.

Layout: ``DIR/YYYYMMDD/HOST-PID-STARTMS-SEQ.npz`` (the UTC day of the segment's first row),
written to a temporary name and renamed, so a reader never sees half a segment. One row per
candidate of a logged request, in the request's candidate order:

===================  ==============  =====================================================
array                dtype, shape    meaning
===================  ==============  =====================================================
``request_id``       U32 (R,)        the answer's request_id (events name it)
``ts``               float64 (R,)    Unix seconds when the request was ranked
``user_id``          U (R,)          the request's user
``item_id``          U (R,)          the candidate
``position``         int32 (R,)      its place in the answer (0 first), -1 if not returned
``scene``            U (R,)          the request's scene
``arms``             U (R,)          ``EXPERIMENT=ARM`` pairs joined by ``,`` ("" if none)
``models``           U (R,)          ``NAME@VERSION`` of the scoring models, joined by ``,``
``snapshot``         U (R,)          the feature snapshot version the features came from
``from_store``       bool (R,)       False: the store failed and defaults were served
``sparse``           int64 (R, S)    the assembled sparse inputs, as the graph received them
``dense``            float32 (R, D)  the assembled dense inputs
``score``            float64 (R,)    the fused score (-inf: not finite)
``out.TASK``         float32 (R,)    each task output of the models
``meta``             U (scalar)      JSON: format, spec_sha256 of the inputs, the sparse and
                                     dense feature names in column order, the task names
===================  ==============  =====================================================

One segment holds rows of one input spec only (a model reload that changes the inputs starts a
new segment).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import numpy as np

FORMAT: Final = "mtrank-served-log/1"
OUTPUT_PREFIX: Final = "out."
ROW_ARRAYS: Final = (
    "request_id", "ts", "user_id", "item_id", "position", "scene", "arms", "models", "snapshot",
    "from_store", "sparse", "dense", "score",
)  # fmt: skip


def segment_meta(
    spec_sha256: str, sparse: list[str], dense: list[str], tasks: list[str]
) -> dict[str, Any]:
    return {"format": FORMAT, "spec_sha256": spec_sha256, "sparse": sparse, "dense": dense,
            "tasks": tasks}  # fmt: skip


def read_segment(path: Path | str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of one segment; ValueError if it is not a served-log segment."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a served-log segment ({meta.get('format')!r})")
    missing = [k for k in ROW_ARRAYS if k not in arrays]
    missing += [OUTPUT_PREFIX + t for t in meta["tasks"] if OUTPUT_PREFIX + t not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}")
    return meta, arrays
