"""Reports as strict JSON: evaluation reports, training history, benchmark records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def to_json(obj: Any) -> Any:
    """NaN and infinities become null: the report must be strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    return obj


def write_report(report: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(report), indent=1, sort_keys=True, allow_nan=False))
    return path
