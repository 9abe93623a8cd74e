"""The chart's ``tracing`` values (docs/gateway.md "Tracing"): off by default; a collector turns on
Envoy's tracer (matrixinfer-xds flags through the controllers) and the extproc's spans (--tracing
and the OTEL_* environment), every flag parsed by the programs' own parsers."""

from __future__ import annotations

from typing import Any

import pytest

from controllers.main import parse_args as controllers_args
from controllers.xds.main import parse_args as xds_args
from extproc.main import parse_args as extproc_args

from .chart import objects, render

TRACING = {
    "tracing": {
        "collector": "otel-collector.observability:4317",
        "sampling": 10,
        "extprocEnv": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"},
    }
}


def _containers(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for obj in objects(values):
        if obj["kind"] == "Deployment":
            for c in obj["spec"]["template"]["spec"]["containers"]:
                out[c["command"][0]] = c
    return out


def test_tracing_is_off_by_default() -> None:
    containers = _containers({})
    extproc = containers["matrixinfer-extproc"]
    assert not extproc_args(extproc["command"][1:]).tracing and "env" not in extproc
    xds = xds_args(["--source", "kubernetes", *controllers_args(
        containers["matrixinfer-controllers"]["command"][1:]).xds_args])  # fmt: skip
    assert xds.tracing_collector == ""


def test_a_collector_traces_envoy_and_the_extproc() -> None:
    containers = _containers(TRACING)
    extproc = containers["matrixinfer-extproc"]
    assert extproc_args(extproc["command"][1:]).tracing
    assert {e["name"]: e["value"] for e in extproc["env"]} == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    }
    config = controllers_args(containers["matrixinfer-controllers"]["command"][1:])
    xds = xds_args(["--source", "kubernetes", *config.xds_args])
    assert xds.tracing_collector == "otel-collector.observability:4317"
    assert xds.tracing_sampling == 10


def test_schema_refuses_a_collector_without_a_port() -> None:
    with pytest.raises(Exception, match="collector"):
        render({"tracing": {"collector": "otel-collector"}})
