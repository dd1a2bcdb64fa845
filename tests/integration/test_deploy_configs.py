"""Deployment configs checked with the real tools, without a Docker engine.

CI has no Docker daemon, but it installs Debian's ``docker-compose`` (which validates and renders
a compose file offline) and ``prometheus`` (``promtool``). So: compose renders with and without
overrides and wires what the services need; Prometheus config, alert rules and their unit tests
pass promtool; every dashboard query and alert expression parses and names only metrics the
service exports; the Dockerfiles install what they should, run as non-root, and their health
check and entry-point scripts behave as intended when run here.

A missing tool FAILS the test with a message (never skips): CI installs both, so a missing one
means the environment is broken, not that the check does not apply.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.support.promql import (
    HISTOGRAM_SUFFIXES,
    SERVICE_METRICS,
    alert_exprs,
    base_name,
    dashboard_queries,
    metric_names,
    metric_references,
)

pytestmark = pytest.mark.integration

Service = dict[str, Any]  # one service of `docker-compose config`, as YAML gives it

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROM_DIR = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "mtrank.json"
GRAFANA_PROV = ROOT / "docker" / "grafana" / "provisioning"
SERVICE_DF = ROOT / "docker" / "service.Dockerfile"
TRAIN_DF = ROOT / "docker" / "train.Dockerfile"
ENTRYPOINTS = ROOT / "docker" / "entrypoints"
OVERRIDABLE = ("MTRANK_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT", "GRAFANA_ADMIN_PASSWORD")
REQUIRED_ALERTS = {
    "MtrankHighErrorRate",
    "MtrankLatencyP99OverBudget",
    "MtrankDegradedResponses",
    "MtrankModelReloadFailed",
    "MtrankFeatureStoreDown",
    "MtrankNoModelLoaded",
    "MtrankFeatureSnapshotStale",
}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH. CI installs it (.ci/run); locally: "
            f"apt-get install -y {package}",
            pytrace=False,
        )
    return path


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (
        f"{shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
    )
    return proc.stdout


# -- docker-compose ------------------------------------------------------------------------------
def compose_config(tmp_path: Path, overrides: dict[str, str], quiet: bool = False) -> str:
    """``docker-compose config`` with an empty env file: a developer's .env cannot leak in."""
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDABLE and k != "MTRANK_WORKERS"}
    env.update(overrides)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    cmd = [tool("docker-compose", "docker-compose"), "--env-file", str(empty), "-f", str(COMPOSE)]
    return run([*cmd, "config", *(["-q"] if quiet else [])], env=env)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Service]:
    out = compose_config(tmp_path_factory.mktemp("compose"), {})
    services: dict[str, Service] = yaml.safe_load(out)["services"]
    return services


def published(service: Service) -> dict[int, int]:
    """container port -> host port, from compose's rendered long syntax."""
    return {int(p["target"]): int(p["published"]) for p in service["ports"]}


def volumes(service: Service) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only), from either rendered syntax (compose v1 or v2)."""
    out = {}
    for v in service["volumes"]:
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = (source, mode == ["ro"])
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only", False)))
    return out


def test_compose_validates_with_and_without_overrides(tmp_path: Path) -> None:
    compose_config(tmp_path, {}, quiet=True)
    overrides = {
        "MTRANK_PORT": "18080",
        "PROMETHEUS_PORT": "19090",
        "GRAFANA_PORT": "13000",
        "GRAFANA_ADMIN_PASSWORD": "not-the-default",
        "MTRANK_WORKERS": "4",
    }
    compose_config(tmp_path, overrides, quiet=True)
    services = yaml.safe_load(compose_config(tmp_path, overrides))["services"]
    assert published(services["ranker"]) == {8000: 18080}
    assert published(services["prometheus"]) == {9090: 19090}
    assert published(services["grafana"]) == {3000: 13000}
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "not-the-default"
    assert services["ranker"]["environment"]["MTRANK_WORKERS"] == "4"


def test_compose_defaults_and_start_order(compose: dict[str, Service]) -> None:
    assert set(compose) == {"redis", "trainer", "features", "ranker", "prometheus", "grafana"}
    assert published(compose["ranker"]) == {8000: 8000}
    assert published(compose["prometheus"]) == {9090: 9090}
    assert compose["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "admin"
    assert compose["redis"]["image"] == "redis:7-alpine"
    assert compose["features"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "trainer": {"condition": "service_completed_successfully"},
    }
    assert compose["ranker"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "features": {"condition": "service_completed_successfully"},
    }
    env = compose["ranker"]["environment"]
    assert env["MTRANK_REDIS_URL"] == "redis://redis:6379/0"
    # The loader and the service must agree on the Redis key namespace.
    features_cmd = compose["features"]["command"]
    ns = features_cmd[features_cmd.index("--namespace") + 1]
    assert ns == env["MTRANK_FEATURE_NAMESPACE"]
    assert "redis://redis:6379/0" in features_cmd
    # One registry volume: written by the trainer, read-only for the service.
    assert volumes(compose["trainer"])["/app/models"] == ("models", False)
    assert volumes(compose["ranker"])["/app/models"] == ("models", True)


def test_compose_mounts_match_the_config_files(compose: dict[str, Service]) -> None:
    def mounts(name: str) -> dict[str, str]:  # container path -> host path, bind mounts only
        return {t: src for t, (src, _) in volumes(compose[name]).items() if src.startswith("/")}

    prom = mounts("prometheus")
    assert Path(prom["/etc/prometheus/prometheus.yml"]) == PROM_DIR / "prometheus.yml"
    # rule_files are relative to the config file: the rules must sit beside it in the container.
    rules = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["rule_files"]
    for rule_file in rules:
        assert Path(prom[f"/etc/prometheus/{rule_file}"]) == PROM_DIR / rule_file
    redis_cmd = compose["redis"]["command"]
    assert Path(mounts("redis")[redis_cmd[-1]]) == ROOT / "docker/redis/redis.conf"
    provider = yaml.safe_load((GRAFANA_PROV / "dashboards" / "mtrank.yml").read_text())
    graf = mounts("grafana")
    assert Path(graf[provider["providers"][0]["options"]["path"]]) == DASHBOARD.parent
    assert Path(graf["/etc/grafana/provisioning"]) == GRAFANA_PROV
    # The metrics dir of the image is a tmpfs, so worker files never outlive the container.
    tmpfs = [t.split(":")[0] for t in compose["ranker"]["tmpfs"]]
    assert final_stage(SERVICE_DF).env["PROMETHEUS_MULTIPROC_DIR"] in tmpfs


def test_redis_conf_never_evicts_counters(tmp_path: Path) -> None:
    """The shipped redis.conf, loaded by a real redis-server: policy noeviction, memory bounded."""
    server = tool("redis-server", "redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = ROOT / "docker" / "redis" / "redis.conf"
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    proc = subprocess.Popen([server, str(conf), *args], stdout=subprocess.PIPE, text=True)
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:  # a bad directive: redis-server exits at once
                pytest.fail(f"redis-server rejected {conf}:\n{proc.communicate()[0]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(str(client.config_get("maxmemory")["maxmemory"])) > 0
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=10)


# -- Prometheus ----------------------------------------------------------------------------------
def test_promtool_checks_config_and_rules() -> None:
    promtool = tool("promtool", "prometheus")
    assert "SUCCESS" in run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")])
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    n_rules = sum(len(g["rules"]) for g in rules["groups"])
    assert n_rules >= 10  # the 8 ranking alerts and the 2 recall ones at least
    assert f"SUCCESS: {n_rules} rules found" in run(
        [promtool, "check", "rules", str(PROM_DIR / "alerts.yml")]
    )


def test_alert_unit_tests_pass() -> None:
    """alerts_test.yml: error-rate, feature-store-down, stale-snapshot and no-model alerts fire
    when, and only when, they should (promtool fails on a missing or an extra alert)."""
    promtool = tool("promtool", "prometheus")
    assert "SUCCESS" in run([promtool, "test", "rules", str(PROM_DIR / "alerts_test.yml")])


def test_alert_set_and_budgets() -> None:
    exprs = dict(alert_exprs(PROM_DIR / "alerts.yml"))
    assert REQUIRED_ALERTS <= set(exprs)
    flat = {name: " ".join(e.split()) for name, e in exprs.items()}
    assert flat["MtrankLatencyP99OverBudget"] == (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(mtrank_request_stage_seconds_bucket{stage="total"}[5m]))) > 0.05'
    )
    assert flat["MtrankHighErrorRate"].endswith("> 0.01")
    assert flat["MtrankNoModelLoaded"].startswith("absent(mtrank_model_info")
    # The limit is the service's own setting, exported beside the age, not a number in the rule.
    assert flat["MtrankFeatureSnapshotStale"] == (
        "mtrank_feature_snapshot_age_seconds > mtrank_feature_snapshot_max_age_seconds"
    )


def test_prometheus_scrapes_the_ranker_port(compose: dict[str, Service]) -> None:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mtrank")
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["ranker"] and "ranker" in compose
    assert job["metrics_path"] == "/metrics"
    container_port = next(iter(published(compose["ranker"])))
    assert sd["port"] == container_port == int(final_stage(SERVICE_DF).env["MTRANK_PORT"])


# -- dashboard and PromQL ------------------------------------------------------------------------
def all_exprs() -> list[tuple[str, str]]:
    return dashboard_queries(DASHBOARD) + alert_exprs(PROM_DIR / "alerts.yml")


def promtool_parses(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Each expression as a recording rule: `promtool check rules` runs the real PromQL parser."""
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse", "rules": rules}]}))
    cmd = [tool("promtool", "prometheus"), "check", "rules", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_every_query_and_alert_expression_parses(tmp_path: Path) -> None:
    exprs = [e for _, e in all_exprs()]
    proc = promtool_parses(exprs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout
    # The check itself can fail: one broken expression among good ones is reported.
    broken = promtool_parses([*exprs, "sum(rate(mtrank_requests_total[5m])"], tmp_path)
    assert broken.returncode != 0


def test_dashboard_panels_have_queries_on_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    prov = yaml.safe_load((GRAFANA_PROV / "datasources" / "prometheus.yml").read_text())
    uid = prov["datasources"][0]["uid"]
    assert prov["datasources"][0]["url"] == "http://prometheus:9090"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 9
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        assert panel["targets"], f"panel {title!r} has no query"
        for target in panel["targets"]:
            assert str(target.get("expr", "")).strip(), f"panel {title!r}: empty query"
            assert target["datasource"]["uid"] == uid, title


def test_queries_name_only_exported_metrics_and_cover_them_all() -> None:
    used: set[str] = set()
    for where, expr in all_exprs():
        names = metric_names(expr)
        unknown = names - set(SERVICE_METRICS) - {"up"}
        assert not unknown, f"{where}: unknown metric(s) {sorted(unknown)} in {expr}"
        used |= names
    dashboard_used = set().union(*(metric_names(e) for _, e in dashboard_queries(DASHBOARD)))
    assert dashboard_used == set(SERVICE_METRICS), sorted(set(SERVICE_METRICS) - dashboard_used)


def test_metrics_are_used_as_their_type_allows() -> None:
    """Histograms only through their series (_bucket/_sum/_count); counters only in a range."""
    for where, expr in all_exprs():
        for ref in metric_references(expr):
            kind = SERVICE_METRICS[base_name(ref)]
            if kind == "histogram":
                assert ref.endswith(HISTOGRAM_SUFFIXES), f"{where}: bare histogram {ref}"
            if kind == "counter":
                pattern = re.escape(ref) + r"(\{[^}]*\})?\[[^\]]+\]"
                assert re.search(pattern, expr), f"{where}: counter {ref} outside rate/increase"


def test_promql_helpers() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(mtrank_request_stage_seconds_bucket"
        '{job="mtrank", x="mtrank_not_a_metric"}[5m]))) / on() mtrank_feature_store_up'
    )
    assert metric_names(expr) == {"mtrank_request_stage_seconds", "mtrank_feature_store_up"}
    queries = dashboard_queries(DASHBOARD)
    assert all("$__" not in e for _, e in queries)
    assert any("$__rate_interval" in e for _, e in dashboard_queries(DASHBOARD, raw=True))


# -- Dockerfiles ---------------------------------------------------------------------------------
@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def args(self, name: str) -> list[str]:
        return [a for op, a in self.instructions if op == name]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for entry in logical:
        op, _, rest = entry.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            image = rest.split()[0]
            stages.append(Stage(re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], image)))
        elif not stages and op == "ARG":
            key, _, default = rest.partition("=")
            global_args[key] = default
        elif stages:
            stages[-1].instructions.append((op, rest))
            if op == "ENV":
                pairs = (kv.partition("=") for kv in shlex.split(rest))
                stages[-1].env.update((key, value) for key, _, value in pairs)
    return global_args, stages


def final_stage(path: Path) -> Stage:
    return parse_dockerfile(path)[1][-1]


def pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` in the stage's RUN instructions."""
    out = []
    for run_line in stage.args("RUN"):
        lexer = shlex.shlex(run_line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in {";", "&&", "||", "|"}:
                if command[:1] and command[0].endswith("pip") and command[1:2] == ["install"]:
                    out.append(command[2:])
                command = []
            else:
                command.append(word)
    return out


def copied_scripts(stage: Stage) -> dict[str, str]:
    """command name -> repository path, for files the stage copies into /usr/local/bin (on PATH)."""
    out = {}
    for copy in stage.args("COPY"):
        *sources, dest = copy.split()
        if dest.startswith("/usr/local/bin/") and not sources[0].startswith("--"):
            out[dest.removeprefix("/usr/local/bin/")] = sources[0]
    return out


def assert_non_root(stage: Stage) -> None:
    users = stage.args("USER")
    assert users, "the final stage sets no USER: it would run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]


def test_service_image_installs_only_the_serve_extra() -> None:
    _, stages = parse_dockerfile(SERVICE_DF)
    assert len(stages) >= 2, "multi-stage: build and runtime"
    assert stages[-1].base == "python:3.11-slim"
    installs = [args for stage in stages for args in pip_installs(stage)]
    assert installs, "no pip install found"
    extras = {e for args in installs for a in args for e in re.findall(r"\[([\w,-]+)\]", a)}
    assert extras == {"serve"}, extras
    for args in installs:
        assert not any(re.search(r"torch|\[.*train", a) for a in args), args


def test_service_image_runtime_settings() -> None:
    stage = final_stage(SERVICE_DF)
    assert_non_root(stage)
    for key in ("MTRANK_WORKERS", "MTRANK_ORT_INTRA_THREADS", "PROMETHEUS_MULTIPROC_DIR"):
        assert stage.env.get(key), f"ENV {key} missing from the runtime stage"
    assert stage.env["MTRANK_HOST"] == "0.0.0.0", "must listen beyond the container's loopback"
    (entrypoint,) = (json.loads(e) for e in stage.args("ENTRYPOINT"))
    script = ROOT / copied_scripts(stage)[entrypoint[0]]
    assert re.search(r"^exec mtrank serve \"\$@\"$", script.read_text(), re.M)


def test_service_settings_accept_the_image_and_compose_environment(
    compose: dict[str, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every MTRANK_* variable the image and compose set is a setting and validates. Settings
    ignores unknown variables, so a renamed setting would otherwise be dropped without a word."""
    from service.settings import load_settings

    for key in [k for k in os.environ if k.startswith("MTRANK_")]:
        monkeypatch.delenv(key)
    image_env = {k: v for k, v in final_stage(SERVICE_DF).env.items() if k.startswith("MTRANK_")}
    env = {**image_env, **compose["ranker"]["environment"]}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings()
    for key, value in env.items():
        field_name = key.removeprefix("MTRANK_").lower()
        actual = getattr(settings, field_name)
        expected = [value] if isinstance(actual, list) else value
        assert str(actual) == str(expected), key


@pytest.fixture()
def healthz_server() -> Iterator[tuple[int, list[int]]]:
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_service_healthcheck_probes_healthz(healthz_server: tuple[int, list[int]]) -> None:
    """The image's HEALTHCHECK command, run here: healthy on 200, unhealthy on 503 or no server."""
    (check,) = final_stage(SERVICE_DF).args("HEALTHCHECK")
    match = re.search(r"\bCMD\s+(\[.*\])$", check)
    assert match, f"HEALTHCHECK must use the exec form: {check}"
    argv = json.loads(match[1])
    assert argv[0] == "python" and not {"curl", "wget"} & set(" ".join(argv).split())
    argv[0] = sys.executable
    port, status = healthz_server

    def probe(at: int) -> int:
        env = {**os.environ, "MTRANK_PORT": str(at)}
        return subprocess.run(argv, env=env, capture_output=True, timeout=10).returncode

    assert probe(port) == 0
    status[0] = 503
    assert probe(port) != 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert probe(closed) != 0


def stub_mtrank(bin_dir: Path, log: Path, train_writes: str | None) -> dict[str, str]:
    """An `mtrank` on PATH that records its argv (and writes a checkpoint on `train`)."""
    bin_dir.mkdir()
    ckpt = f'mkdir -p "$(dirname {train_writes})"; : > {train_writes}' if train_writes else ":"
    stub = bin_dir / "mtrank"
    stub.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\nif [ "$1" = train ]; then sleep 1; {ckpt}; fi\n'
    )
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_serve_entrypoint_clears_stale_metric_files(tmp_path: Path) -> None:
    log = tmp_path / "argv.log"
    env = stub_mtrank(tmp_path / "bin", log, None)
    metrics = tmp_path / "metrics"
    (metrics / "old").mkdir(parents=True)
    (metrics / "counter_123.db").write_bytes(b"stale")
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    run(["sh", str(ENTRYPOINTS / "serve.sh"), "--log-level", "debug"], env=env)
    assert list(metrics.iterdir()) == []
    assert log.read_text() == "serve --log-level debug\n"


def test_train_pipeline_runs_the_steps_in_order_once(tmp_path: Path) -> None:
    log = tmp_path / "argv.log"
    env = stub_mtrank(tmp_path / "bin", log, "runs/exp/best.pt")
    work = tmp_path / "app"
    work.mkdir()
    script = str(ENTRYPOINTS / "train-pipeline.sh")
    run(["sh", script], env=env, cwd=work)
    assert log.read_text().splitlines() == [
        "synth ecommerce --out data/ecommerce --impressions 200000 --seed 7",
        "train --config training/configs/ecommerce_mmoe.yaml",
        "export --checkpoint runs/exp/best.pt --name ecommerce --root models",
        "features --root models build --model ecommerce "
        "--users data/ecommerce/users.parquet --items data/ecommerce/items.parquet",
    ]
    # Once the registry serves a version with a snapshot, a second run does nothing.
    (work / "models/ecommerce/snapshots").mkdir(parents=True)
    (work / "models/ecommerce/snapshots/s1.npz").write_bytes(b"x")
    (work / "models/ecommerce/current").write_text("v1\n")
    log.unlink()
    run(["sh", script], env=env, cwd=work)
    assert not log.exists()


def test_train_pipeline_fails_without_a_checkpoint(tmp_path: Path) -> None:
    env = stub_mtrank(tmp_path / "bin", tmp_path / "argv.log", None)
    proc = subprocess.run(
        ["sh", str(ENTRYPOINTS / "train-pipeline.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "no checkpoint" in proc.stderr
    assert "export" not in (tmp_path / "argv.log").read_text()


def test_train_image_pins_the_cpu_torch_of_pyproject(compose: dict[str, Service]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["optional-dependencies"]["train"] if "torch" in d]
    stage = final_stage(TRAIN_DF)
    assert stage.base == "python:3.11-slim"
    args = dict(a.partition("=")[::2] for a in stage.args("ARG"))
    assert pin == f"torch=={args['TORCH_VERSION']}"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    installs = pip_installs(stage)
    assert ["--index-url", "${TORCH_INDEX_URL}", "torch==${TORCH_VERSION}"] in installs
    assert [".[train]"] in installs
    assert_non_root(stage)
    trainer_cmd = compose["trainer"]["command"][0]
    assert copied_scripts(stage)[trainer_cmd] == "docker/entrypoints/train-pipeline.sh"


def test_dockerignore_keeps_sources_and_drops_artefacts() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch(pre, pat) or (pat.startswith("**/") and fnmatch(parts[-1], pat[3:]))
            for pat in patterns
            for pre in prefixes
        )

    for path in (
        ".venv/bin/python",
        "data/ecommerce/items.csv",
        "runs/exp/metrics.json",
        "models/ecommerce/v1/spec.json",
        ".git/HEAD",
        ".mypy_cache/x",
        "service/__pycache__/a.pyc",
        "m.onnx",
    ):
        assert ignored(path), path
    for path in ("training/models/mmoe.py", "training/data.py", "service/config/ranking.yaml"):
        assert not ignored(path), path
    for dockerfile in (SERVICE_DF, TRAIN_DF):
        for copy in final_stage(dockerfile).args("COPY") + parse_dockerfile(dockerfile)[1][0].args(
            "COPY"
        ):
            if "--from" not in copy:
                for source in copy.split()[:-1]:
                    assert not ignored(source), (
                        f"{dockerfile.name} copies {source}, .dockerignore drops it"
                    )
