"""ONNX Runtime execution providers: which to ask for, and whether the session got them.

Execution providers: ONNX Runtime silently runs a session on CPU when a requested provider
cannot start (no driver, a CUDA or cuDNN mismatch), so the load compares what it asked for with
``session.get_providers()``. A provider named explicitly (``MTRANK_ORT_PROVIDERS=cuda``) that did
not start is a load error; under ``auto`` the fallback to CPU is logged as a warning, and the
provider in use is reported either way (``ModelRuntime.provider`` in service/runtime.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": "TensorrtExecutionProvider"}


class ProviderError(RuntimeError):
    """A provider that is not in this onnxruntime build, or was named and did not start."""


def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """Execution providers to ask ONNX Runtime for, CPU always last as the fallback.

    ``"auto"``: CUDA when this onnxruntime build has it, else CPU. Otherwise a comma-separated
    string or a list of provider names (``cpu`` and ``cuda`` accepted as short names); one that
    is not available is an error rather than a silent fallback.
    """
    available = list(ort.get_available_providers())
    if is_auto(providers):
        return [CUDA, CPU] if CUDA in available else [CPU]
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    names = [_ALIASES.get(p.strip().lower(), p.strip()) for p in items if p.strip()]
    missing = [p for p in names if p not in available]
    if missing or not names:
        raise ProviderError(
            f"execution providers {missing or providers!r} are not available in this "
            f"onnxruntime build (available: {available})"
        )
    return list(dict.fromkeys([*names, CPU]))


def is_auto(providers: str | Sequence[str]) -> bool:
    return isinstance(providers, str) and providers.strip().lower() == "auto"


def check_started(requested: Sequence[str], used: Sequence[str], *, auto: bool, where: str) -> None:
    """Refuse a session that runs without a provider named explicitly; under ``auto``, warn.

    ``used`` is ``session.get_providers()``: ONNX Runtime drops a provider that cannot start and
    carries on with the rest, so only this comparison shows that CUDA did not start.
    """
    missing = [p for p in requested if p not in used]
    if not missing:
        return
    if auto:
        log.warning("%s: %s could not start, running on %s", where, missing, used[0])
        return
    raise ProviderError(
        f"{where}: execution provider(s) {missing} were requested but onnxruntime could not "
        f"start them (the session would run on {list(used)}): check the GPU, its driver and the "
        "CUDA and cuDNN versions this onnxruntime build needs, or set MTRANK_ORT_PROVIDERS=auto "
        "to fall back to CPU"
    )
