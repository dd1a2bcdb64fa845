"""The reference docs against the code: a drift in either direction fails here.

docs/api.md, docs/configuration.md and docs/training.md mark what is checkable with HTML comments:
``<!-- table: NAME -->`` before a markdown table and ``<!-- example: NAME -->`` before a fenced
block. The tests compare those tables with what the code declares or does (settings and their
defaults, metrics with types and labels, reasons, error statuses — the latter by driving the real
error handlers), and run the examples through the real parsers and models (the /rank parser, the
response models, the ranking-config and fusion-file loaders, the training config models).
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from anyio.from_thread import start_blocking_portal
from fastapi import FastAPI
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from mtrank.attributes import ITEM_ATTRIBUTES
from mtrank.cli import COMMANDS
from mtrank.fusion import (
    FUNCTIONS,
    LOG_FLOOR,
    MAX_CONST_EXPONENT,
    MAX_DEPTH,
    MAX_FORMULA_CHARS,
    load_fusion_file,
)
from service.api.schemas import ErrorBody, ModelInfo, RankRequest, RankResponse, ReadyStatus
from service.errors import RankingError, register_error_handlers
from service.metrics import STAGES, Metrics
from service.ranking_config import Condition, load_ranking_config
from service.request import QueryLimits, parse_rank_request
from service.settings import DEFAULT_RANKING_CONFIG, ENV_PREFIX, Settings
from training.config import (
    MODEL_TYPES,
    AITMConfig,
    CrossStitchConfig,
    DatasetSpec,
    DebiasConfig,
    DelayedFeedbackConfig,
    DenseColumn,
    EarlyStopping,
    EmbeddingOptimizer,
    EmbeddingRegularization,
    L2ConstrainedConfig,
    LRSchedule,
    ModelConfig,
    SparseColumn,
    TaskColumn,
    TaskWeights,
    TrainConfig,
    ValidationConfig,
    WeightingConfig,
    load_dataset_spec,
)
from training.evaluate import LOWER_IS_BETTER

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SERVICE = ROOT / "service"
CONFIGS = ROOT / "training" / "configs"
ECOMMERCE_OUTPUTS = ("ctr", "cvr", "cart", "collect", "stay")


# ---------------------------------------------------------------- reading the docs
def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def table(text: str, name: str) -> list[list[str]]:
    """Body rows (cells stripped) of the markdown table after ``<!-- table: name -->``."""
    marker = f"<!-- table: {name} -->"
    assert text.count(marker) == 1, f"expected exactly one {marker}"
    lines = text.split(marker, 1)[1].strip().splitlines()
    rows = []
    for line in lines[2:]:  # header, separator
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        rows.append([c.strip() for c in cells])
    assert rows, f"table {name} has no rows"
    return rows


def spans(cell: str) -> list[str]:
    """The `code spans` of a cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


def examples(text: str, name: str) -> list[str]:
    """Contents of the fenced blocks marked ``<!-- example: name -->`` (name may be a prefix)."""
    pattern = rf"<!-- example: ({re.escape(name)}[\w-]*) -->\s*```\w*\n(.*?)```"
    return [body for _, body in re.findall(pattern, text, flags=re.S)]


def tagged_examples(text: str, prefix: str) -> list[tuple[str, str]]:
    pattern = rf"<!-- example: ({re.escape(prefix)}[\w-]*) -->\s*```\w*\n(.*?)```"
    return re.findall(pattern, text, flags=re.S)


def service_source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(SERVICE.rglob("*.py")))


# ---------------------------------------------------------------- configuration.md: settings
def _render_default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path) and value.is_absolute():
        return str(value.relative_to(ROOT))
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def test_settings_table_lists_every_setting_with_its_default() -> None:
    rows = table(doc("configuration.md"), "settings")
    documented = {spans(r[0])[0]: r for r in rows}
    expected = {ENV_PREFIX + name.upper(): info for name, info in Settings.model_fields.items()}
    assert set(documented) == set(expected)
    for env, info in expected.items():
        default_cell = documented[env][2]
        shown = spans(default_cell)[0] if spans(default_cell) else default_cell
        assert shown == _render_default(info), f"{env}: documented default {shown!r}"
    assert DEFAULT_RANKING_CONFIG.is_file()


def test_docs_name_no_setting_that_does_not_exist() -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for name in ("api.md", "configuration.md", "training.md"):
        mentioned = set(re.findall(r"MTRANK_[A-Z_]+", doc(name)))
        assert mentioned <= known, f"{name} names unknown settings {sorted(mentioned - known)}"


# ---------------------------------------------------------------- api.md: metrics
def _exported_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    metrics = Metrics()
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = str(value._type)  # collect() would drop the label names of unused series
            name = value._name + ("_total" if kind == "counter" else "")
            out[name] = (kind, tuple(value._labelnames))
    return out


def test_metrics_table_matches_the_exported_metrics() -> None:
    rows = table(doc("api.md"), "metrics")
    documented = {spans(r[0])[0]: (r[1], tuple(spans(r[2]))) for r in rows}
    assert documented == _exported_metrics()
    stage_row = next(r for r in rows if spans(r[0])[0] == "mtrank_request_stage_seconds")
    assert set(STAGES) <= set(spans(stage_row[3]))


def test_every_metric_name_in_the_api_doc_is_exported() -> None:
    exported = set(_exported_metrics())
    suffixes = ("_bucket", "_sum", "_count")
    for name in set(re.findall(r"mtrank_[a-z_]+", doc("api.md"))):
        base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
        assert name in exported or base in exported, f"api.md names unknown metric {name}"


# ---------------------------------------------------------------- api.md: reasons
def _code_strings(pattern: str) -> set[str]:
    found = set(re.findall(pattern, service_source()))
    assert found, f"pattern {pattern!r} matches nothing in service/: update this test"
    return found


@pytest.mark.parametrize(
    ("table_name", "pattern"),
    [
        ("degraded-reasons", r'degraded\.append\("([a-z_]+)"\)'),
        ("readiness-reasons", r'reasons\.append\("([a-z_]+)"\)'),
        ("drop-reasons", r'items_dropped\.labels\(reason="([a-z_]+)"\)'),
    ],
)
def test_reason_tables_match_the_code(table_name: str, pattern: str) -> None:
    documented = {spans(r[0])[0] for r in table(doc("api.md"), table_name)}
    assert documented == _code_strings(pattern)


# ---------------------------------------------------------------- api.md: errors
def _raised_error_classes() -> list[type[RankingError]]:
    """RankingError subclasses the service raises somewhere (outside errors.py)."""
    source = "\n".join(
        p.read_text(encoding="utf-8")
        for p in sorted(SERVICE.rglob("*.py"))
        if p.name != "errors.py"
    )
    classes, todo = [], list(RankingError.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if re.search(rf"\b{cls.__name__}\(", source):
            classes.append(cls)
    return classes


def _error_counts(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["type"]: s.value
        for m in metrics.registry.collect()
        if m.name == "mtrank_errors"
        for s in m.samples
        if s.name.endswith("_total")
    }


def _observed_errors() -> set[tuple[int, str, str]]:
    """(status, body type, errors_total label) of every error the real handlers produce."""
    app = FastAPI()
    metrics = Metrics()
    register_error_handlers(app, metrics)
    classes = {cls.__name__: cls for cls in _raised_error_classes()}

    @app.get("/raise/{name}")
    async def raise_named(name: str) -> None:
        raise classes[name]("documented")

    @app.get("/validated/{n}")
    async def validated(n: int) -> int:
        return n

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("not for clients")

    calls = [("GET", f"/raise/{n}") for n in classes]
    calls += [("GET", "/validated/x"), ("GET", "/crash"), ("GET", "/nope"), ("POST", "/crash")]

    async def run() -> set[tuple[int, str, str]]:
        out = set()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://docs") as client:
            for method, url in calls:
                before = _error_counts(metrics)
                r = await client.request(method, url)
                after = _error_counts(metrics)
                (label,) = [k for k in after if after[k] != before.get(k, 0.0)]
                body = ErrorBody.model_validate(r.json())
                out.add((r.status_code, body.error.type, label))
        return out

    with start_blocking_portal() as portal:
        return portal.call(run)


def test_error_table_matches_what_the_handlers_answer() -> None:
    rows = table(doc("api.md"), "errors")
    documented = {(int(r[0]), spans(r[1])[0], spans(r[2])[0]) for r in rows}
    assert documented == _observed_errors()


def test_error_examples_are_error_bodies_with_documented_types() -> None:
    text = doc("api.md")
    rows = table(text, "errors")
    by_status: dict[int, set[str]] = {}
    for r in rows:
        by_status.setdefault(int(r[0]), set()).add(spans(r[1])[0])
    tagged = tagged_examples(text, "error-")
    statuses = {int(tag.split("-")[1]) for tag, _ in tagged if tag[6:].isdigit()}
    assert statuses == set(by_status), "one real example per documented status"
    for tag, body in tagged:
        parsed = ErrorBody.model_validate_json(body)
        if tag[6:].isdigit():
            assert parsed.error.type in by_status[int(tag[6:])], tag
        if parsed.error.field is not None:
            assert parsed.error.message.startswith(parsed.error.field), tag


# ---------------------------------------------------------------- api.md: request / response
def _limits() -> QueryLimits:
    ranking = yaml.safe_load(DEFAULT_RANKING_CONFIG.read_text(encoding="utf-8"))
    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    context = [c.name for c in ds.sparse if c.source == "context"]
    context += [c.name for c in ds.dense if c.source == "context"]
    default = Settings.model_fields["max_candidates"].default
    return QueryLimits(default, frozenset(ranking["scenes"]), frozenset(context))


def test_request_examples_pass_the_service_parser_and_the_documented_model() -> None:
    bodies = examples(doc("api.md"), "rank-request")
    assert len(bodies) >= 2
    for body in bodies:
        query = parse_rank_request(body.encode(), _limits())
        model = TypeAdapter(RankRequest).validate_json(body)
        assert query.item_ids == [c.item_id for c in model.candidates]
        assert (query.size, query.scene, query.explain) == (model.size, model.scene, model.explain)


def test_documented_defaults_of_the_request_match_the_model() -> None:
    rows = {spans(r[0])[0]: r for r in table_like_request(doc("api.md"))}
    for name, info in RankRequest.model_fields.items():
        if info.is_required():
            assert rows[name][2] == "yes", name
            continue
        shown = spans(rows[name][3])
        value = info.get_default(call_default_factory=True)
        assert shown and orjson.loads(shown[0]) == value, f"{name}: {shown}"


def table_like_request(text: str) -> list[list[str]]:
    """The request field table of POST /rank (the one whose header starts with 'field | type')."""
    start = text.index("| field | type | required | default |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip()[1:-1].split("|")])
    return rows


def test_response_examples_fit_the_response_models() -> None:
    text = doc("api.md")
    degraded = {spans(r[0])[0] for r in table(text, "degraded-reasons")}
    dropped = {spans(r[0])[0] for r in table(text, "drop-reasons")}
    ready = {spans(r[0])[0] for r in table(text, "readiness-reasons")}
    responses = examples(text, "rank-response")
    assert len(responses) >= 3
    for body in responses:
        parsed = RankResponse.model_validate_json(body)
        assert set(parsed.degraded) <= degraded
        assert {d.reason for d in parsed.dropped or []} <= dropped
        assert len(parsed.request_id) == 32
    for body in examples(text, "ready-response"):
        status = ReadyStatus.model_validate_json(body)
        assert status.ready == (not status.reasons) and set(status.reasons) <= ready
    for body in examples(text, "models-response"):
        infos = TypeAdapter(list[ModelInfo]).validate_json(body)
        assert infos and infos[0].tasks == list(ECOMMERCE_OUTPUTS)
    (reload_body,) = examples(text, "reload-response")
    reloaded = json.loads(reload_body)
    assert set(reloaded) == {"models", "model_reload", "ranking_config"}
    assert reloaded["model_reload"] in ("success", "unchanged")


# ---------------------------------------------------------------- configuration.md: ranking
def test_default_ranking_yaml_is_quoted_verbatim() -> None:
    (quoted,) = examples(doc("configuration.md"), "default-ranking-yaml")
    assert quoted == DEFAULT_RANKING_CONFIG.read_text(encoding="utf-8")


def test_ranking_config_examples_load(tmp_path: Path) -> None:
    text = doc("configuration.md")
    (fusion,) = examples(text, "fusion-file")
    fusion_path = tmp_path / "models" / "ecommerce" / "fusion.yaml"
    fusion_path.parent.mkdir(parents=True)
    fusion_path.write_text(fusion, encoding="utf-8")
    assert set(load_fusion_file(fusion_path).params) == {"alpha", "beta", "a", "b", "c"}
    configs = examples(text, "ranking-config")
    assert configs
    for body in configs:
        path = tmp_path / "ranking.yaml"
        path.write_text(body, encoding="utf-8")
        config = load_ranking_config(path, ECOMMERCE_OUTPUTS)
        assert config.formula("tuned").names <= set(ECOMMERCE_OUTPUTS) | {
            *ITEM_ATTRIBUTES.formula_names,
            "rule_weight",
        }


def test_the_experiments_example_loads(tmp_path: Path) -> None:
    """The experiment + shadow example: every key exists and every cross-reference holds (the
    versions it names are checked against real models in tests/service/test_experiments.py)."""
    (body,) = examples(doc("configuration.md"), "experiments-config")
    path = tmp_path / "ranking.yaml"
    path.write_text(body, encoding="utf-8")
    config = load_ranking_config(path, ECOMMERCE_OUTPUTS)
    assert [e.name for e in config.experiments] == ["fusion_ltr", "home_rules"]
    assert [a.bp for a in config.experiments[0].arms] == [9000, 1000]
    assert config.shadows[0].models == ["ecommerce@20261201T101500Z-1a2b"]


def test_fusion_grammar_and_limits_are_documented() -> None:
    text = doc("configuration.md")
    for fn in FUNCTIONS:
        assert f"`{fn}(" in text, fn
    assert f"{MAX_FORMULA_CHARS:,} characters" in text
    assert f"{MAX_DEPTH} levels" in text
    assert f"at most {MAX_CONST_EXPONENT:g}" in text
    assert f"max(x, {LOG_FLOOR:g})" in text
    for name in ITEM_ATTRIBUTES.formula_names:
        assert f"`{name}`" in text


def test_every_condition_op_and_attribute_is_documented() -> None:
    text = doc("configuration.md")
    ops = typing.get_args(Condition.model_fields["op"].annotation)
    assert ops
    for op in ops:
        assert f"`{op}`" in text, op
    for field in ITEM_ATTRIBUTES.rule_fields:
        assert f"| `{field}` |" in text, field
    diversity = text.split("### Diversity", 1)[1].split("###", 1)[0]
    for field in ITEM_ATTRIBUTES.integer_rule_fields:
        assert f"`{field}`" in diversity, field


# ---------------------------------------------------------------- training.md
CONFIG_MODELS: tuple[type[BaseModel], ...] = (
    DatasetSpec, SparseColumn, DenseColumn, TaskColumn, TrainConfig, ModelConfig, TaskWeights,
    WeightingConfig, EarlyStopping, DebiasConfig, AITMConfig, CrossStitchConfig,
    L2ConstrainedConfig, ValidationConfig, LRSchedule, EmbeddingRegularization,
    EmbeddingOptimizer, DelayedFeedbackConfig,
)  # fmt: skip


def test_every_config_key_and_choice_is_documented() -> None:
    prose = re.sub(r"```.*?```", "", doc("training.md"), flags=re.S)  # spans outside code blocks
    documented = set(spans(prose))
    for model in CONFIG_MODELS:
        for name, info in model.model_fields.items():
            assert name in documented, f"{model.__name__}.{name} is not documented"
            for choice in typing.get_args(info.annotation):
                if isinstance(choice, str):
                    assert choice in documented, f"{model.__name__}.{name}: {choice!r}"
    for suffix in LOWER_IS_BETTER:
        assert f"`{suffix}`" in doc("training.md")
    for model_type in MODEL_TYPES:  # model.type is a str checked against the registry
        assert f"| `{model_type}` |" in prose, f"model type {model_type!r} is not documented"


def _scalar(value: Any) -> str | None:
    if value is None:
        return "none"
    if isinstance(value, BaseModel | dict):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@pytest.mark.parametrize(
    ("table_name", "model", "column"),
    [
        ("train-config", TrainConfig, 2),
        ("model-config", ModelConfig, 1),
        ("debias-config", DebiasConfig, 1),
        ("aitm-config", AITMConfig, 1),
        ("delayed-feedback-config", DelayedFeedbackConfig, 1),
    ],
)
def test_training_defaults_match_the_config_models(
    table_name: str, model: type[BaseModel], column: int
) -> None:
    rows = {spans(r[0])[0]: r for r in table(doc("training.md"), table_name)}
    assert set(rows) == set(model.model_fields)
    for name, info in model.model_fields.items():
        if info.is_required():
            continue
        expected = _scalar(info.get_default(call_default_factory=True))
        if expected is not None:
            cell = rows[name][column]
            shown = spans(cell)[0] if spans(cell) else cell
            assert shown == expected, f"{name}: documented {shown!r}, code {expected!r}"


def test_training_config_examples_validate() -> None:
    text = doc("training.md")
    (spec_body,) = examples(text, "dataset-spec")
    DatasetSpec.model_validate(yaml.safe_load(spec_body))
    bodies = examples(text, "train-config")
    assert len(bodies) >= 2
    for body in bodies:
        data = yaml.safe_load(body)
        data["dataset"] = load_dataset_spec(CONFIGS / data["dataset"]).model_dump()
        TrainConfig.model_validate(data)


def test_walkthrough_commands_exist() -> None:
    commands = re.findall(r"^\$ mtrank ([a-z-]+)", doc("training.md"), flags=re.M)
    assert {"synth", "train", "evaluate", "export", "features", "tune-fusion", "serve"} <= set(
        commands
    )
    assert set(commands) <= set(COMMANDS)
