"""What the console takes from the gateway: the chat relay (server-sent events passed on as they
come) and a deployment's figures from the gateway's /metrics; and the Hugging Face search. The
gateway (and hub) here is a small aiohttp server speaking the OpenAI streaming format, Prometheus
text and the hub's /api/models."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.console.conftest import VIEWER, Console, Gateway


@pytest.fixture
def console_extra(gateway: Gateway) -> dict[str, Any]:
    return gateway.config()


async def test_chat_streams_through_the_gateway(console: Console, gateway: Gateway) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    status, text = await console.call("POST", "/api/deployments/chat/chat", json=body)
    assert status == 200
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]) == (
        "Hello there"
    )
    assert gateway.seen == [
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
    console: Console, gateway: Gateway
) -> None:
    status, body = await console.call("GET", "/api/models?q=qwen2.5-7b")
    assert status == 200
    assert [m["id"] for m in body["catalog"]] == ["Qwen/Qwen2.5-7B-Instruct"]
    assert body["huggingface"] == [
        {"id": "someone/qwen2.5-7b-finetune", "source": "huggingface", "downloads": 12, "likes": 3}
    ]
    assert body["huggingfaceError"] is None
    assert {"search": "qwen2.5-7b", "limit": "20"} in gateway.seen

    console.cfg.hf_endpoint = "http://127.0.0.1:9"  # nothing listens: catalog only, error said
    status, body = await console.call("GET", "/api/models?q=qwen2.5-7b")
    assert status == 200 and len(body["catalog"]) == 1 and body["huggingface"] == []
    assert "http://127.0.0.1:9 unreachable" in body["huggingfaceError"]
