"""The chat playground and the figures against the real gateway: Envoy + extproc (the local
stack's GatewayStack) in front of a simulator serving the deployment's model name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from matrixinfer.stack import GatewayStack
from tests.conftest import sim_fleet
from tests.console.conftest import Console
from tests.extproc.conftest import endpoints_yaml, start_stack

CONFIG = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: chat}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  modelName: chat
  rules: [{targets: [{modelServerName: chat}]}]
"""


@pytest.fixture(scope="module")
def real_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    with sim_fleet(
        tmp_path_factory, "127.0.0.150", 1, "--time-scale", "0.02", "--served-model-name", "chat",
        logs="console-sims",
    ) as fleet:  # fmt: skip
        config = tmp_path_factory.mktemp("console-gateway-config")
        (config / "model.yaml").write_text(CONFIG)
        (config / "sims.yaml").write_text(endpoints_yaml(fleet))
        stack = start_stack(config, tmp_path_factory.mktemp("console-gateway-run"), fleet)
        try:
            yield stack
        finally:
            stack.stop()


@pytest.fixture
def console_extra(real_gateway: GatewayStack) -> dict[str, Any]:
    return {
        "gateway_url": real_gateway.url.removesuffix("/v1"),
        "gateway_metrics_url": f"http://127.0.0.1:{real_gateway.http_port}/metrics",
    }


async def test_chat_and_figures_through_the_real_gateway(console: Console) -> None:
    body = {"messages": [{"role": "user", "content": "Say something"}], "maxTokens": 8}
    status, text = await console.call("POST", "/api/deployments/chat/chat", json=body)
    assert status == 200, text
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(
        (c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c["choices"]
    )
    assert content, f"no content streamed: {events[:3]}"
    assert len([c for c in chunks if c["choices"]]) > 1  # several chunks: streamed

    # the request is counted when Envoy's access log reaches extproc: poll with a deadline
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status, m = await console.call("GET", "/api/deployments/chat/metrics")
        if status == 200 and m["requests"] >= 1:
            break
        assert asyncio.get_running_loop().time() < deadline, f"never counted: {status} {m}"
        await asyncio.sleep(0.1)
    assert m["errors"] == 0
