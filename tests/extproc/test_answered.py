"""After the answer: Envoy's access-log entries into :class:`Answered`, and what the gateway
records from them (the status the client got, timings, output tokens, the LoRA 404 signal)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client import generate_latest

from extproc.gateway import Immediate, Routed
from extproc.policies.usage import AccessLogServicer, answered
from extproc.transport.http_side import build_app
from fleet.usage_envoy import Answered
from tests.extproc.test_gateway_core import BODY, HEADERS, make


def entry(
    status: int,
    *,
    model: str = "chat",
    route: str = "chat",
    server: str = "pool",
    lora: str = "",
    upstream: str = "10.0.0.1:8000",
    details: str = "via_upstream",
    completion: int | None = None,
    prompt: int | None = None,
    first_token_us: float | None = None,
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_id = "rid-1"
    headers = {"x-gateway-model": model, "x-gateway-route": route, "x-gateway-model-server": server}
    if lora:
        headers["x-gateway-lora"] = lora
    e.request.request_headers.update(headers)
    e.response.response_code.value = status
    e.response.response_code_details = details
    if upstream:
        host, port = upstream.split(":")
        e.common_properties.upstream_remote_address.socket_address.address = host
        e.common_properties.upstream_remote_address.socket_address.port_value = int(port)
    e.common_properties.time_to_first_downstream_tx_byte.nanos = 250_000_000
    e.common_properties.time_to_last_downstream_tx_byte.seconds = 2
    e.common_properties.start_time.seconds = START_S
    e.common_properties.start_time.nanos = 500_000  # 0.5 ms past START_S
    usage: dict[str, float] = {}
    if completion is not None:
        usage["completion"] = completion
    if prompt is not None:
        usage["prompt"] = prompt
    if first_token_us is not None:
        usage["first_token_us"] = first_token_us
    if usage:
        e.common_properties.metadata.filter_metadata["matrixinfer"].update(usage)
    return e


START_S = 1_796_000_000  # the entry's start time (wall clock), seconds


def test_an_entry_reads_as_answered() -> None:
    got = answered(entry(404, lora="sql", completion=12))
    assert got == Answered(
        request_id="rid-1",
        status=404,
        details="via_upstream",
        upstream="10.0.0.1:8000",
        model="chat",
        route="chat",
        server="pool",
        lora="sql",
        first_byte=0.25,
        duration=2.0,
        completion_tokens=12,
    )
    assert answered(entry(200, upstream="")).completion_tokens is None
    # a stream: usage.lua's first-token time (wall clock, µs) against the entry's start time
    stream = answered(entry(200, completion=5, prompt=9, first_token_us=START_S * 1e6 + 300_500))
    assert stream.first_token == pytest.approx(0.3) and stream.prompt_tokens == 9
    assert answered(entry(200, completion=5)).first_token == 0.0  # not a stream


def test_stream_metrics_time_to_first_token_and_inter_token_latency() -> None:
    gw, _ = make()
    # 2 s in all, the first of 5 tokens at 0.4 s: 0.4 s per token after it
    first = START_S * 1e6 + 400_500
    gw.answered(answered(entry(200, completion=5, prompt=9, first_token_us=first)))
    assert sample(gw, "matrixinfer_gateway_time_to_first_token_seconds_count", model="chat") == 1
    ttft = sample(gw, "matrixinfer_gateway_time_to_first_token_seconds_sum", model="chat")
    assert ttft == pytest.approx(0.4)
    itl = sample(gw, "matrixinfer_gateway_inter_token_latency_seconds_sum", model="chat")
    assert itl == pytest.approx(0.4)
    assert sample(gw, "matrixinfer_gateway_input_tokens_total", model="chat") == 9
    assert sample(gw, "matrixinfer_gateway_output_tokens_total", model="chat") == 5
    # a JSON answer: tokens, no first token, no inter-token latency
    gw.answered(answered(entry(200, completion=3, prompt=4)))
    assert sample(gw, "matrixinfer_gateway_time_to_first_token_seconds_count", model="chat") == 1
    assert sample(gw, "matrixinfer_gateway_inter_token_latency_seconds_count", model="chat") == 1
    assert sample(gw, "matrixinfer_gateway_input_tokens_total", model="chat") == 13
    # a stream cut before its usage event: its first token counts, no tokens
    gw.answered(answered(entry(200, first_token_us=START_S * 1e6 + 100_500)))
    assert sample(gw, "matrixinfer_gateway_time_to_first_token_seconds_count", model="chat") == 2
    assert sample(gw, "matrixinfer_gateway_inter_token_latency_seconds_count", model="chat") == 1
    assert sample(gw, "matrixinfer_gateway_output_tokens_total", model="chat") == 8


def sample(gw: Any, name: str, **labels: str) -> float | None:
    value: float | None = gw.metrics.registry.get_sample_value(name, labels)
    return value


def test_the_counter_records_the_status_the_client_got() -> None:
    gw, _ = make()
    gw.answered(answered(entry(404)))
    labels = {"model": "chat", "route": "chat", "server": "pool"}
    assert sample(gw, "matrixinfer_gateway_requests_total", **labels, code="404") == 1
    assert sample(gw, "matrixinfer_gateway_requests_total", **labels, code="200") is None
    gw.answered(answered(entry(200, completion=10)))
    assert sample(gw, "matrixinfer_gateway_requests_total", **labels, code="200") == 1
    assert sample(gw, "matrixinfer_gateway_output_tokens_total", model="chat") == 10
    assert sample(gw, "matrixinfer_gateway_output_tokens_per_second_sum", model="chat") == 5.0
    assert sample(gw, "matrixinfer_gateway_time_to_first_byte_seconds_sum", model="chat") == 0.5


def test_the_gateways_own_answers_count_once() -> None:
    gw, _ = make()
    _, answer = gw.start({**HEADERS, ":path": "/v1/nope"}, end_of_stream=False)
    assert isinstance(answer, Immediate) and answer.status == 404
    assert answer.headers["x-request-id"] == "r1"
    own = entry(404, model="", route="", server="", details="matrixinfer_gateway_404")
    gw.answered(answered(own))
    labels = {"model": "", "route": "", "server": ""}
    assert sample(gw, "matrixinfer_gateway_requests_total", **labels, code="404") == 1


def test_names_the_configuration_does_not_know_are_not_labels() -> None:
    gw, _ = make()
    gw.answered(answered(entry(503, model="forged", route="forged", server="forged")))
    gw.answered(answered(entry(200, route="elsewhere")))  # a route that does not serve "chat"
    text = generate_latest(gw.metrics.registry).decode()
    assert '"forged"' not in text and '"elsewhere"' not in text
    empty = {"model": "", "route": "", "server": ""}
    assert sample(gw, "matrixinfer_gateway_requests_total", **empty, code="503") == 1


def test_an_engine_404_for_a_lora_request_rereads_the_pods_adapters() -> None:
    gw, _ = make()
    missing: list[str] = []
    gw.on_lora_missing.append(missing.append)
    gw.answered(answered(entry(404)))  # no adapter: not a LoRA signal
    gw.answered(answered(entry(500, lora="sql")))  # not a 404
    assert missing == []
    gw.answered(answered(entry(404, lora="sql", upstream="10.0.0.2:8000")))
    assert missing == ["p2"]


async def test_the_servicer_hands_every_entry_over_without_policies() -> None:
    got: list[Answered] = []
    servicer = AccessLogServicer(None, got.append)
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend([entry(200), entry(404)])

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield msg

    await servicer.StreamAccessLogs(stream(), None)
    assert [a.status for a in got] == [200, 404]


async def test_the_routing_decision_is_logged_with_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw, _ = make()
    with caplog.at_level(logging.DEBUG, logger="matrixinfer.extproc"):
        state, _ = gw.start(HEADERS, end_of_stream=False)
        routed = await gw.decide(state, BODY)
    assert isinstance(routed, Routed)
    (record,) = [r for r in caplog.records if "routed" in r.getMessage()]
    assert record.request_id == "r1" and record.pod == routed.pod.name  # type: ignore[attr-defined]
    assert "ModelServer pool" in record.getMessage() and "model chat" in record.getMessage()


def test_debug_state_is_opt_in() -> None:
    def paths(**kw: Any) -> set[str]:
        app = build_app(gw.metrics.registry, dict, lambda: (True, "ready"), **kw)
        return {r.canonical for r in app.router.resources()}

    gw, _ = make()
    assert "/debug/state" not in paths()
    assert "/debug/state" in paths(debug_state=True)
    assert {"/metrics", "/healthz", "/readyz"} <= paths()


def test_one_model_and_the_engine_endpoints() -> None:
    gw, _ = make()
    _, answer = gw.start({":method": "GET", ":path": "/v1/models/chat"}, end_of_stream=True)
    assert isinstance(answer, Immediate) and answer.status == 200
    assert orjson.loads(answer.body) == {
        "id": "chat", "object": "model", "created": 0, "owned_by": "matrixinfer",
    }  # fmt: skip
    for model in ("lonely", "nope"):  # no ready pod serves "lonely": not listed, not served
        _, answer = gw.start({":method": "GET", ":path": f"/v1/models/{model}"}, True)
        assert answer is not None and answer.status == 404
        assert orjson.loads(answer.body)["error"]["code"] == "model_not_found"


def test_the_extproc_wires_the_lora_signal_to_its_scraper(tmp_path: Path) -> None:
    from extproc.main import ExtProcApp, parse_args

    app = ExtProcApp(parse_args(["--config", str(tmp_path)]))
    app._start_scraper()
    assert app.gateway.on_lora_missing == [app.scraper.refresh_loras]
    servicer = app.access_log_servicer()
    assert servicer.on_answer == app.gateway.answered and servicer.ledger is None
