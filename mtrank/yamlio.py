"""Strict YAML: the one loader for every YAML file mtrank reads.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so a setting written
twice silently loses one value. Every config the project reads (training configs and dataset
specs, fusion files, the ranking config, the tune-fusion config) goes through
:func:`strict_yaml_load`, which rejects a repeated key, and is validated by a pydantic model with
``extra="forbid"``, which rejects an unknown key. Both failures name the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


class KeyedError(ValueError):
    """An error about one key of a config: ``detail`` is the message, ``key`` the dotted path."""

    def __init__(self, detail: str, key: str | None = None) -> None:
        self.detail, self.key = detail, key
        super().__init__(f"{key}: {detail}" if key else detail)


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that rejects a key repeated in one mapping."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise yaml.constructor.ConstructorError(
            None, None, f"key {dup!r} appears twice", node.start_mark
        )
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def strict_yaml_load(text: str) -> Any:
    """Parse YAML safely; a repeated key is an error (a silently dropped setting is worse)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader


def read_yaml_mapping(path: Path, error: type[Exception], what: str, shape: str) -> dict[str, Any]:
    """Read a strict-YAML file whose top level must be a mapping; failures raise ``error``."""
    try:
        data = strict_yaml_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise error(f"{path}: cannot read {what}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path}: {shape}")
    return data


_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
_PHRASES = {"extra_forbidden": "unknown key", "missing": "required key is missing"}


def _message(e: Any) -> str:
    # a tagged union's tag (written "<tag>") is part of pydantic's location, not of the file
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("<"))]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    ctx = e.get("ctx") or {}
    kind = e["type"]
    if kind in _BOUNDS:
        symbol, bound = _BOUNDS[kind]
        msg = f"must be {symbol} {ctx.get(bound)}"
    elif kind == "value_error":
        cause = ctx.get("error", e["msg"])
        msg = cause.detail if isinstance(cause, KeyedError) else str(cause)
        if isinstance(cause, KeyedError) and cause.key and not key.endswith(cause.key):
            key = f"{key}.{cause.key}" if key else cause.key  # a model validator's own key
    else:
        msg = _PHRASES.get(kind, e["msg"])
    return f"{key or '(top level)'}: {msg}"


def validation_message(err: ValidationError) -> str:
    """The first pydantic error as ``key.path[0].x: message``."""
    return _message(err.errors()[0])


def validation_messages(err: ValidationError) -> list[str]:
    """Every pydantic error, one ``key.path: message`` line each."""
    return [_message(e) for e in err.errors()]


_Model = TypeVar("_Model", bound=BaseModel)


def load_yaml_model(
    path: Path, model: type[_Model], error: type[Exception], what: str, shape: str
) -> _Model:
    """Read a strict-YAML file into ``model``; every failure is ``error`` naming the file (and,
    for a validation failure, the key path)."""
    data = read_yaml_mapping(path, error, what, shape)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(f"{path}: {validation_message(e)}") from e
