"""Score fusion: a safe, configurable formula turned into one vectorised score per candidate.

The model predicts several tasks per item (ctr, cvr, stay, cart, collect, ...); the business
decides how they combine. That combination is configuration, not code. The documented default::

    score = ctr * (alpha + cvr) * (beta + price) * stay**a * cart**b * collect**c * rule_weight

Grammar (everything else is rejected when the formula is loaded): numbers, names, ``+ - * / **``,
unary minus/plus, parentheses and calls to ``min(x, y, ...)``, ``max(x, y, ...)``, ``log(x)``,
``exp(x)`` and ``clip(x, lo, hi)``. The text is parsed once with :mod:`ast` (``mode="eval"``) and
only whitelisted node types are walked into a plan of small closures evaluated over numpy float64
arrays. User text never reaches ``eval``/``exec``/``compile``, so there is no attribute access,
subscript, call to anything else or name outside the set the caller allows.

Load-time limits, each a :class:`FusionError` naming the token and its position: at most
2,000 characters, nesting at most 32 levels deep (a flat chain ``a * b * c`` is one level; each
parenthesised group, call, unary minus or power adds one), constant exponents at most 64 in
magnitude, finite int/float constants only.

Numeric policy (evaluation never raises on bad numbers; it is decided here, once):

* ``log(x)`` is ``log(max(x, 1e-12))``: a zero or negative input gives ``log(1e-12)`` ~ -27.6.
* ``x ** y``: where ``y`` is not an integer, negative bases are clipped to 0 before the power
  (a real power of a negative number does not exist; 0 keeps the term neutral-to-low instead of
  nan). Integer exponents of negative bases are computed exactly (``(-2) ** 2 == 4``).
* Everything else follows IEEE float64 (overflow gives +-inf, 0/0 gives nan), silently.
* Final scores (:meth:`Formula.evaluate`): every non-finite value (nan, +inf, -inf) becomes -inf,
  so it ranks after every finite score, and is flagged (:func:`nonfinite_mask`). +inf ranks last
  too: it nearly always comes from a division by an unknown-as-zero attribute (unknown items
  have price 0) or a runaway exponent, and ranking such items first would put the least-known
  items at the top. :meth:`Formula.evaluate_raw` and :meth:`Formula.factors` give IEEE values
  for explain.

The fusion file (``formula`` + ``params``) is what ``mtrank tune-fusion`` writes and what the
service loads as is (:func:`load_fusion_file`, :func:`save_fusion_file`).
"""

from __future__ import annotations

import ast
import functools
import io
import os
import tokenize
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    FiniteFloat,
    Tag,
    field_validator,
)

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.yamlio import KeyedError, load_yaml_model

RULE_WEIGHT = "rule_weight"  # the product of a scene's boost/demotion multipliers
DEFAULT_FORMULA = (
    "ctr * (alpha + cvr) * (beta + price) * stay ** a * cart ** b * collect ** c * rule_weight"
)
DEFAULT_PARAMS: dict[str, float] = {"alpha": 0.1, "beta": 1.0, "a": 0.3, "b": 0.2, "c": 0.1}
MAX_FORMULA_CHARS = 2_000
MAX_DEPTH = 32
MAX_CONST_EXPONENT = 64.0
LOG_FLOOR = 1e-12

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
# A value flowing through the plan: a python float (constants, scalar params) or a float64 array.
Value = Any
Env = Mapping[str, Value]
_Fn = Callable[[Env], Value]

# name -> (min arity, max arity or None for "any")
FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "min": (2, None),
    "max": (2, None),
    "log": (1, 1),
    "exp": (1, 1),
    "clip": (3, 3),
}
_OP_SYMBOLS: dict[type[ast.AST], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Not: "not",
    ast.Invert: "~",
}
_FORBIDDEN_KINDS: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscript",
    ast.Lambda: "lambda",
    ast.IfExp: "conditional expression",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean operator",
    ast.NamedExpr: "assignment expression",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.Tuple: "tuple",
    ast.List: "list",
    ast.Dict: "dict",
    ast.Set: "set",
    ast.Starred: "starred argument",
    ast.JoinedStr: "f-string",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slice",
}


class FusionError(KeyedError):
    """A formula or fusion file that is not accepted; the message names the token or key.

    ``key`` is the config key the problem belongs to (``"formula"``, ``"params.alpha"``) so a
    caller embedding the fusion config can prefix its own key path.
    """


# -- safe element-wise operations (all float64, called under np.errstate(all="ignore")) --
def _pow(base: Value, exponent: Value) -> Value:
    b = np.asarray(base, dtype=np.float64)
    e = np.asarray(exponent, dtype=np.float64)
    fractional = e != np.floor(e)
    return np.power(np.where((b < 0) & fractional, 0.0, b), e)


def _log(x: Value) -> Value:
    return np.log(np.maximum(x, LOG_FLOOR))


def _clip(x: Value, lo: Value, hi: Value) -> Value:
    # lo > hi gives hi, like np.clip; spelled out so nan bounds propagate rather than raise.
    return np.minimum(np.maximum(x, lo), hi)


_CALLS: dict[str, Callable[..., Value]] = {
    "min": lambda *xs: functools.reduce(np.minimum, xs),
    "max": lambda *xs: functools.reduce(np.maximum, xs),
    "log": _log,
    "exp": np.exp,
    "clip": _clip,
}


@dataclass(frozen=True)
class _Plan:
    """One compiled node: its closure and, when it depends on no input, its folded value."""

    fn: _Fn
    const: float | None = None


def _constant(value: float) -> _Plan:
    return _Plan(lambda env: value, value)


def _fold(fn: _Fn, parts: list[_Plan]) -> _Plan:
    if all(p.const is not None for p in parts):
        with np.errstate(all="ignore"):
            return _constant(float(fn({})))
    return _Plan(fn)


def _chain_parts(node: ast.BinOp) -> list[tuple[type[ast.operator], ast.expr]]:
    """Flatten a left-associative chain of same-precedence operators, iteratively.

    ``a - b + c`` -> [(Add, a), (Sub, b), (Add, c)]: long flat sums and products neither hit
    the depth limit nor the Python recursion limit.
    """
    group = (ast.Add, ast.Sub) if isinstance(node.op, ast.Add | ast.Sub) else (ast.Mult, ast.Div)
    parts: list[tuple[type[ast.operator], ast.expr]] = []
    cur: ast.expr = node
    while isinstance(cur, ast.BinOp) and isinstance(cur.op, group):
        parts.append((type(cur.op), cur.right))
        cur = cur.left
    parts.append((group[0], cur))
    parts.reverse()
    return parts


class _Compiler:
    """Walks a parsed formula into a :class:`_Plan`, accepting only the whitelisted grammar."""

    def __init__(
        self, text: str, allowed: frozenset[str] | None, constants: Mapping[str, float]
    ) -> None:
        self.text = text
        self.allowed = allowed  # None: any name (grammar check only)
        self.constants = constants
        self.names: set[str] = set()

    # -- errors --
    def error(self, node: ast.AST, what: str) -> FusionError:
        line, col = getattr(node, "lineno", 1), getattr(node, "col_offset", 0) + 1
        where = f"column {col}" if line == 1 else f"line {line} column {col}"
        return FusionError(f"{what} at {where}", key="formula")

    def source(self, node: ast.AST, limit: int = 40) -> str:
        seg = ast.get_source_segment(self.text, node) or type(node).__name__
        return seg if len(seg) <= limit else seg[: limit - 3] + "..."

    # -- walk --
    def compile(self, node: ast.expr, depth: int) -> _Plan:
        if depth > MAX_DEPTH:
            raise self.error(
                node, f"expression nested deeper than {MAX_DEPTH} levels near {self.source(node)!r}"
            )
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node, depth)
        if isinstance(node, ast.BinOp):
            return self.binop(node, depth)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        kind = _FORBIDDEN_KINDS.get(type(node), f"expression {type(node).__name__}")
        if isinstance(node, ast.Attribute):
            kind += f" '.{node.attr}' in"
        raise self.error(node, f"{kind} {self.source(node)!r} is not allowed")

    def constant(self, node: ast.Constant) -> _Plan:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.error(node, f"constant {self.source(node)!r} is not a number")
        try:
            value = float(v)
        except OverflowError:
            value = float("inf")
        if not np.isfinite(value):
            raise self.error(node, f"constant {self.source(node)!r} is not finite")
        return _constant(value)

    def name(self, node: ast.Name) -> _Plan:
        name = node.id
        if name in self.constants:
            return _constant(float(self.constants[name]))
        if self.allowed is not None and name not in self.allowed:
            known = ", ".join(sorted(self.allowed | set(self.constants))) or "none"
            raise self.error(node, f"unknown name {name!r} (known: {known})")
        self.names.add(name)
        return _Plan(lambda env: env[name])

    def unary(self, node: ast.UnaryOp, depth: int) -> _Plan:
        if not isinstance(node.op, ast.USub | ast.UAdd):
            sym = _OP_SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise self.error(node, f"operator {sym!r} is not allowed")
        inner = self.compile(node.operand, depth + 1)
        if isinstance(node.op, ast.UAdd):
            return inner
        f = inner.fn
        return _fold(lambda env: np.negative(f(env)), [inner])

    def binop(self, node: ast.BinOp, depth: int) -> _Plan:
        op = node.op
        if isinstance(op, ast.Pow):
            return self.power(node, depth)
        if not isinstance(op, ast.Add | ast.Sub | ast.Mult | ast.Div):
            sym = _OP_SYMBOLS.get(type(op), type(op).__name__)
            raise self.error(node, f"operator {sym!r} is not allowed")
        parts = _chain_parts(node)
        plans = [self.compile(e, depth + 1) for _, e in parts]
        ufuncs = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.divide}
        steps = [(ufuncs[o], p.fn) for (o, _), p in zip(parts[1:], plans[1:], strict=True)]
        first = plans[0].fn

        def run(env: Env) -> Value:
            acc = first(env)
            for ufunc, fn in steps:
                acc = ufunc(acc, fn(env))
            return acc

        return _fold(run, plans)

    def power(self, node: ast.BinOp, depth: int) -> _Plan:
        base = self.compile(node.left, depth + 1)
        exponent = self.compile(node.right, depth + 1)
        if exponent.const is not None and abs(exponent.const) > MAX_CONST_EXPONENT:
            raise self.error(
                node.right,
                f"exponent {self.source(node.right)!r} = {exponent.const:g} exceeds "
                f"{MAX_CONST_EXPONENT:g} in magnitude",
            )
        fb, fe = base.fn, exponent.fn
        return _fold(lambda env: _pow(fb(env), fe(env)), [base, exponent])

    def call(self, node: ast.Call, depth: int) -> _Plan:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            allowed = ", ".join(sorted(FUNCTIONS))
            raise self.error(
                node, f"call to {self.source(node.func)!r} is not allowed (allowed: {allowed})"
            )
        fname = node.func.id
        if node.keywords:
            kw = node.keywords[0]
            label = f"'{kw.arg}='" if kw.arg else "'**'"
            raise self.error(kw, f"keyword argument {label} in {fname}() is not allowed")
        starred = next((a for a in node.args if isinstance(a, ast.Starred)), None)
        if starred is not None:
            raise self.error(starred, f"starred argument {self.source(starred)!r} is not allowed")
        lo, hi = FUNCTIONS[fname]
        if len(node.args) < lo or (hi is not None and len(node.args) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            raise self.error(node, f"{fname}() takes {want} argument(s), got {len(node.args)}")
        plans = [self.compile(a, depth + 1) for a in node.args]
        impl, fns = _CALLS[fname], [p.fn for p in plans]
        return _fold(lambda env: impl(*(f(env) for f in fns)), plans)


def _parse_tree(text: str) -> ast.Expression:
    if len(text) > MAX_FORMULA_CHARS:
        raise FusionError(f"{len(text)} characters, longer than {MAX_FORMULA_CHARS}", key="formula")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise FusionError(f"syntax error at column {e.offset or 1}: {e.msg}", key="formula") from e
    except (RecursionError, MemoryError) as e:
        raise FusionError(f"expression nested deeper than {MAX_DEPTH} levels", key="formula") from e
    _check_parentheses(text.strip())
    return tree


def _check_parentheses(text: str) -> None:
    """Redundant parentheses leave no trace in the AST; limit their nesting all the same."""
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.OP and tok.string in ("(", ")"):
            depth += 1 if tok.string == "(" else -1
            if depth > MAX_DEPTH:
                raise FusionError(
                    f"parentheses nested deeper than {MAX_DEPTH} levels "
                    f"at column {tok.start[1] + 1}",
                    key="formula",
                )


def _factor_label(compiler: _Compiler, node: ast.expr) -> str:
    text = compiler.source(node, limit=MAX_FORMULA_CHARS)
    return f"({text})" if isinstance(node, ast.BinOp) and not isinstance(node.op, ast.Pow) else text


def _reciprocal(plan: _Plan) -> _Plan:
    f = plan.fn
    return _Plan(lambda env: np.divide(1.0, f(env)))


def _result(value: Value, n: int) -> FloatArray:
    out: FloatArray = np.array(np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)))
    return out  # (n,) float64, never a view of an input


def nonfinite_mask(scores: FloatArray) -> BoolArray:
    """Items whose fused score was non-finite (see the module's numeric policy)."""
    out: BoolArray = ~np.isfinite(scores)
    return out


def sanitize_scores(raw: FloatArray) -> FloatArray:
    """Apply the final-score policy: nan, +inf and -inf all become -inf (rank last)."""
    out: FloatArray = np.where(np.isfinite(raw), raw, -np.inf)
    return out


class Formula:
    """A parsed, checked fusion formula; evaluate it over arrays as often as needed.

    Build with :meth:`parse`. ``names`` are the inputs :meth:`evaluate` needs in its ``env``;
    names bound through ``constants`` (the fusion params) are folded in at parse time.
    """

    def __init__(
        self, text: str, root: _Plan, names: frozenset[str], factors: list[tuple[str, _Plan]]
    ) -> None:
        self.text = text
        self.names = names
        self._root = root
        self._factors = factors

    @classmethod
    def parse(
        cls, text: str, allowed: Iterable[str], *, constants: Mapping[str, float] | None = None
    ) -> Formula:
        """Parse and check ``text``; names must be in ``allowed`` or bound in ``constants``."""
        return cls._build(text, frozenset(allowed), dict(constants or {}))

    @classmethod
    def _build(
        cls, text: str, allowed: frozenset[str] | None, constants: dict[str, float]
    ) -> Formula:
        tree = _parse_tree(text)
        compiler = _Compiler(text.strip(), allowed, constants)
        root = compiler.compile(tree.body, 0)
        body = tree.body
        factors: list[tuple[str, _Plan]] = []
        if isinstance(body, ast.BinOp) and isinstance(body.op, ast.Mult | ast.Div):
            seen: dict[str, int] = {}
            for op, node in _chain_parts(body):
                plan = compiler.compile(node, 1)
                label = _factor_label(compiler, node)
                if op is ast.Div:
                    label, plan = f"1 / {label}", _reciprocal(plan)
                seen[label] = seen.get(label, 0) + 1
                factors.append((label if seen[label] == 1 else f"{label} #{seen[label]}", plan))
        else:
            factors.append((compiler.text, root))
        return cls(text, root, frozenset(compiler.names), factors)

    def _inputs(self, env: Mapping[str, Any], n: int) -> dict[str, Value]:
        resolved: dict[str, Value] = {}
        for name in self.names:
            if name not in env:
                raise FusionError(f"formula input {name!r} is missing from the evaluation env")
            v = np.asarray(env[name], dtype=np.float64)
            if v.ndim == 0:
                resolved[name] = float(v)
            elif v.shape == (n,):
                resolved[name] = v
            else:
                raise FusionError(f"formula input {name!r} has shape {v.shape}, expected ({n},)")
        return resolved

    def evaluate_raw(self, env: Mapping[str, Any], n: int) -> FloatArray:
        """IEEE float64 scores (n,), non-finite values left as they are."""
        inputs = self._inputs(env, n)
        with np.errstate(all="ignore"):
            return _result(self._root.fn(inputs), n)

    def evaluate(self, env: Mapping[str, Any], n: int) -> FloatArray:
        """Final scores (n,) float64: non-finite ones are -inf (flag them with nonfinite_mask)."""
        return sanitize_scores(self.evaluate_raw(env, n))

    def factors(self, env: Mapping[str, Any], n: int) -> dict[str, FloatArray]:
        """Top-level multiplicative terms by source text, each (n,); their product is the raw score.

        A divisor ``/ x`` appears as the factor ``1 / x``; a formula that is not a product is a
        single factor named by its whole text.
        """
        inputs = self._inputs(env, n)
        with np.errstate(all="ignore"):
            return {label: _result(plan.fn(inputs), n) for label, plan in self._factors}

    def __repr__(self) -> str:
        return f"Formula({self.text!r})"


class FusionConfig(BaseModel):
    """A fusion file: the formula and its tuned parameters (bound as constants at compile)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["formula"] = "formula"  # beside ModelFusion's "model" in a ranking config
    formula: str = Field(description="fused score over model outputs, attributes and params")
    params: dict[str, FiniteFloat] = Field(default_factory=dict)

    @field_validator("formula")
    @classmethod
    def _grammar(cls, v: str) -> str:
        Formula._build(v, None, {})  # grammar and limits now; names are checked by compile()
        return v

    @field_validator("params")
    @classmethod
    def _param_names(cls, v: dict[str, float]) -> dict[str, float]:
        for name in v:
            if not name.isidentifier() or name in FUNCTIONS:
                raise ValueError(f"param name {name!r} must be an identifier, not a function name")
        return v

    def compile(self, inputs: Iterable[str]) -> Formula:
        """Check names against ``inputs`` (what the pipeline supplies) and fold in the params."""
        inputs = frozenset(inputs)
        for name in sorted(self.params):
            if name in inputs:
                raise FusionError("shadows an input of the same name", key=f"params.{name}")
        return Formula.parse(self.formula, inputs, constants=self.params)


def load_fusion_file(path: str | os.PathLike[str]) -> FusionConfig:
    """Read a fusion YAML file (``formula`` + ``params``); errors name the file and the key."""
    return load_yaml_model(
        Path(path), FusionConfig, FusionError, "fusion file",
        "a fusion file is a mapping with keys formula and params",
    )  # fmt: skip


MODEL_REF = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9][A-Za-z0-9_.-]*)?$"


class ModelFusion(BaseModel):
    """A learned fusion: an LTR version of the registry scores the same env a formula reads.

    ``model`` is ``NAME`` (the version ``current`` names when the ranking config is loaded, and
    again whenever it changes) or ``NAME@VERSION`` (pinned). The service side is
    service/fusion_model.py; training/ltr writes the versions.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["model"]
    model: str = Field(pattern=MODEL_REF, description="LTR version: NAME or NAME@VERSION")


def _fusion_type(value: Any) -> str:
    # tags in <>: yamlio leaves them out of the key path an error names
    if isinstance(value, dict):
        return f"<{value.get('type', 'formula')}>"  # a formula needs no ``type`` (older files)
    return f"<{getattr(value, 'type', 'formula')}>"


# What a scene, an arm or a shadow may name as its fusion: ``type`` tells the two apart.
FusionSpec = Annotated[
    Annotated[FusionConfig, Tag("<formula>")] | Annotated[ModelFusion, Tag("<model>")],
    Discriminator(_fusion_type),
]


def save_fusion_file(config: FusionConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``config`` in exactly the format :func:`load_fusion_file` reads, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    doc = {"formula": config.formula, "params": dict(config.params)}
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def formula_inputs(
    outputs: Mapping[str, Any],
    attrs: Any,
    rule_weight: Any,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The env a formula evaluates in: model outputs, item attributes, rule_weight, extras.

    ``attrs`` is an item record array (mtrank.snapshot layout) or a mapping of columns; the
    attributes read are those marked ``formula`` in :data:`mtrank.attributes.ITEM_ATTRIBUTES`.
    """
    env: dict[str, Any] = dict(outputs)
    env.update({name: attrs[name] for name in ITEM_ATTRIBUTES.formula_names})
    env[RULE_WEIGHT] = rule_weight
    env.update(extra or {})
    return env
