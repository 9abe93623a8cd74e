"""Input-token estimates by the engine's ``/tokenize`` (``extproc.token_estimate``), in process
against a real HTTP server on loopback: the count when the pod answers; characters/4, a counted
failure and one log line per pod when it does not; asked only for authorised callers of routes with
an input-token limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from extproc.errors import GatewayError
from extproc.policies.auth import Identity
from extproc.policies.enforce import Policies, PolicySettings, RoutePolicy
from extproc.policies.ratelimit import Limits
from extproc.policies.token_estimate import (
    PolicyConfig,
    TokenEstimateConfig,
    TokenEstimator,
    tokenize_request,
)
from fleet.pods import Pod
from matrixinfer.process import free_port


def test_tokenize_request_shapes() -> None:
    chat = {
        "model": "client-name",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function"}],
        "temperature": 0.5,
    }
    assert tokenize_request("chat", chat, "engine-name") == {
        "model": "engine-name",
        "messages": chat["messages"],
        "tools": chat["tools"],
    }
    assert tokenize_request("completions", {"prompt": "abc"}, "m") == {
        "model": "m",
        "prompt": "abc",
    }
    assert tokenize_request("completions", {"prompt": ["abc"]}, "m") == {
        "model": "m",
        "prompt": "abc",
    }
    assert tokenize_request("completions", {"prompt": [1, 2, 3]}, "m") == 3
    assert tokenize_request("completions", {"prompt": [[4, 5]]}, "m") == 2
    assert tokenize_request("completions", {"prompt": ["a", "b"]}, "m") is None  # a batch
    assert tokenize_request("embeddings", {"input": "text"}, "m") == {
        "model": "m",
        "prompt": "text",
    }


def test_policy_config_file(tmp_path: Path) -> None:
    good = tmp_path / "p.yaml"
    good.write_text("tokenEstimate: {method: tokenize, timeoutMs: 150}\n")
    cfg = PolicyConfig.load(good)
    assert cfg.token_estimate.method == "tokenize" and cfg.token_estimate.timeout_ms == 150
    assert PolicyConfig.load(tmp_path / "p.yaml").token_estimate.timeout_ms == 150
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert PolicyConfig.load(empty).token_estimate.method == "chars"
    for text, named in (
        ("tokenEstimate: {method: tiktoken}\n", "tokenEstimate.method"),
        ("tokenEstimate: {timeoutMs: 0}\n", "tokenEstimate.timeoutMs"),
        ("tokenEstimat: {}\n", "tokenEstimat"),
        ("- a list\n", "expected a mapping"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            PolicyConfig.load(bad)


class Engine:
    """A /tokenize endpoint whose behaviour the test sets: ok | slow | broken."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.bodies: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "slow":
            await self.release.wait()  # longer than the estimator's timeout
        if self.mode == "broken":
            return web.json_response({"error": "boom"}, status=500)
        text = body.get("prompt") or " ".join(m["content"] for m in body["messages"])
        return web.json_response({"count": len(text.split()) + 100, "tokens": []})


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, str]]:
    e = Engine()
    app = web.Application()
    app.router.add_post("/tokenize", e.tokenize)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield e, f"127.0.0.1:{port}"
    finally:
        e.release.set()
        await runner.cleanup()


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_count_from_the_engine_and_fallbacks(
    engine: tuple[Engine, str], caplog: pytest.LogCaptureFixture
) -> None:
    eng, address = engine
    registry = CollectorRegistry()
    est = TokenEstimator(TokenEstimateConfig(method="tokenize", timeout_ms=100), registry)
    pods = [Pod("down", "127.0.0.1:1", ready=False), Pod("p0", address)]
    body = {"model": "m", "prompt": "one two three"}
    try:
        # the engine's count; the not-ready pod is never asked
        assert await est.estimate(pods, "completions", body, "engine-m", 4, "m") == 103
        assert eng.bodies[-1] == {"model": "engine-m", "prompt": "one two three"}
        assert (
            counter(registry, "matrixinfer_gateway_token_estimates_total", source="tokenize") == 1
        )
        assert (
            counter(registry, "matrixinfer_gateway_estimated_prompt_tokens_total", model="m") == 103
        )

        caplog.set_level(logging.INFO, "matrixinfer.extproc.token_estimate")
        eng.mode = "slow"  # timeouts: characters/4, counted, logged once for the pod
        assert await est.estimate(pods, "completions", body, "engine-m", 4, "m") == 4
        assert await est.estimate(pods, "completions", body, "engine-m", 4, "m") == 4
        assert (
            counter(registry, "matrixinfer_gateway_tokenize_failures_total", reason="timeout") == 2
        )
        assert (
            counter(registry, "matrixinfer_gateway_token_estimates_total", source="fallback") == 2
        )
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "p0" in warnings[0].getMessage()
        assert "100 ms" in warnings[0].getMessage()

        eng.mode = "ok"  # the pod answers again: said once
        assert await est.estimate(pods, "completions", body, "engine-m", 4, "m") == 103
        assert any("answers again" in r.getMessage() for r in caplog.records)

        eng.mode = "broken"
        assert await est.estimate(pods, "completions", body, "engine-m", 4, "m") == 4
        assert (
            counter(registry, "matrixinfer_gateway_tokenize_failures_total", reason="status") == 1
        )
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "HTTP 500" in warnings[1].getMessage()

        # nothing listens: an error; no ready pod at all: no_pod; nothing to ask: chars
        refused = [Pod("gone", f"127.0.0.1:{free_port()}")]
        assert await est.estimate(refused, "completions", body, "engine-m", 4, "m") == 4
        assert counter(registry, "matrixinfer_gateway_tokenize_failures_total", reason="error") == 1
        assert await est.estimate([pods[0]], "completions", body, "engine-m", 4, "m") == 4
        assert (
            counter(registry, "matrixinfer_gateway_tokenize_failures_total", reason="no_pod") == 1
        )
        batch = {"model": "m", "prompt": ["a", "b"]}
        assert await est.estimate(pods, "completions", batch, "engine-m", 9, "m") == 9
        assert counter(registry, "matrixinfer_gateway_token_estimates_total", source="chars") == 1
    finally:
        await est.close()


def route(limits: Limits | None, access: Any = None) -> RoutePolicy:
    name = f"r{id(limits)}"  # a bucket of its own per limits
    return RoutePolicy(f"ns/{name}", name, access, limits, 1000, 60.0, None)


async def test_admit_asks_only_when_it_matters() -> None:
    registry = CollectorRegistry()
    policies = Policies(PolicySettings(), registry, clock=lambda: 0.0)  # no refill
    asked: list[int] = []

    async def count() -> int:
        asked.append(1)
        return 42

    who = Identity("acme", "alice", (), "api-key")
    # no rate limit, or one without an input-token limit: the estimate stays, nothing asked
    charge = await policies.admit(who, route(None), 7, "chat", "m", count=count)
    assert charge.estimate == 7 and asked == []
    requests_only = Limits(requests=100, input=None, output=1000, period=3600.0)
    charge = await policies.admit(who, route(requests_only), 7, "chat", "m", count=count)
    assert charge.estimate == 7 and asked == []
    # a caller the route refuses: 403 before anything is asked
    access = SimpleNamespace(tenants=["other"], users=None, groups=None)
    input_limit = Limits(requests=None, input=1000, output=None, period=3600.0)
    with pytest.raises(GatewayError) as exc:
        await policies.admit(who, route(input_limit, access), 7, "chat", "m", count=count)
    assert exc.value.status == 403 and asked == []
    # an input-token limit: the engine's count is what is reserved
    charge = await policies.admit(who, route(input_limit), 7, "chat", "m", count=count)
    assert charge.estimate == 42 and asked == [1]
    assert charge.bucket is not None
    assert policies.local.levels(charge.bucket, input_limit)[1] == 1000 - 42
