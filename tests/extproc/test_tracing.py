"""Tracing without Envoy: the stage spans (an in-memory exporter), where their parent comes from,
nothing traced (nor the SDK imported) when off, and the Envoy config the generator writes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from controllers.xds.generate import (
    CLUSTER,
    LISTENER_TYPE,
    OTEL_CLUSTER,
    GatewaySettings,
    XdsInputs,
    generate,
    static_bootstrap,
)
from extproc.gateway import Routed
from extproc.tracing import Tracing, TracingError, setup
from tests.extproc.helpers import config
from tests.extproc.test_gateway_core import BODY, HEADERS, make

TRACE = "0af7651916cd43dd8448eb211c80319c"
ENVOY_SPAN = "b7ad6b7169203331"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exported() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider.get_tracer("test"), provider), exporter
    provider.shutdown()


def _parent(span: ReadableSpan) -> tuple[str, str]:
    assert span.parent is not None
    return f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}"


async def test_each_stage_is_a_child_of_envoys_span_from_the_stream_metadata(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    gw, _ = make()
    gw.tracing = tracing
    metadata = [("traceparent", f"00-{TRACE}-{ENVOY_SPAN}-01"), ("x-envoy-internal", "true")]
    client = {**HEADERS, "traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}  # the client's: not used
    state, early = gw.start(client, False, metadata=metadata)
    assert early is None
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {
        f"matrixinfer.{stage}" for stage in ("authenticate", "parse", "route", "admit", "schedule")
    }
    assert {_parent(s) for s in spans.values()} == {(TRACE, ENVOY_SPAN)}
    schedule = spans["matrixinfer.schedule"].attributes or {}
    assert schedule["matrixinfer.request_id"] == "r1"
    assert schedule["matrixinfer.model"] == "chat"
    assert schedule["matrixinfer.model_route"] == "chat"
    assert schedule["matrixinfer.model_server"] == "pool"
    assert schedule["matrixinfer.pod"] == decision.pod.name


async def test_without_envoys_context_the_clients_traceparent_is_the_parent(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    gw, _ = make()
    gw.tracing = tracing
    state, _ = gw.start({**HEADERS, "traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}, False)
    await gw.decide(state, BODY)
    assert {_parent(s) for s in exporter.get_finished_spans()} == {(TRACE, CLIENT_SPAN)}


async def test_a_refusing_stage_ends_its_span_with_the_reason(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    gw, _ = make()
    gw.tracing = tracing
    state, _ = gw.start(HEADERS, False)
    body = orjson.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    answer = await gw.decide(state, body)
    assert not isinstance(answer, Routed) and answer.status == 404
    route = next(s for s in exporter.get_finished_spans() if s.name == "matrixinfer.route")
    assert route.status.status_code is StatusCode.ERROR
    assert "nope" in (route.status.description or "")
    assert (route.attributes or {})["http.response.status_code"] == 404
    assert route.parent is None  # no context anywhere: a new trace


async def test_off_nothing_is_traced() -> None:
    gw, _ = make()
    assert gw.tracing is None
    state, _ = gw.start({**HEADERS, "traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"}, False)
    assert state.trace is None
    assert isinstance(await gw.decide(state, BODY), Routed)


def test_off_the_sdk_is_never_imported() -> None:
    code = (
        "import sys, extproc.main, extproc.transport.grpc_servicer\n"
        "extproc.main.parse_args(['--config', '/nonexistent'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_only_otlp_over_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    with pytest.raises(TracingError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/protobuf'"):
        setup()


def _hcm(resources: dict[str, dict[str, dict[str, object]]]) -> dict[str, object]:
    listener: dict[str, object] = resources[LISTENER_TYPE]["openai"]
    hcm: dict[str, object] = listener["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[index]
    return hcm


def test_the_generator_traces_only_with_a_collector() -> None:
    inputs = XdsInputs(extproc_endpoints=["10.1.0.1:9002"])
    off = generate(GatewaySettings(), inputs)
    assert "tracing" not in _hcm(off) and OTEL_CLUSTER not in off[CLUSTER]
    on = generate(
        GatewaySettings(tracing_collector="otel-collector.observability:4317", tracing_sampling=5),
        inputs,
    )
    tracing = _hcm(on)["tracing"]
    assert tracing == {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"},
                "service_name": "matrixinfer-gateway",
            },
        },
        "random_sampling": {"value": 5},
        "spawn_upstream_span": True,
    }
    collector = on[CLUSTER][OTEL_CLUSTER]
    assert collector["type"] == "STRICT_DNS"
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "otel-collector.observability",
        "port_value": 4317,
    }
    bootstrap = static_bootstrap(
        GatewaySettings(tracing_collector="127.0.0.1:4317"), inputs, admin_port=1, eds_path="/e"
    )
    names = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert OTEL_CLUSTER in names


def test_bad_tracing_settings_are_named() -> None:
    inputs = XdsInputs(extproc_endpoints=["10.1.0.1:9002"])
    with pytest.raises(ValueError, match="tracing_sampling must be a percentage"):
        generate(GatewaySettings(tracing_collector="c:4317", tracing_sampling=150), inputs)
    with pytest.raises(ValueError, match="'collector' is not host:port"):
        generate(GatewaySettings(tracing_collector="collector"), inputs)


async def test_a_wait_for_a_ready_pod_is_the_wake_span_then_the_schedule(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    from tests.extproc import test_wake

    tracing, exporter = exported
    gw, ds = test_wake.make([])
    gw.tracing = tracing
    task = asyncio.create_task(test_wake.decide(gw))
    await test_wake.until(lambda: test_wake.waiting(gw, ds) == 1.0, "the request waiting")
    ds.apply(config(test_wake.text(), [test_wake.POD]))
    assert isinstance(await asyncio.wait_for(task, 10), Routed)
    spans = exporter.get_finished_spans()
    names = [s.name.removeprefix("matrixinfer.") for s in spans]
    assert names == ["authenticate", "parse", "route", "admit", "wake", "schedule"]
    wake, schedule = spans[4], spans[5]
    assert wake.end_time is not None and schedule.start_time is not None
    assert wake.end_time <= schedule.start_time  # one stage after the other
    assert wake.status.status_code is StatusCode.UNSET


async def test_a_wake_that_times_out_ends_its_span_with_the_503(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    from tests.extproc import test_wake

    tracing, exporter = exported
    gw, _ = test_wake.make([], queue="  queue: {maxWait: 100ms}\n")
    gw.tracing = tracing
    answer = await test_wake.decide(gw)
    assert not isinstance(answer, Routed) and answer.status == 503
    wake = exporter.get_finished_spans()[-1]
    assert wake.name == "matrixinfer.wake" and wake.status.status_code is StatusCode.ERROR
    assert (wake.attributes or {})["http.response.status_code"] == 503


async def test_a_queued_request_has_a_queue_span_and_no_schedule_span(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    from tests.extproc.test_gateway_core import RecordedStages

    tracing, exporter = exported
    gw, _ = make()
    gw.tracing = tracing
    gw.policy_stages = RecordedStages([], wait=True)  # others wait: the request queues
    state, _ = gw.start(HEADERS, False)
    assert isinstance(await gw.decide(state, BODY), Routed)
    spans = exporter.get_finished_spans()
    assert [s.name.removeprefix("matrixinfer.") for s in spans] == [
        "authenticate", "parse", "route", "admit", "queue"
    ]  # fmt: skip
    assert (spans[-1].attributes or {})["matrixinfer.pod"]  # the pick that ended the wait


async def test_a_request_envoy_did_not_sample_gets_no_spans_at_all(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = exported
    assert tracing.follows_parent  # the SDK's default sampler: parentbased_always_on
    gw, _ = make()
    gw.tracing = tracing
    state, _ = gw.start(HEADERS, False, metadata=[("traceparent", f"00-{TRACE}-{ENVOY_SPAN}-00")])
    assert state.trace is None  # nothing to record: no span objects either
    assert isinstance(await gw.decide(state, BODY), Routed)
    assert not exporter.get_finished_spans()
    sampled, _ = gw.start(HEADERS, False, metadata=[("traceparent", f"00-{TRACE}-{ENVOY_SPAN}-01")])
    assert sampled.trace is not None
