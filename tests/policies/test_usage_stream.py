"""The client sees the stream it asked for (issue 5, item 3): the extproc forces
``stream_options.include_usage`` for exact accounting, and Envoy's ``usage.lua`` removes the forced
usage-only event from clients that did not ask for it — including when that event (or any other)
arrives split across chunks. Real Envoy, real extproc, simulator pods, the ``openai`` client.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric
from sim.fleet import Fleet
from tests.extproc.helpers import server_yaml
from tests.policies.conftest import (
    POOL,
    EngineStandIn,
    documents,
    route_yaml,
    stand_in_stack,
)

ROUTES = documents(
    POOL,
    server_yaml("split-pool", {"app": "splitter"}, model="demo-model"),
    route_yaml(
        "stream",
        "stream-model",
        rateLimit="{inputTokensPerUnit: 1000000, outputTokensPerUnit: 1000000, unit: hour}",
    ),
    route_yaml(
        "split", "split-model", "split-pool", rateLimit="{outputTokensPerUnit: 1000000, unit: hour}"
    ),
)

WORDS = 40


class Splitter(EngineStandIn):
    """An engine stand-in between Envoy and a simulator: answers like the simulator, but writes
    each SSE answer in three pieces that end inside events (the second one inside the usage
    event), each written only after the client saw what came before — so Envoy's Lua filter gets
    them as separate chunks, for sure."""

    def __init__(self, upstream: str, host: str = "127.0.0.79") -> None:
        super().__init__(upstream, host)
        self.saw_role = threading.Event()
        self.saw_finish = threading.Event()
        self.gates_passed: list[bool] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        status, ctype, body = await self.forward(request)
        if "text/event-stream" not in ctype:
            return web.Response(body=body, status=status, headers={"Content-Type": ctype})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # piece 1 ends inside the first content event; piece 2 inside the usage event (or, when
        # there is none, inside [DONE])
        second = body.index(b"data:", 1)
        cut1 = second + 12
        last = body.find(b'"choices":[]')
        if last < 0:
            last = body.index(b"data: [DONE]")
        cut2 = last + 5
        for piece, gate in ((body[:cut1], self.saw_role), (body[cut1:cut2], self.saw_finish)):
            await resp.write(piece)
            self.gates_passed.append(await asyncio.to_thread(gate.wait, 10))
        await resp.write(body[cut2:])
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def splitter(policy_fleet: Fleet) -> Iterator[Splitter]:
    with Splitter(policy_fleet.pods[0].url) as s:
        yield s


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, policy_fleet: Fleet, splitter: Splitter
) -> Iterator[GatewayStack]:
    args = ("--usage-grace", "5")
    with stand_in_stack(tmp_path_factory, policy_fleet, splitter, ROUTES, "splitter", args) as s:
        yield s


def tokens(stack: GatewayStack, model: str, kind: str) -> float:
    return metric(stack, "matrixinfer_gateway_usage_tokens_total", model=model, kind=kind)


def reported(stack: GatewayStack) -> float:
    return metric(stack, "matrixinfer_gateway_usage_reports_total", source="reported")


def settled_after(stack: GatewayStack, before: float, count: int = 1) -> None:
    wait_until(lambda: reported(stack) >= before + count, 10, "the usage reports were settled")


def client(stack: GatewayStack) -> OpenAI:
    return OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)


def stream_chat(stack: GatewayStack, **extra: Any) -> tuple[str, list[Any], int]:
    """(text, usage chunks, chunks) of a streamed chat answer read with the openai client."""
    stream = client(stack).chat.completions.create(
        model="stream-model",
        messages=[{"role": "user", "content": "tell me a story about streams"}],
        max_tokens=WORDS,
        stream=True,
        **extra,
    )
    text, usages, chunks = [], [], 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        else:
            assert chunk.usage is not None, chunk
        if chunk.usage is not None:
            usages.append(chunk.usage)
    return "".join(text), usages, chunks


def test_usage_chunk_only_when_asked_and_both_charged_exactly(stack: GatewayStack) -> None:
    # asked: the usage chunk arrives, last, and the gateway charges exactly its numbers
    before = reported(stack)
    prompt0, completion0 = (
        tokens(stack, "stream-model", "prompt"),
        tokens(stack, "stream-model", "completion"),
    )
    text, usages, chunks = stream_chat(stack, stream_options={"include_usage": True})
    assert len(text.split()) == WORDS
    assert len(usages) == 1
    usage = usages[0]
    assert usage.completion_tokens == WORDS and usage.prompt_tokens > 0
    settled_after(stack, before)
    assert tokens(stack, "stream-model", "prompt") - prompt0 == usage.prompt_tokens
    assert tokens(stack, "stream-model", "completion") - completion0 == WORDS
    asked_chunks = chunks

    # not asked: the same stream without the usage chunk, charged the same exact numbers
    before = reported(stack)
    prompt0, completion0 = (
        tokens(stack, "stream-model", "prompt"),
        tokens(stack, "stream-model", "completion"),
    )
    text, usages, chunks = stream_chat(stack)
    assert len(text.split()) == WORDS
    assert usages == []
    assert chunks == asked_chunks - 1
    settled_after(stack, before)
    assert tokens(stack, "stream-model", "prompt") - prompt0 == usage.prompt_tokens
    assert tokens(stack, "stream-model", "completion") - completion0 == WORDS

    # include_usage false and continuous_usage_stats: still no usage anywhere
    before = reported(stack)
    completion0 = tokens(stack, "stream-model", "completion")
    text, usages, _ = stream_chat(
        stack, stream_options={"include_usage": False, "continuous_usage_stats": True}
    )
    assert len(text.split()) == WORDS
    assert usages == []
    settled_after(stack, before)
    assert tokens(stack, "stream-model", "completion") - completion0 == WORDS


def post_stream(stack: GatewayStack, path: str, body: dict[str, Any]) -> Iterator[bytes]:
    """The raw answer of a POST, as the bytes arrive."""
    req = urllib.request.Request(
        stack.url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert resp.status == 200
        while data := resp.read1(65536):
            yield data


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-200:]
    return [e for e in raw.split(b"\n\n") if e]


def test_raw_stream_ends_with_done_and_has_no_usage_event(stack: GatewayStack) -> None:
    for path, payload in (
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "raw bytes please"}]},
        ),
        ("/completions", {"prompt": "raw bytes please"}),
    ):
        before = reported(stack)
        completion0 = tokens(stack, "stream-model", "completion")
        body = {"model": "stream-model", "max_tokens": WORDS, "stream": True, **payload}
        raw = b"".join(post_stream(stack, path, body))
        events = sse_events(raw)
        assert events[-1] == b"data: [DONE]"
        assert all(e.startswith(b"data: ") for e in events)
        assert b'"usage"' not in raw
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all(c["choices"] for c in chunks)
        settled_after(stack, before)
        assert tokens(stack, "stream-model", "completion") - completion0 == WORDS


@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
def test_events_split_across_chunks(stack: GatewayStack, splitter: Splitter, asked: bool) -> None:
    splitter.saw_role.clear()
    splitter.saw_finish.clear()
    splitter.gates_passed.clear()
    before = reported(stack)
    completion0 = tokens(stack, "split-model", "completion")
    body: dict[str, Any] = {
        "model": "split-model",
        "messages": [{"role": "user", "content": "split me"}],
        "max_tokens": WORDS,
        "stream": True,
    }
    if asked:
        body["stream_options"] = {"include_usage": True}
    raw = b""
    for data in post_stream(stack, "/chat/completions", body):
        raw += data
        if b'"role":"assistant"' in raw:
            splitter.saw_role.set()
        if b'"finish_reason":"' in raw:
            splitter.saw_finish.set()
    # each piece was written after the client saw the one before: Envoy had them separately
    assert splitter.gates_passed == [True, True]
    events = sse_events(raw)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(text.split()) == WORDS
    usage_chunks = [c for c in chunks if not c["choices"]]
    if asked:
        assert len(usage_chunks) == 1 and usage_chunks[0]["usage"]["completion_tokens"] == WORDS
        assert chunks[-1] is usage_chunks[0]
    else:
        assert usage_chunks == [] and b'"usage"' not in raw
    settled_after(stack, before)
    assert tokens(stack, "split-model", "completion") - completion0 == WORDS
