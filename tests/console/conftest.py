"""The console served by uvicorn in the test's loop, against the emulated Kubernetes API (kmock)
with TokenReview, SubjectAccessReview and pod logs answered, and GPU nodes declared."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.web
import pytest
import uvicorn

from console.app import ConsoleConfig, create_app
from fleet.kubeconfig import KubeAccess
from matrixinfer.testing.kube import (
    Api,
    LogSource,
    Reviews,
    emulator,
    eventually,
    serve_logs,
    serve_reviews,
)

ADMIN, VIEWER, STRANGER = "admin-token", "viewer-token", "stranger-token"
LOGS: dict[tuple[str, str], LogSource] = {
    ("ns", "chat-main-0"): "INFO engine started\nINFO serving on :8000\n"
}


def allow(user: str, attrs: dict[str, Any]) -> bool:
    """RBAC of the test cluster: admin may do everything, viewer may read Models only."""
    if user == "admin":
        return True
    reads = attrs.get("verb") in ("get", "list")
    return user == "viewer" and reads and attrs["resource"] == "models"


def gpu_node(name: str, product: str, gpus: int, memory_mib: int | None = None) -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": product}
    if memory_mib:
        labels["nvidia.com/gpu.memory"] = str(memory_mib)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"allocatable": {"cpu": "32", "nvidia.com/gpu": str(gpus)}},
    }


@dataclass
class Console:
    url: str
    api: Api
    reviews: Reviews
    session: aiohttp.ClientSession
    cfg: ConsoleConfig  # the running console's (a test may change it)
    logs: dict[tuple[str, str], LogSource]  # what the emulated API serves as pod logs

    def headers(self, token: str = ADMIN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, token: str | None = ADMIN, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = self.headers(token) if token else {}
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


METRICS = """# TYPE matrixinfer_gateway_requests counter
matrixinfer_gateway_requests_total{model="chat",route="r",server="s",code="200"} 8.0
matrixinfer_gateway_requests_total{model="chat",route="r",server="s",code="429"} 2.0
matrixinfer_gateway_requests_total{model="other",route="r",server="s",code="200"} 5.0
# TYPE matrixinfer_gateway_time_to_first_byte_seconds histogram
matrixinfer_gateway_time_to_first_byte_seconds_bucket{model="chat",le="+Inf"} 8.0
matrixinfer_gateway_time_to_first_byte_seconds_sum{model="chat"} 0.8
matrixinfer_gateway_time_to_first_byte_seconds_count{model="chat"} 8.0
# TYPE matrixinfer_gateway_time_to_first_token_seconds histogram
matrixinfer_gateway_time_to_first_token_seconds_bucket{model="chat",le="+Inf"} 8.0
matrixinfer_gateway_time_to_first_token_seconds_sum{model="chat"} 2.0
matrixinfer_gateway_time_to_first_token_seconds_count{model="chat"} 8.0
# TYPE matrixinfer_gateway_output_tokens counter
matrixinfer_gateway_output_tokens_total{model="chat"} 400.0
# TYPE matrixinfer_gateway_output_tokens_per_second histogram
matrixinfer_gateway_output_tokens_per_second_bucket{model="chat",le="+Inf"} 4.0
matrixinfer_gateway_output_tokens_per_second_sum{model="chat"} 100.0
matrixinfer_gateway_output_tokens_per_second_count{model="chat"} 4.0
"""


@dataclass
class Gateway:
    """A stand-in gateway (and Hugging Face hub): OpenAI streaming chat, Prometheus /metrics,
    the hub's model search; ``seen`` holds the chat bodies and search queries it got."""

    url: str
    seen: list[dict[str, Any]]

    def config(self) -> dict[str, Any]:
        return {
            "gateway_url": self.url,
            "gateway_metrics_url": self.url + "/metrics",
            "hf_endpoint": self.url,
        }


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
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
        yield Gateway(f"http://127.0.0.1:{port}", seen)
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def console_extra() -> dict[str, Any]:
    """More ConsoleConfig fields (a test module overrides this fixture)."""
    return {}


@pytest.fixture
async def console(console_extra: dict[str, Any]) -> AsyncIterator[Console]:
    async with emulator() as api:
        reviews = Reviews({ADMIN: "admin", VIEWER: "viewer"}, allow)
        serve_reviews(api.k, reviews)
        logs = dict(LOGS)
        serve_logs(api.k, logs)
        for node in (
            gpu_node("l4-a", "NVIDIA-L4", 4),
            gpu_node("l4-b", "NVIDIA-L4", 4),
            gpu_node("h100-a", "NVIDIA-H100-80GB-HBM3", 8, 81559),
        ):
            await api.request("POST", "/api/v1/nodes", node)
        cfg = ConsoleConfig(kube=KubeAccess(server=api.url), namespace="ns", **console_extra)
        app = create_app(cfg)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        task = asyncio.create_task(server.serve())
        try:
            await eventually(lambda: server.started or task.done(), 20, "the console to start")
            assert not task.done(), "the console exited at start"
            async with aiohttp.ClientSession() as session:
                yield Console(f"http://127.0.0.1:{port}", api, reviews, session, cfg, logs)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 20)
