"""A deployment's figures from Prometheus (``--prometheus URL``): instant queries over its HTTP API,
summed over every gateway replica. The Prometheus here is a tiny stand-in served by the test: it
answers the queries it knows (written out by hand below, as an operator would type them) with
the values of two gateway replicas, and anything else with Prometheus's own error answer."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import pytest

from console.metrics import PrometheusAnswerError, query_value
from tests.console.conftest import Console

# two gateway replicas: chat got 8 + 4 requests, 1 + 2 of them refused (429, 503)
ANSWERS: dict[str, float] = {
    'sum(matrixinfer_gateway_requests_total{model="chat"})': 12.0,
    'sum(matrixinfer_gateway_requests_total{model="chat",code!~"[1-3][0-9][0-9]"})': 3.0,
    'sum(matrixinfer_gateway_time_to_first_token_seconds_sum{model="chat"}) / '
    'sum(matrixinfer_gateway_time_to_first_token_seconds_count{model="chat"})': 0.125,
    'sum(matrixinfer_gateway_output_tokens_total{model="chat"})': 900.0,
    'sum(matrixinfer_gateway_output_tokens_per_second_sum{model="chat"}) / '
    'sum(matrixinfer_gateway_output_tokens_per_second_count{model="chat"})': 48.5,
    # a model nobody asked yet: no series (an empty vector), a mean of nothing (NaN)
    'sum(matrixinfer_gateway_requests_total{model="idle"})': math.inf,
    'sum(matrixinfer_gateway_requests_total{model="idle",code!~"[1-3][0-9][0-9]"})': math.inf,
    'sum(matrixinfer_gateway_time_to_first_token_seconds_sum{model="idle"}) / '
    'sum(matrixinfer_gateway_time_to_first_token_seconds_count{model="idle"})': math.nan,
    'sum(matrixinfer_gateway_output_tokens_total{model="idle"})': math.inf,
    'sum(matrixinfer_gateway_output_tokens_per_second_sum{model="idle"}) / '
    'sum(matrixinfer_gateway_output_tokens_per_second_count{model="idle"})': math.nan,
}


def _vector(value: float) -> dict[str, Any]:
    if math.isinf(value):  # stands for "no series"
        return {"status": "success", "data": {"resultType": "vector", "result": []}}
    sample = {"metric": {}, "value": [1700000000.0, "NaN" if math.isnan(value) else str(value)]}
    return {"status": "success", "data": {"resultType": "vector", "result": [sample]}}


@pytest.fixture
async def prometheus() -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []

    async def query(request: aiohttp.web.Request) -> aiohttp.web.Response:
        q = request.query.get("query", "")
        seen.append(q)
        if q not in ANSWERS:
            return aiohttp.web.json_response(
                {"status": "error", "errorType": "bad_data", "error": f"unknown query {q}"},
                status=400,
            )
        return aiohttp.web.json_response(_vector(ANSWERS[q]))

    app = aiohttp.web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/", seen
    finally:
        await runner.cleanup()


@pytest.fixture
def console_extra(prometheus: tuple[str, list[str]]) -> dict[str, Any]:
    # both sources configured: Prometheus wins (the gateway's URL here answers nothing)
    return {"prometheus_url": prometheus[0], "gateway_metrics_url": "http://127.0.0.1:9/metrics"}


async def test_figures_from_prometheus_instant_queries(
    console: Console, prometheus: tuple[str, list[str]]
) -> None:
    status, body = await console.call("GET", "/api/deployments/chat/metrics")
    assert status == 200, body
    assert body == {
        "model": "chat",
        "requests": 12.0,
        "errors": 3.0,
        "ttftSecondsMean": 0.125,
        "outputTokens": 900.0,
        "outputTokensPerSecondMean": 48.5,
    }
    assert sorted(prometheus[1]) == sorted(q for q in ANSWERS if '"chat"' in q)


async def test_no_series_yet_is_zero_and_no_mean(console: Console) -> None:
    status, body = await console.call("GET", "/api/deployments/idle/metrics")
    assert status == 200, body
    assert body["requests"] == 0 and body["outputTokens"] == 0
    assert body["ttftSecondsMean"] is None and body["outputTokensPerSecondMean"] is None


async def test_a_refused_query_is_a_502_naming_it(console: Console) -> None:
    status, body = await console.call("GET", "/api/deployments/other/metrics")
    assert status == 502
    message = body["error"]["message"]
    assert "sum(matrixinfer_gateway_" in message and 'model="other"' in message
    assert "unknown query" in message


async def test_an_unreachable_prometheus_is_a_502(console: Console) -> None:
    console.cfg.prometheus_url = "http://127.0.0.1:9"
    status, body = await console.call("GET", "/api/deployments/chat/metrics")
    assert status == 502
    assert "Prometheus at http://127.0.0.1:9 unreachable" in body["error"]["message"]


def test_query_value_reads_scalars_and_single_samples() -> None:
    assert query_value({"status": "success", "data": {"resultType": "scalar",
                                                      "result": [1.0, "2.5"]}}) == 2.5  # fmt: skip
    assert query_value(_vector(7.0)) == 7.0
    assert query_value(_vector(math.nan)) is None
    assert query_value(_vector(math.inf)) is None
    two = _vector(1.0)
    two["data"]["result"] *= 2
    with pytest.raises(PrometheusAnswerError, match="a vector of 2 samples"):
        query_value(two)
    with pytest.raises(PrometheusAnswerError, match="resultType 'matrix'"):
        query_value({"status": "success", "data": {"resultType": "matrix", "result": []}})
    with pytest.raises(PrometheusAnswerError, match="the query failed: parse error"):
        query_value({"status": "error", "error": "parse error"})
