"""Exact usage of JSON answers of every shape (issue 5, item 3). Envoy's json_to_metadata filter
reads the usage of an answer with a content-length under 1 MB; ``usage.lua`` reads the longer
ones and those of unknown length (chunked): json_to_metadata holds the whole answer, and beyond
the stream's buffer limit Envoy would answer 500 instead of passing it on. Real Envoy, real
extproc, a simulator behind an engine stand-in that reshapes its JSON answers, the openai client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

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
    envoy_counter,
    route_yaml,
    stand_in_stack,
)

ROUTES = documents(
    POOL,
    server_yaml("shaped-pool", {"app": "reshaper"}, model="demo-model"),
    route_yaml("shaped", "shaped-model", "shaped-pool"),
)
PADDING = {"small": 0, "large": 1_200_000, "chunked": 300_000}  # characters before "usage"
CHUNK = 64 * 1024


class Reshaper(EngineStandIn):
    """Answers like the simulator; the request's ``x-test-shape`` header says how a JSON answer
    comes back: ``small`` as the simulator sent it; ``large`` with a 1.2 MB ``padding`` field
    before ``usage`` (engines write ``usage`` last) and a content-length; ``chunked`` with 300 KB
    of padding, sent in 64 KiB chunks without a content-length."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        status, ctype, body = await self.forward(request)
        shape = request.headers.get("x-test-shape", "small")
        if status != 200 or "json" not in ctype or shape == "small":
            return web.Response(body=body, status=status, headers={"Content-Type": ctype})
        answer = json.loads(body)
        usage = answer.pop("usage")
        answer["padding"] = "x" * PADDING[shape]
        answer["usage"] = usage
        data = json.dumps(answer).encode()
        if shape == "large":
            return web.Response(body=data, headers={"Content-Type": "application/json"})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for at in range(0, len(data), CHUNK):
            await resp.write(data[at : at + CHUNK])
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def reshaper(policy_fleet: Fleet) -> Iterator[Reshaper]:
    with Reshaper(policy_fleet.pods[0].url, "127.0.0.78") as s:
        yield s


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, policy_fleet: Fleet, reshaper: Reshaper
) -> Iterator[GatewayStack]:
    with stand_in_stack(tmp_path_factory, policy_fleet, reshaper, ROUTES, "reshaper") as s:
        yield s


def tokens(stack: GatewayStack, kind: str) -> float:
    return metric(stack, "matrixinfer_gateway_usage_tokens_total", model="shaped-model", kind=kind)


@pytest.mark.parametrize(("shape", "by_json_filter"), [("small", 1), ("large", 0), ("chunked", 0)])
def test_json_answer_charged_exactly_whatever_its_shape(
    stack: GatewayStack, shape: str, by_json_filter: int
) -> None:
    reads = envoy_counter(stack, "^json_to_metadata.resp.success$")
    prompt0, completion0 = tokens(stack, "prompt"), tokens(stack, "completion")
    client = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="shaped-model",
        messages=[{"role": "user", "content": f"a {shape} answer, please"}],
        max_tokens=12,
        extra_headers={"x-test-shape": shape},
    )
    answer = raw.parse()
    # the client got the whole answer, padding and all
    assert len(json.loads(raw.content).get("padding", "")) == PADDING[shape]
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    wait_until(
        lambda: tokens(stack, "completion") - completion0 == 12,
        10,
        f"the {shape} answer's completion tokens were charged",
    )
    assert tokens(stack, "prompt") - prompt0 == answer.usage.prompt_tokens
    # read by json_to_metadata only when short and of known length (else by usage.lua)
    assert envoy_counter(stack, "^json_to_metadata.resp.success$") - reads == by_json_filter
