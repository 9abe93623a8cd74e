"""What the console takes from the gateway: the chat relay (server-sent events passed on as they
come) and a deployment's figures from the gateway's /metrics; and the Hugging Face search. The
gateway (and hub) here is a small aiohttp server speaking the OpenAI streaming format, Prometheus
text and the hub's /api/models."""

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

    async def hub_search(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(dict(request.query))
        q = request.query["search"]
        return aiohttp.web.json_response(
            [{"id": f"someone/{q}-finetune", "downloads": 12, "likes": 3}, {"private": True}]
        )

    app = aiohttp.web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/models", hub_search)  # the Hugging Face hub's search
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
    return {"gateway_url": url, "gateway_metrics_url": url + "/metrics", "hf_endpoint": url}


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
        "ttftSecondsMean": 0.25,
        "outputTokens": 400.0,
        "outputTokensPerSecondMean": 25.0,
    }


async def test_models_search_adds_the_hub_when_reachable(
    console: Console, gateway: tuple[str, list[dict[str, Any]]]
) -> None:
    status, body = await console.call("GET", "/api/models?q=qwen2.5-7b")
    assert status == 200
    assert [m["id"] for m in body["catalog"]] == ["Qwen/Qwen2.5-7B-Instruct"]
    assert body["huggingface"] == [
        {"id": "someone/qwen2.5-7b-finetune", "source": "huggingface", "downloads": 12, "likes": 3}
    ]
    assert body["huggingfaceError"] is None
    assert {"search": "qwen2.5-7b", "limit": "20"} in gateway[1]

    console.cfg.hf_endpoint = "http://127.0.0.1:9"  # nothing listens: catalog only, error said
    status, body = await console.call("GET", "/api/models?q=qwen2.5-7b")
    assert status == 200 and len(body["catalog"]) == 1 and body["huggingface"] == []
    assert "http://127.0.0.1:9 unreachable" in body["huggingfaceError"]
