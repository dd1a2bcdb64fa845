"""PromQL expressions of the deployment configs, pulled out for checks against the service.

The Grafana dashboard and the Prometheus alert rules name the service's metrics by hand; nothing
links them to the code that exports those metrics. These helpers extract every expression so
tests can (a) check each one parses, (b) check each metric it names is one the service exports
(:data:`SERVICE_METRICS`, the fixed contract) and (c) run them against a live Prometheus that
scrapes a real service and assert they return data.

Grafana macros (``$__rate_interval`` ...) are not PromQL; :func:`dashboard_queries` replaces them
with plain durations by default so the expressions can be sent to Prometheus as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

# name -> type, as the service exports them (the fixed list of the service contract).
SERVICE_METRICS: Mapping[str, str] = {
    "mtrank_requests_total": "counter",
    "mtrank_request_stage_seconds": "histogram",
    "mtrank_request_candidates": "histogram",
    "mtrank_feature_lookups_total": "counter",
    "mtrank_feature_misses_total": "counter",
    "mtrank_degraded_responses_total": "counter",
    "mtrank_items_dropped_total": "counter",
    "mtrank_exposures_uncounted_total": "counter",
    "mtrank_rule_effects_total": "counter",
    "mtrank_model_info": "gauge",
    "mtrank_model_reloads_total": "counter",
    "mtrank_recall_reloads_total": "counter",
    "mtrank_errors_total": "counter",
    "mtrank_feature_store_up": "gauge",
    "mtrank_feature_snapshot_age_seconds": "gauge",
    "mtrank_feature_snapshot_max_age_seconds": "gauge",
    "mtrank_arm_requests_total": "counter",
    "mtrank_arm_request_seconds": "histogram",
    "mtrank_arm_degraded_responses_total": "counter",
    "mtrank_arm_served_score": "histogram",
    "mtrank_shadow_runs_total": "counter",
    "mtrank_shadow_seconds": "histogram",
    "mtrank_shadow_kendall_tau": "histogram",
    "mtrank_shadow_topk_overlap": "histogram",
    "mtrank_shadow_score": "histogram",
    "mtrank_shadow_output_shift": "histogram",
    "mtrank_events_total": "counter",
    "mtrank_events_orphaned_total": "counter",
    "mtrank_served_log_rows_total": "counter",
}

# Grafana's interval macros, with values a 10 s scrape interval makes safe (>= 4 scrapes).
GRAFANA_MACROS: Mapping[str, str] = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# A metric name that starts with the service's prefix; not preceded by a name character, so
# label values such as job="mtrank" and longer names are not matched by accident.
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])mtrank_[a-z_]+")
# String literals (label values, regexes) are not metric names: blanked before the scan.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def expand_macros(expr: str, macros: Mapping[str, str] = GRAFANA_MACROS) -> str:
    """Replace Grafana macros by durations; longest names first (``$__range`` vs ``$__rate...``)."""
    for name in sorted(macros, key=len, reverse=True):
        expr = expr.replace(name, macros[name])
    return expr


def dashboard_queries(path: Path | str, *, raw: bool = False) -> list[tuple[str, str]]:
    """``(panel title, expression)`` for every query target of every panel, in panel order.

    With ``raw=False`` (default) Grafana macros are expanded so each expression is plain PromQL.
    A panel with several targets appears once per target; hidden targets are included (they
    still run).
    """
    dashboard = json.loads(Path(path).read_text())
    out: list[tuple[str, str]] = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = str(target.get("expr", "")).strip()
            if expr:
                out.append((str(panel.get("title", "")), expr if raw else expand_macros(expr)))
    return out


def alert_exprs(path: Path | str) -> list[tuple[str, str]]:
    """``(alert name, expression)`` for every alerting rule of a Prometheus rules file."""
    doc = yaml.safe_load(Path(path).read_text())
    out: list[tuple[str, str]] = []
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            if "alert" in rule:
                out.append((str(rule["alert"]), str(rule["expr"]).strip()))
    return out


def metric_references(expr: str) -> list[str]:
    """Every ``mtrank_*`` name as written in ``expr`` (suffixes kept), in order of appearance."""
    return _METRIC.findall(_STRING.sub('""', expr))


def base_name(name: str) -> str:
    """The family name of a series name: ``x_bucket`` / ``x_sum`` / ``x_count`` -> ``x``."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def metric_names(expr: str) -> set[str]:
    """The metric families ``expr`` reads, with histogram series suffixes removed."""
    return {base_name(name) for name in metric_references(expr)}
