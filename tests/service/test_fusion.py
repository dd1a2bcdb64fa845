"""Fusion formulas: grammar whitelist, exact vectorised values, numeric policy, fusion files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mtrank.fusion import (
    DEFAULT_FORMULA,
    DEFAULT_PARAMS,
    LOG_FLOOR,
    Formula,
    FusionConfig,
    FusionError,
    load_fusion_file,
    nonfinite_mask,
    save_fusion_file,
)

INPUTS = frozenset({"ctr", "cvr", "price", "stay", "cart", "collect", "rule_weight", "x", "y"})


def env_of(**cols: Any) -> dict[str, Any]:
    return {
        k: np.asarray(v, dtype=np.float64) if isinstance(v, list) else v for k, v in cols.items()
    }


# ---------------------------------------------------------------- exact values
X = np.array([0.5, 2.0, 3.0, 0.25])
Y = np.array([4.0, 0.5, -1.0, 8.0])
VALUES = [
    ("x + y", X + Y),
    ("x - y - 1", X - Y - 1),
    ("x - (y - 1)", X - (Y - 1)),
    ("x * y / 2", X * Y / 2),
    ("x / y * 2", X / Y * 2),
    ("-x ** 2", -(X**2)),
    ("(-x) ** 2", X**2),
    ("x ** y", X**Y),
    ("2 ** 3 ** 2", np.full(4, 512.0)),
    ("+x", X),
    ("min(x, y)", np.minimum(X, Y)),
    ("max(x, y, 1)", np.maximum(np.maximum(X, Y), 1)),
    ("clip(y, 0, 1)", np.clip(Y, 0, 1)),
    ("log(x)", np.log(X)),
    ("exp(x) - 1", np.exp(X) - 1),
    ("x * 1e-3 + 7", X * 1e-3 + 7),
    ("3", np.full(4, 3.0)),
]


@pytest.mark.parametrize(("text", "expected"), VALUES, ids=[v[0] for v in VALUES])
def test_formula_values(text: str, expected: np.ndarray) -> None:
    got = Formula.parse(text, INPUTS).evaluate_raw({"x": X, "y": Y}, 4)
    assert got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-15)


def default_reference(env: dict[str, np.ndarray], p: dict[str, float]) -> np.ndarray:
    return (
        env["ctr"]
        * (p["alpha"] + env["cvr"])
        * (p["beta"] + env["price"])
        * env["stay"] ** p["a"]
        * env["cart"] ** p["b"]
        * env["collect"] ** p["c"]
        * env["rule_weight"]
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0, 2),
    beta=st.floats(0, 10),
    a=st.floats(-2, 2),
)
def test_default_formula_matches_numpy(
    n: int, seed: int, alpha: float, beta: float, a: float
) -> None:
    rng = np.random.default_rng(seed)
    names = ["ctr", "cvr", "price", "stay", "cart", "collect", "rule_weight"]
    env = {k: rng.uniform(0.01, 5.0, n) for k in names}
    params = {**DEFAULT_PARAMS, "alpha": alpha, "beta": beta, "a": a}
    f = FusionConfig(formula=DEFAULT_FORMULA, params=params).compile(names)
    assert f.names == frozenset(names)  # params are folded in, not inputs
    np.testing.assert_allclose(f.evaluate(env, n), default_reference(env, params), rtol=1e-12)


# Random formulas from the grammar, rendered to text and evaluated by a direct numpy reference.
_LEAVES = st.one_of(st.sampled_from(["x", "y"]), st.floats(0.1, 9.0).map(lambda v: f"{v:.3f}"))


def _extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "/"]), inner, inner),
        st.tuples(st.just("neg"), inner),
        st.tuples(st.sampled_from(["min", "max"]), inner, inner),
        st.tuples(st.sampled_from(["log", "exp"]), inner),
        st.tuples(st.just("clip"), inner, inner, inner),
    )


def render(t: Any) -> str:
    if isinstance(t, str):
        return t
    op, *args = t
    parts = [render(a) for a in args]
    if op in "+-*/":
        return f"({parts[0]} {op} {parts[1]})"
    if op == "neg":
        return f"(-{parts[0]})"
    return f"{op}({', '.join(parts)})"


def reference(t: Any, env: dict[str, np.ndarray]) -> Any:
    if isinstance(t, str):
        return env[t] if t in env else float(t)
    op, *args = t
    v = [reference(a, env) for a in args]
    fns = {
        "+": lambda: v[0] + v[1],
        "-": lambda: v[0] - v[1],
        "*": lambda: v[0] * v[1],
        "/": lambda: np.divide(v[0], v[1]),
        "neg": lambda: -v[0],
        "min": lambda: np.minimum(v[0], v[1]),
        "max": lambda: np.maximum(v[0], v[1]),
        "log": lambda: np.log(np.maximum(v[0], LOG_FLOOR)),
        "exp": lambda: np.exp(v[0]),
        "clip": lambda: np.minimum(np.maximum(v[0], v[1]), v[2]),
    }
    return fns[op]()


@settings(max_examples=150, deadline=None)
@given(tree=st.recursive(_LEAVES, _extend, max_leaves=12), seed=st.integers(0, 1000))
def test_random_formulas_match_reference(tree: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    env = {"x": rng.normal(0, 3, 8), "y": rng.uniform(-2, 2, 8)}
    text = render(tree)
    with np.errstate(all="ignore"):
        want = np.broadcast_to(np.asarray(reference(tree, env), dtype=np.float64), (8,))
    got = Formula.parse(text, {"x", "y"}).evaluate_raw(env, 8)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, equal_nan=True, err_msg=text)


# ---------------------------------------------------------------- factors
def test_factors_of_default_formula_are_named_by_source() -> None:
    f = FusionConfig(formula=DEFAULT_FORMULA, params=DEFAULT_PARAMS).compile(INPUTS)
    env = {k: np.array([0.5, 2.0]) for k in INPUTS}
    factors = f.factors(env, 2)
    assert list(factors) == [
        "ctr",
        "(alpha + cvr)",
        "(beta + price)",
        "stay ** a",
        "cart ** b",
        "collect ** c",
        "rule_weight",
    ]
    np.testing.assert_allclose(factors["(alpha + cvr)"], 0.1 + env["cvr"])
    np.testing.assert_allclose(factors["stay ** a"], env["stay"] ** 0.3)


@settings(max_examples=60, deadline=None)
@given(
    text=st.sampled_from(
        [
            DEFAULT_FORMULA,
            "x * y / (x + 1) * 3",
            "x / y / 2",
            "x * x * y",
            "(x * y) * log(y)",
            "x + y",
            "clip(x, 0, 1)",
        ]
    ),
    cols=hnp.arrays(np.float64, (2, 6), elements=st.floats(0.05, 20.0)),
)
def test_factors_multiply_back_to_the_score(text: str, cols: np.ndarray) -> None:
    f = Formula.parse(text, INPUTS, constants=DEFAULT_PARAMS)
    env = {k: cols[i % 2] for i, k in enumerate(sorted(INPUTS))}
    factors = f.factors(env, 6)
    assert len(set(factors)) == len(factors)
    product = np.prod(np.stack(list(factors.values())), axis=0)
    np.testing.assert_allclose(product, f.evaluate_raw(env, 6), rtol=1e-12)


def test_factor_labels_repeat_and_divide() -> None:
    f = Formula.parse("x * x / y", INPUTS)
    factors = f.factors({"x": np.array([2.0]), "y": np.array([4.0])}, 1)
    assert factors == {"x": pytest.approx([2.0]), "x #2": pytest.approx([2.0]), "1 / y": [0.25]}


# ---------------------------------------------------------------- rejections
REJECTED = [
    ("x.__class__", "__class__"),
    ("().__class__", "__class__"),
    ("x.__class__.__bases__[0]", "__bases__"),
    ("open('x')", "'open'"),
    ("__import__('os')", "'__import__'"),
    ("getattr(x, 'y')", "'getattr'"),
    ("x.real(1)", "'x.real'"),
    ("(lambda: 1)()", "lambda"),
    ("lambda: 1", "lambda"),
    ("2 ** 1000", "'1000'"),
    ("x ** -65", "-65"),
    ("x ** (8 * 9)", "'8 * 9'"),
    ("2 ** 2 ** 2 ** 2 ** 2", "exponent"),
    ("x if y else 1", "conditional expression 'x if y else 1'"),
    ("x[0]", "subscript 'x[0]'"),
    ("[x for x in y]", "comprehension"),
    ("sum(v for v in x)", "'sum'"),
    ("clip(x, lo=0, hi=1)", "'lo='"),
    ("min(*x)", "starred argument '*x'"),
    ("max(x, **y)", "'**'"),
    ("'abc'", "'abc'"),
    ("b'x' + x", "b'x'"),
    ("True * x", "'True'"),
    ("None", "'None'"),
    ("1j * x", "'1j'"),
    ("1e999 * x", "'1e999'"),
    ("x < 1", "comparison 'x < 1'"),
    ("x and y", "boolean operator"),
    ("x // 2", "'//'"),
    ("x % 2", "'%'"),
    ("~x", "'~'"),
    ("not x", "'not'"),
    ("(x, y)", "tuple"),
    ("(x := 1)", "assignment expression"),
    ("f'{x}'", "f-string"),
    ("log(x, 2)", "log() takes exactly 1"),
    ("clip(x, 1)", "clip() takes exactly 3"),
    ("max(x)", "max() takes at least 2"),
    ("foo + 1", "unknown name 'foo'"),
    ("x + __builtins__", "unknown name '__builtins__'"),
    ("x +", "syntax error"),
    ("", "syntax error"),
    ("x; y", "syntax error"),
]


@pytest.mark.parametrize(("text", "needle"), REJECTED, ids=[r[0] or "empty" for r in REJECTED])
def test_rejected_at_parse_with_the_token_named(text: str, needle: str) -> None:
    with pytest.raises(FusionError) as info:
        Formula.parse(text, INPUTS)
    assert needle in str(info.value)
    assert info.value.key == "formula"
    assert isinstance(info.value, ValueError)


def test_error_gives_the_position() -> None:
    with pytest.raises(FusionError, match=r"unknown name 'nope' .* at column 12"):
        Formula.parse("ctr * (1 + nope)", INPUTS)
    with pytest.raises(FusionError, match="at column 7"):
        Formula.parse("ctr * x.__class__", INPUTS)


def test_size_and_depth_limits() -> None:
    with pytest.raises(FusionError, match="longer than 2000"):
        Formula.parse("x + " * 500 + "x", INPUTS)
    with pytest.raises(FusionError, match="nested deeper than 32"):
        Formula.parse("log(" * 33 + "x" + ")" * 33, INPUTS)
    with pytest.raises(FusionError, match="nested deeper than 32 levels near 'x' at column 34"):
        Formula.parse("-" * 33 + "x", INPUTS)
    with pytest.raises(FusionError, match="expression nested deeper than 32"):
        Formula.parse("x" + " ** x" * 40, INPUTS)
    with pytest.raises(FusionError, match="parentheses nested deeper than 32"):
        Formula.parse("(" * 40 + "x" + ")" * 40, INPUTS)
    # A long flat chain is one level, and evaluates without recursion trouble.
    flat = Formula.parse(" + ".join(["x"] * 450), INPUTS)
    np.testing.assert_allclose(flat.evaluate({"x": np.ones(2)}, 2), [450.0, 450.0])
    Formula.parse("log(" * 32 + "x" + ")" * 32, INPUTS)  # within the limit
    Formula.parse("-" * 32 + "x", INPUTS)


def test_constant_exponent_limit_applies_to_bound_params() -> None:
    ok = FusionConfig(formula="stay ** a", params={"a": 64.0}).compile({"stay"})
    assert ok.evaluate({"stay": np.array([1.0])}, 1) == pytest.approx([1.0])
    with pytest.raises(FusionError, match="exponent 'a' = 100"):
        FusionConfig(formula="stay ** a", params={"a": 100.0}).compile({"stay"})


# ---------------------------------------------------------------- numeric policy
def test_log_of_non_positive_uses_the_floor() -> None:
    got = Formula.parse("log(x)", INPUTS).evaluate({"x": np.array([0.0, -5.0, 1.0])}, 3)
    np.testing.assert_allclose(got, [np.log(1e-12), np.log(1e-12), 0.0])


def test_negative_base_is_clipped_before_a_fractional_power() -> None:
    f = Formula.parse("x ** y", INPUTS)
    got = f.evaluate_raw(
        {"x": np.array([-8.0, -2.0, -2.0, 4.0]), "y": np.array([0.5, 2, 3, 0.5])}, 4
    )
    np.testing.assert_array_equal(got, [0.0, 4.0, -8.0, 2.0])


def test_non_finite_scores_rank_last_and_are_flagged() -> None:
    f = Formula.parse("x / y", INPUTS)
    env = {"x": np.array([1.0, 0.0, -1.0, 1.0, np.nan]), "y": np.array([0.0, 0.0, 0.0, 2.0, 1.0])}
    raw = f.evaluate_raw(env, 5)
    assert np.isposinf(raw[0]) and np.isnan(raw[1]) and np.isneginf(raw[2])
    scores = f.evaluate(env, 5)
    np.testing.assert_array_equal(scores, [-np.inf, -np.inf, -np.inf, 0.5, -np.inf])
    np.testing.assert_array_equal(nonfinite_mask(raw), [True, True, True, False, True])
    overflow = Formula.parse("exp(x) * 10", INPUTS).evaluate({"x": np.array([1000.0, 0.0])}, 2)
    np.testing.assert_array_equal(overflow, [-np.inf, 10.0])


def test_scalars_broadcast_and_results_do_not_alias_inputs() -> None:
    x = np.array([1.0, 2.0, 3.0])
    f = Formula.parse("x", INPUTS)
    out = f.evaluate({"x": x}, 3)
    out[0] = 99.0
    assert x[0] == 1.0
    np.testing.assert_array_equal(
        Formula.parse("x * y", INPUTS).evaluate({"x": x, "y": 2.0}, 3), 2 * x
    )
    np.testing.assert_array_equal(Formula.parse("2 * 3", INPUTS).evaluate({}, 2), [6.0, 6.0])
    f32 = Formula.parse("x", INPUTS).evaluate({"x": np.array([0.1], dtype=np.float32)}, 1)
    assert f32.dtype == np.float64


def test_evaluate_checks_inputs() -> None:
    f = Formula.parse("x * y", INPUTS)
    with pytest.raises(FusionError, match="'y' is missing"):
        f.evaluate({"x": np.ones(2)}, 2)
    with pytest.raises(FusionError, match=r"'y' has shape \(3,\), expected \(2,\)"):
        f.evaluate({"x": np.ones(2), "y": np.ones(3)}, 2)


# ---------------------------------------------------------------- FusionConfig and files
def test_param_shadowing_an_input_is_an_error() -> None:
    with pytest.raises(FusionError) as info:
        FusionConfig(formula="ctr * 2", params={"ctr": 1.0}).compile({"ctr"})
    assert info.value.key == "params.ctr"


def test_fusion_file_round_trip(tmp_path: Path) -> None:
    cfg = FusionConfig(formula=DEFAULT_FORMULA, params=DEFAULT_PARAMS)
    path = save_fusion_file(cfg, tmp_path / "sub" / "fusion.yaml")
    assert load_fusion_file(path) == cfg
    assert not (tmp_path / "sub" / "fusion.yaml.tmp").exists()


FILE_ERRORS = [
    ("formula: x\nparams: {a: 1}\nextra: 2\n", "extra: unknown key"),
    ("params: {a: 1}\n", "formula: required key is missing"),
    ("formula: x.__class__\n", "formula: attribute access"),
    ("formula: x\nparams: {a: .inf}\n", "params.a"),
    ("formula: x\nparams: {a: one}\n", "params.a"),
    ("formula: x\nparams: {log: 1}\n", "params: param name 'log'"),
    ("formula: x\nformula: y\n", "'formula' appears twice"),
    ("- x\n", "a fusion file is a mapping"),
    ("formula: [x\n", "cannot read fusion file"),
]


@pytest.mark.parametrize(("text", "needle"), FILE_ERRORS)
def test_fusion_file_errors_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "fusion.yaml"
    path.write_text(text)
    with pytest.raises(FusionError) as info:
        load_fusion_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert needle in str(info.value)


def test_missing_fusion_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FusionError, match="nope.yaml: cannot read"):
        load_fusion_file(tmp_path / "nope.yaml")
