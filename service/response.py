"""The ``POST /rank`` response body, built from what the request's stages computed.

Without ``explain`` the body holds the returned items and their scores. With it, each item also
carries its model predictions, the fused score's factors, the rules' effects and whether its
features were found, and ``dropped`` lists the candidates a cap removed, with the reason:
``exposure_cap`` (the soft check while ranking), ``exposure_cap_race`` (the atomic reservation
refused it) or ``exposure_cap_unreserved`` (capped, withheld while the store could not reserve
exposures under ``fail_closed``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.exposure import Reservation
from service.features.store import FetchResult
from service.request import RankQuery
from service.rules import RerankResult
from service.runtime import ModelBundle


@dataclass(frozen=True)
class Outcome:
    """What one request computed, stage by stage."""

    query: RankQuery
    bundle: ModelBundle
    fetched: FetchResult
    outputs: dict[str, np.ndarray]  # task -> (N,) predictions
    formula: Any  # the compiled fusion: a Formula or a learned one (service/variants.py)
    env: dict[str, Any]  # the formula's inputs
    result: RerankResult
    reservation: Reservation
    degraded: list[str]
    arms: tuple[tuple[str, str], ...] = ()  # (experiment, arm) the request was assigned
    request_id: str = ""  # minted by the ranker (service/request_ids.py); "" -> a random one


def response_body(o: Outcome) -> dict[str, Any]:
    """The JSON-ready body of a successful ``POST /rank``."""
    order = o.reservation.order.tolist()
    body: dict[str, Any] = {
        "request_id": o.request_id or uuid.uuid4().hex,
        "model": _model_ref(o.bundle, 0),
        "models": [_model_ref(o.bundle, i) for i in range(len(o.bundle.runtimes))],
        "items": [],
        "degraded": o.degraded,
    }
    if o.arms:
        body["experiments"] = [{"experiment": e, "arm": a} for e, a in o.arms]
    if not o.query.explain:
        scores, ids = o.result.scores, o.query.item_ids
        body["items"] = [{"item_id": ids[i], "score": _finite(scores[i])} for i in order]
        return body
    explainer = _Explain(o)
    body["items"] = [explainer.item(i) for i in order]
    body["dropped"] = explainer.dropped()
    return body


def _model_ref(bundle: ModelBundle, i: int) -> dict[str, str]:
    mv = bundle.runtimes[i].model
    return {"name": mv.name, "version": mv.version}


def _finite(x: float) -> float | None:
    # JSON has no -inf: an item whose fused score was not finite reports null.
    return float(x) if np.isfinite(x) else None


def _json_float(x: float) -> float | str:
    return x if np.isfinite(x) else str(x)


class _Explain:
    """Per-item explanation: predictions, fused-score factors, rule effects, feature misses."""

    def __init__(self, o: Outcome) -> None:
        n = len(o.query.item_ids)
        self.o = o
        self.outputs = {k: v.astype(np.float64).tolist() for k, v in o.outputs.items()}
        self.factors = {k: v.tolist() for k, v in o.formula.factors(o.env, n).items()}

    def item(self, i: int) -> dict[str, Any]:
        f, result = self.o.fetched, self.o.result
        rules = result.explain(i)
        return {
            "item_id": self.o.query.item_ids[i],
            "score": _finite(result.scores[i]),
            "explain": {
                "predictions": {k: v[i] for k, v in self.outputs.items()},
                "factors": {k: _json_float(v[i]) for k, v in self.factors.items()},
                "rules": {**rules, "score": _finite(rules["score"])},
                "features": {"user_found": bool(f.user_found), "item_found": bool(f.item_found[i])},
            },
        }

    def dropped(self) -> list[dict[str, Any]]:
        capped, r = self.o.result.capped, self.o.reservation
        out = []
        for i in np.flatnonzero(capped | r.refused | r.withheld).tolist():
            if capped[i]:
                reason = "exposure_cap"
            elif r.refused[i]:
                reason = "exposure_cap_race"
            else:
                reason = "exposure_cap_unreserved"
            entry = self.item(i)
            del entry["score"]
            out.append({"reason": reason, **entry})
        return out
