"""Which events belong to which served row, and the labels they make (pure; numpy and Arrow).

``mtrank logs export`` (training/logs.py) calls these on the served rows of a time range and the
events of those requests. An event belongs to a served row when both name the same
``(request_id, item_id)``; it counts when it happened inside its window:

- **impression**, **click**: ``ts`` in [served ts - skew, served ts + click window];
- **cart**, **collect**, **purchase**, **stay**: the row was clicked, and ``ts`` in
  [click ts - skew, click ts + conversion window], the click being the row's first counted one
  (a purchase "within 7 days of the click").

``skew`` absorbs clients whose clock runs a little behind the service's. A click implies an
impression (a client that sends no impression events still gets shown rows labelled). ``amount``
sums the counted purchases' amounts and ``stay_seconds`` the counted stays' seconds; repeated
events of one type count once in the 0/1 labels.

Delayed conversions (training/models/delayed.py) need to know how long each row was watched:
``elapsed_days`` is the time from the click (the served ts for rows without one) to the end of its
observation, the earlier of ``as_of`` (the export's cut-off: later events are not known) and the
close of its window; ``purchase_delay_days`` is the time from the click to the first counted
purchase (NaN without one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DAY_S = 86_400.0
BINARY_LABELS = ("impression", "click", "cart", "collect", "purchase")
POST_CLICK = ("cart", "collect", "purchase")


@dataclass(frozen=True)
class Windows:
    """Attribution windows in seconds (module docstring)."""

    click_s: float = 3_600.0
    conversion_s: float = 7 * DAY_S
    skew_s: float = 60.0

    def __post_init__(self) -> None:
        if self.click_s < 0 or self.conversion_s < 0 or self.skew_s < 0:
            raise ValueError(f"windows must not be negative: {self}")


def match(
    request_id: pa.Array, item_id: pa.Array, events: pa.Table
) -> tuple[np.ndarray, np.ndarray]:
    """(served row, event row) index pairs of every event naming a served row's
    ``(request_id, item_id)``, ordered by event row (so sums are deterministic)."""
    served = pa.table({"request_id": request_id, "item_id": item_id,
                       "_row": pa.array(np.arange(len(request_id), dtype=np.int64))})  # fmt: skip
    keys = events.select(["request_id", "item_id"]).append_column(
        "_event", pa.array(np.arange(events.num_rows, dtype=np.int64))
    )
    joined = keys.join(served, keys=["request_id", "item_id"], join_type="inner")
    rows = joined.column("_row").to_numpy()
    event = joined.column("_event").to_numpy()
    order = np.lexsort((rows, event))
    return np.asarray(rows[order]), np.asarray(event[order])


def attribute(
    served_ts: np.ndarray,
    rows: np.ndarray,
    kind: np.ndarray,
    ts: np.ndarray,
    amount: np.ndarray,
    seconds: np.ndarray,
    windows: Windows,
    as_of: float,
) -> dict[str, np.ndarray]:
    """Labels of R served rows from E matched events (module docstring).

    Args:
        served_ts: (R,) when each row was served, Unix seconds.
        rows: (E,) the served row each event belongs to.
        kind: (E,) event types (``click``, ...).
        ts: (E,) event timestamps, Unix seconds.
        amount: (E,) purchase amounts (NaN for other events).
        seconds: (E,) stay seconds (NaN for other events).
        windows: the attribution windows.
        as_of: the cut-off: events known by then (the caller drops later ones).

    Returns:
        {label: (R,) array}: the 0/1 labels of :data:`BINARY_LABELS` (int8), ``amount`` and
        ``stay_seconds`` (float64), ``elapsed_days`` and ``purchase_delay_days`` (float32).
    """
    n = len(served_ts)
    sts = served_ts[rows]  # (E,)
    in_click = (ts >= sts - windows.skew_s) & (ts <= sts + windows.click_s)

    def count(mask: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        w = None if weights is None else np.nan_to_num(weights[mask])
        return np.bincount(rows[mask], weights=w, minlength=n)

    def first(mask: np.ndarray) -> np.ndarray:
        out = np.full(n, np.inf)
        np.minimum.at(out, rows[mask], ts[mask])
        return out

    is_click = (kind == "click") & in_click
    click_ts = first(is_click)  # (R,) inf: no click
    clicked = np.isfinite(click_ts)
    cts = click_ts[rows]  # (E,)
    post = np.isfinite(cts) & (ts >= cts - windows.skew_s) & (ts <= cts + windows.conversion_s)
    out: dict[str, np.ndarray] = {
        "impression": ((count((kind == "impression") & in_click) > 0) | clicked).astype(np.int8),
        "click": clicked.astype(np.int8),
    }
    for label in POST_CLICK:
        out[label] = (count((kind == label) & post) > 0).astype(np.int8)
    bought = (kind == "purchase") & post
    out["amount"] = count(bought, amount).astype(np.float64)
    out["stay_seconds"] = count((kind == "stay") & post, seconds).astype(np.float64)
    start = np.where(clicked, click_ts, served_ts)  # (R,)
    window = np.where(clicked, windows.conversion_s, windows.click_s)
    watched = np.maximum(np.minimum(as_of, start + window) - start, 0.0)  # (R,) seconds
    out["elapsed_days"] = (watched / DAY_S).astype(np.float32)
    purchase_ts = first(bought)  # (R,) finite exactly where clicked and bought
    bought_rows = np.isfinite(purchase_ts)
    delay = np.full(n, np.nan)
    delay[bought_rows] = np.clip(
        purchase_ts[bought_rows] - click_ts[bought_rows], 0.0, watched[bought_rows]
    )
    out["purchase_delay_days"] = (delay / DAY_S).astype(np.float32)
    return out


def event_arrays(events: pa.Table, order: np.ndarray) -> tuple[np.ndarray, ...]:
    """(kind (U), ts, amount, seconds) numpy arrays of the events at ``order``; a missing
    amount or seconds is NaN."""
    taken = events.take(pa.array(order, type=pa.int64()))
    types = pc.dictionary_encode(taken.column("type").combine_chunks())
    names = np.asarray(types.dictionary.to_pylist(), dtype=str)
    kind = names[types.indices.to_numpy(zero_copy_only=False)] if len(names) else np.array([], str)

    def floats(name: str) -> np.ndarray:
        return np.asarray(pc.fill_null(taken.column(name), np.nan).to_numpy(), dtype=np.float64)

    return kind, floats("ts"), floats("amount"), floats("seconds")
