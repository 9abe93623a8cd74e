"""What the console takes from the gateway: the chat relay (server-sent events passed on as they
come) and a deployment's figures from the gateway's /metrics. The gateway here is a small aiohttp
server speaking the OpenAI streaming format and Prometheus text."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import pytest

from tests.console.conftest import VIEWER, Console

METRICS = """# TYPE matrixinfer_gateway_requests counter
matrixinfer_gateway_requests_total{model="chat",route="r",server="s",code="200"} 8.0
matrixinfer_gateway_requests_total{model="chat",route="r",server="s",code="429"} 2.0
matrixinfer_gateway_requests_total{model="other",route="r",server="s",code="200"} 5.0
# TYPE matrixinfer_gateway_time_to_first_byte_seconds histogram
matrixinfer_gateway_time_to_first_byte_seconds_bucket{model="chat",le="+Inf"} 8.0
matrixinfer_gateway_time_to_first_byte_seconds_sum{model="chat"} 2.0
matrixinfer_gateway_time_to_first_byte_seconds_count{model="chat"} 8.0
# TYPE matrixinfer_gateway_output_tokens counter
matrixinfer_gateway_output_tokens_total{model="chat"} 400.0
# TYPE matrixinfer_gateway_output_tokens_per_second histogram
matrixinfer_gateway_output_tokens_per_second_bucket{model="chat",le="+Inf"} 4.0
matrixinfer_gateway_output_tokens_per_second_sum{model="chat"} 100.0
matrixinfer_gateway_output_tokens_per_second_count{model="chat"} 4.0
"""


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def completions(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        seen.append(await request.json())
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("Hello", " there"):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def metrics(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text=METRICS)

    app = aiohttp.web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/metrics", metrics)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@pytest.fixture
def console_extra(gateway: tuple[str, list[dict[str, Any]]]) -> dict[str, Any]:
    url, _ = gateway
    return {"gateway_url": url, "gateway_metrics_url": url + "/metrics"}


async def test_chat_streams_through_the_gateway(
    console: Console, gateway: tuple[str, list[dict[str, Any]]]
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    status, text = await console.call("POST", "/api/deployments/chat/chat", json=body)
    assert status == 200
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]) == (
        "Hello there"
    )
    _, seen = gateway
    assert seen == [
        {
            "model": "chat",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 5,
        }
    ]


async def test_metrics_of_a_deployment(console: Console) -> None:
    status, m = await console.call("GET", "/api/deployments/chat/metrics", token=VIEWER)
    assert status == 200
    assert m == {
        "model": "chat",
        "requests": 10.0,
        "errors": 2.0,
        "ttft_seconds_mean": 0.25,
        "output_tokens": 400.0,
        "output_tokens_per_second_mean": 25.0,
    }
