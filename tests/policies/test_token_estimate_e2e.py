"""``tokenEstimate: {method: tokenize}`` end to end: real Envoy, the extproc asking the simulator
pods' ``/tokenize``, the ``openai`` client. What a request reserves at admission is the engine's
own count — the ``prompt_tokens`` it then reports — not characters/4; routes without an input-token
limit ask nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from openai import OpenAI

from extproc.parsing import estimate_tokens, parse_body
from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric
from sim.fleet import Fleet
from tests.policies.conftest import POOL, documents, policy_stack, route_yaml, write_config

ROUTES = documents(
    POOL,
    route_yaml(
        "counted",
        "counted-model",
        rateLimit="{inputTokensPerUnit: 1000000, unit: hour, scope: user}",
    ),
    route_yaml(
        "uncounted", "uncounted-model", rateLimit="{outputTokensPerUnit: 1000000, unit: hour}"
    ),
)

# words the simulator's tokenizer splits unlike characters/4
PROMPT = (
    "Tokenization: internationalisation, x, y, z, 1 2 3 4 5 6 7 8 9, ünïcödé, supercalifragilistic!"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, policy_fleet: Fleet) -> Iterator[GatewayStack]:
    config = tmp_path_factory.mktemp("estimate-config")
    write_config(config, policy_fleet, ROUTES)
    policy = tmp_path_factory.mktemp("estimate-policy") / "policy.yaml"
    # generous timeout: the machine is shared; the fallback has its own unit test
    policy.write_text("tokenEstimate: {method: tokenize, timeoutMs: 3000}\n")
    s = policy_stack(
        config,
        tmp_path_factory.mktemp("estimate-run"),
        policy_fleet,
        ("--policy-config", str(policy), "--usage-grace", "5"),
    )
    try:
        yield s
    finally:
        s.stop()


def estimates(stack: GatewayStack, source: str) -> float:
    return metric(stack, "matrixinfer_gateway_token_estimates_total", source=source)


def reserved(stack: GatewayStack, model: str) -> float:
    return metric(stack, "matrixinfer_gateway_estimated_prompt_tokens_total", model=model)


def settled_prompt(stack: GatewayStack, model: str) -> float:
    return metric(stack, "matrixinfer_gateway_usage_tokens_total", model=model, kind="prompt")


def test_reservation_is_the_engines_count(stack: GatewayStack) -> None:
    c = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)
    messages = [
        {"role": "system", "content": "You count tokens."},
        {"role": "user", "content": PROMPT},
    ]
    chars = estimate_tokens(
        parse_body("chat", json.dumps({"model": "m", "messages": messages}).encode()).prompt
    )
    asked, before = estimates(stack, "tokenize"), reserved(stack, "counted-model")
    settled = settled_prompt(stack, "counted-model")
    r = c.chat.completions.create(model="counted-model", messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert r.usage is not None
    exact = r.usage.prompt_tokens
    assert exact != chars  # the test means something: characters/4 would be off
    assert estimates(stack, "tokenize") == asked + 1
    assert reserved(stack, "counted-model") - before == exact
    wait_until(
        lambda: settled_prompt(stack, "counted-model") > settled,
        10,
        "the request's usage was settled",
    )
    assert settled_prompt(stack, "counted-model") - settled == exact  # reservation == settlement

    # completions: the prompt string is counted the same way
    before = reserved(stack, "counted-model")
    done = c.completions.create(model="counted-model", prompt=PROMPT, max_tokens=3)
    assert done.usage is not None
    assert done.usage.prompt_tokens != estimate_tokens(PROMPT)
    assert reserved(stack, "counted-model") - before == done.usage.prompt_tokens

    # a route without an input-token limit asks nothing
    calls = sum(estimates(stack, s) for s in ("tokenize", "fallback", "chars", "token_ids"))
    c.chat.completions.create(model="uncounted-model", messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert sum(estimates(stack, s) for s in ("tokenize", "fallback", "chars", "token_ids")) == calls
    assert estimates(stack, "fallback") == 0
