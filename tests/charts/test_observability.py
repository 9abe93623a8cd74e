"""Dashboards and alerts: valid Grafana JSON and Prometheus rules (promtool check + unit tests),
and every metric they use exists in a registry of the code (started in-process) or among the
engine metrics the simulator serves (vLLM's and SGLang's names)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from controllers.metrics import ControllerMetrics
from controllers.xds.server import XdsMetrics
from extproc.metrics import GatewayMetrics
from extproc.policies.enforce import PolicyMetrics
from extproc.policies.token_estimate import EstimateMetrics
from extproc.scraper import MetricsScraper
from sim.config import SimConfig
from sim.metrics import render as render_engine_metrics
from sim.server import SimServer

from .chart import CHART, objects

DASHBOARDS = sorted((CHART / "files" / "dashboards").glob("*.json"))
ALERTS = CHART / "files" / "alerts.yaml"
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}


def _sample_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
    return names


def known_metrics() -> set[str]:
    registry = CollectorRegistry()
    PolicyMetrics(registry)
    EstimateMetrics(registry)
    MetricsScraper(lambda: [], lambda _name, _metrics: None, registry=registry)
    names = _sample_names(registry)
    names |= _sample_names(GatewayMetrics().registry)
    names |= _sample_names(ControllerMetrics().registry)
    names |= _sample_names(XdsMetrics().registry)
    for kind in ("vllm", "sglang"):
        server = SimServer(SimConfig(engine_kind=kind))
        text = render_engine_metrics(server.registry).decode()
        names |= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return names


_METRIC = re.compile(r"\b((?:matrixinfer|vllm|sglang)[a-z_:]*[a-z_])\b")


def used_metrics(exprs: Iterable[str]) -> set[str]:
    return {m for e in exprs for m in _METRIC.findall(e)}


def dashboard_exprs() -> list[str]:
    return [
        t["expr"]
        for path in DASHBOARDS
        for panel in json.loads(path.read_text())["panels"]
        for t in panel["targets"]
    ]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_known_metrics_come_from_the_registries() -> None:
    known = known_metrics()
    assert "matrixinfer_gateway_requests_total" in known
    assert "matrixinfer_controller_reconcile_errors_total" in known
    assert "vllm:kv_cache_usage_perc" in known
    assert "sglang:num_queue_reqs" in known
    assert "matrixinfer_no_such_metric" not in known


@pytest.mark.parametrize("source", ["dashboards", "alerts"])
def test_every_metric_used_exists(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboards" else rule_exprs()
    used = used_metrics(exprs)
    assert used, "no metric found: the pattern is broken"
    missing = sorted(used - known_metrics())
    assert not missing, f"{source} use metrics no registry has: {missing}"


def test_dashboards_are_grafana_json() -> None:
    assert {p.stem for p in DASHBOARDS} == {"gateway", "fleet", "control-plane"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["title"].startswith("MatrixInfer / ")
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            assert panel["type"] and panel["title"] and panel["targets"], panel
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
            for target in panel["targets"]:
                assert target["refId"] and target["expr"]
    assert len(uids) == len(DASHBOARDS)


def test_dashboards_ship_as_sidecar_configmaps() -> None:
    maps = [
        o for o in objects({}) if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]
    ]
    assert len(maps) == len(DASHBOARDS)
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (text,) = cm["data"].values()
        json.loads(text)


def test_prometheus_rule_embeds_the_alerts_file() -> None:
    objs = objects({"metrics": {"prometheusRule": {"enabled": True}}})
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: make system-deps installs Debian's prometheus package")
    return path


def test_promtool_checks_the_rules(promtool: str) -> None:
    out = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_fire_the_alerts(promtool: str) -> None:
    out = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"],
        cwd=ALERTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alerts_the_install_promises() -> None:
    """docs/install.md lists these; the promtool unit tests fire each of them."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    names = {r["alert"] for g in groups for r in g["rules"]}
    assert names >= {
        "MatrixInferExtprocDown",
        "MatrixInferGatewayErrorRate",
        "MatrixInferQueueTimeouts",
        "MatrixInferScrapeFailures",
        "MatrixInferReconcileErrors",
        "MatrixInferWebhookErrors",
        "MatrixInferWebhookSlow",
        "MatrixInferWebhookUnreachable",
        "MatrixInferAutoscalerAtMax",
        "MatrixInferConsoleDown",
    }
    tested = yaml.safe_load((ALERTS.parent / "alerts_test.yaml").read_text())["tests"]
    fired = {
        t["alertname"] for block in tested for t in block["alert_rule_test"] if t["exp_alerts"]
    }
    assert fired >= names - {"MatrixInferXdsRejected", "MatrixInferScrapeFailures"}, names - fired
    # the one series from outside the code's registries is the API server's own
    foreign = {
        m
        for e in rule_exprs()
        for m in re.findall(r"\b([a-z_]+)\s*(?:\{|\[)", e)
        if not m.startswith(("matrixinfer_", "vllm", "sglang"))
    }
    assert foreign <= {"up", "apiserver_admission_webhook_rejection_count"}, foreign


def test_console_is_scraped_when_enabled() -> None:
    values = {"metrics": {"serviceMonitor": {"enabled": True}}, "console": {"enabled": True}}
    monitors = {o["metadata"]["name"] for o in objects(values) if o["kind"] == "ServiceMonitor"}
    assert "mi-matrixinfer-console" in monitors
    off = {"metrics": {"serviceMonitor": {"enabled": True}}}
    assert "mi-matrixinfer-console" not in {
        o["metadata"]["name"] for o in objects(off) if o["kind"] == "ServiceMonitor"
    }
