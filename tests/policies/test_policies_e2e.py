"""Policies end to end: the openai client -> Envoy (Lua usage filter, gRPC access log) -> extproc
(auth, budgets, usage settlement) -> simulator pods."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric
from sim.fleet import Fleet
from tests.conftest import sim_fleet
from tests.extproc.helpers import server_yaml
from tests.policies.conftest import (
    KEYS,
    POOL,
    documents,
    keys_yaml,
    policy_stack,
    route_yaml,
    write_config,
)

ROUTES = documents(
    POOL,
    route_yaml("open", "open-model"),
    route_yaml("members", "members-model", access="{tenants: [acme]}"),
    route_yaml("team", "team-model", access="{groups: [ml]}"),
    route_yaml(
        "output-budget",
        "output-model",
        rateLimit="{outputTokensPerUnit: 300, unit: hour, scope: user}",
    ),
    route_yaml(
        "request-budget",
        "request-model",
        rateLimit="{requestsPerUnit: 2, unit: hour, scope: tenant}",
    ),
)


# a pod at real speed (time scale 1: ~10 ms a token) for the aborted stream: the shared fleet
# (time scale 0.01) finished a 4000-token answer upstream while a starved client read its first 50
# chunks (3 of 3 attempts in a 1-core loaded run), leaving no abort to check
SLOW_ROUTE = documents(
    server_yaml("slow", {"app": "slow-sim"}, model="demo-model"),
    route_yaml("slow-story", "story-model", server="slow"),
)


@pytest.fixture(scope="module")
def slow_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with sim_fleet(
        tmp_path_factory, "127.0.0.76", 1, "--time-scale", "1", logs="policy-slow-sim",
        name_prefix="slow",
    ) as f:  # fmt: skip
        yield f


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, policy_fleet: Fleet, slow_fleet: Fleet
) -> Iterator[GatewayStack]:
    config = tmp_path_factory.mktemp("policy-config")
    write_config(config, policy_fleet, documents(ROUTES, SLOW_ROUTE))
    slow = slow_fleet.pods[0]
    (config / "slow-sims.yaml").write_text(
        "apiVersion: gateway.matrixinfer.ai/v1alpha1\nkind: Endpoints\n"
        "metadata: {name: slow-sims}\nspec:\n  endpoints:\n"
        f"  - {{name: {slow.name}, address: '{slow.address}', labels: {{app: slow-sim}}}}\n"
    )
    secrets = tmp_path_factory.mktemp("policy-secrets")
    (secrets / "keys.yaml").write_text(keys_yaml(KEYS))
    auth = secrets / "auth.yaml"
    auth.write_text(
        f"apiKeysFile: {secrets / 'keys.yaml'}\nreloadIntervalSeconds: 0.1\n"
        "anonymousRoutes: [open]\n"
    )
    s = policy_stack(
        config,
        tmp_path_factory.mktemp("policy-run"),
        policy_fleet,
        ("--auth-config", str(auth), "--usage-grace", "5"),
    )
    s.secrets = secrets  # type: ignore[attr-defined]
    try:
        wait_until(lambda: slow.address in s.envoy_hosts(), 60, "the slow pod known to Envoy")
        yield s
    finally:
        s.stop()


def client(stack: GatewayStack, key: str | None) -> OpenAI:
    return OpenAI(base_url=stack.url, api_key=key or "", max_retries=0, timeout=20)


def chat(c: OpenAI, model: str, max_tokens: int = 5) -> str:
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens
    )
    return r.choices[0].message.content or ""


def post(stack: GatewayStack, model: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    req = urllib.request.Request(
        stack.url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_anonymous_route_needs_no_key(stack: GatewayStack) -> None:
    status, body = post(stack, "open-model", {})
    assert status == 200, body
    status, body = post(stack, "members-model", {})
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert "didn't provide an API key" in body["error"]["message"]
    status, body = post(stack, "members-model", {"authorization": "Basic abc"})
    assert status == 401 and "Bearer" in body["error"]["message"]


def test_missing_and_wrong_keys_are_401(stack: GatewayStack) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(client(stack, "not-a-key"), "members-model")
    assert exc.value.status_code == 401
    assert "incorrect API key" in str(exc.value)
    # a wrong key is refused even on the anonymous route
    with pytest.raises(openai.AuthenticationError):
        chat(client(stack, "not-a-key"), "open-model")


def test_access_lists_give_403(stack: GatewayStack) -> None:
    assert chat(client(stack, "key-alice"), "members-model")
    assert chat(client(stack, "key-alice"), "team-model")  # group ml
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(client(stack, "key-bob"), "members-model")
    assert "bob" in str(exc.value) and "members" in str(exc.value)
    with pytest.raises(openai.PermissionDeniedError):
        chat(client(stack, "key-carol"), "team-model")  # acme but not in group ml


def test_keys_rotate_without_restart(stack: GatewayStack) -> None:
    secrets: Path = stack.secrets  # type: ignore[attr-defined]
    with pytest.raises(openai.AuthenticationError):
        chat(client(stack, "key-new"), "members-model")
    rotated = dict(KEYS)
    rotated["key-new"] = ("acme", "newbie", [])
    del rotated["key-carol"]
    (secrets / "keys.yaml").write_text(keys_yaml(rotated))

    def new_key_works() -> bool:
        try:
            return bool(chat(client(stack, "key-new"), "members-model"))
        except openai.AuthenticationError:
            return False

    wait_until(new_key_works, 30, "the rotated key file is picked up")
    with pytest.raises(openai.AuthenticationError):
        chat(client(stack, "key-carol"), "members-model")
    (secrets / "keys.yaml").write_text(keys_yaml(KEYS))
    wait_until(lambda: _works(stack, "key-carol"), 30, "the original keys are back")


def _works(stack: GatewayStack, key: str) -> bool:
    try:
        return bool(chat(client(stack, key), "members-model"))
    except openai.AuthenticationError:
        return False


def test_requests_per_unit_429_with_headers(stack: GatewayStack) -> None:
    c = client(stack, "key-alice")
    chat(c, "request-model")
    chat(c, "request-model")
    with pytest.raises(openai.RateLimitError) as exc:
        chat(client(stack, "key-carol"), "request-model")  # same tenant acme: same budget
    headers = exc.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    # another tenant has its own budget
    assert chat(client(stack, "key-bob"), "request-model")


def test_large_streamed_output_is_fully_charged(stack: GatewayStack) -> None:
    """300 output tokens an hour per user: one 500-token stream is admitted (the budget was
    positive), charged in full from the engine's usage, and the debt blocks the next request."""
    c = client(stack, "key-heavy")

    def output_tokens() -> float:  # of this model alone: other tests' late reports move the rest
        return metric(
            stack, "matrixinfer_gateway_usage_tokens_total", model="output-model", kind="completion"
        )

    before = output_tokens()
    stream = c.chat.completions.create(
        model="output-model",
        messages=[{"role": "user", "content": "write a lot"}],
        max_tokens=500,
        stream=True,
    )
    pieces = []
    usage_chunks = 0
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage_chunks += 1
    # the client did not ask for usage: Envoy's usage.lua hides the forced usage event
    assert usage_chunks == 0
    assert len("".join(pieces).split()) == 500
    wait_until(
        lambda: output_tokens() > before, 30, "the usage report of the stream reached the extproc"
    )
    after = output_tokens()
    assert after - before >= 500
    with pytest.raises(openai.RateLimitError) as exc:
        chat(c, "output-model")
    assert exc.value.response.headers["x-ratelimit-limit-output-tokens"] == "300"
    assert exc.value.response.headers["x-ratelimit-remaining-output-tokens"] == "0"
    # the debt is per user: another user still gets through
    assert chat(client(stack, "key-light"), "output-model")


def test_aborted_stream_is_charged_what_was_sent(stack: GatewayStack) -> None:
    """A client that closes a long stream after 50 chunks is charged what the engine sent, not
    max_tokens. The stream comes from the real-speed pod (4000 tokens take ~40 s): a stream that
    still ended upstream before a starved client left (the buffers between, Envoy and both
    sockets, hold all of it) is reported complete, with nothing aborted to check; such an attempt
    is repeated, and a gateway that never settles an abort fails them all. Each attempt is read
    from the tokens of story-model alone (only this test uses it): counters over all models also
    move with other tests' late reports."""
    c = client(stack, "key-carol")

    def story_tokens() -> float:
        return metric(
            stack, "matrixinfer_gateway_usage_tokens_total", model="story-model", kind="completion"
        )

    completed = 0
    charged = 0.0
    for _ in range(3):
        aborted = metric(stack, "matrixinfer_gateway_usage_reports_total", source="aborted")
        before = story_tokens()
        stream = c.chat.completions.create(
            model="story-model",
            messages=[{"role": "user", "content": "a long story"}],
            max_tokens=4000,
            stream=True,
        )
        seen = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
            if seen >= 50:
                break
        stream.close()
        wait_until(
            lambda before=before: story_tokens() > before,
            30,
            "the closed stream was settled (aborted, or reported if it had already finished)",
        )
        charged = story_tokens() - before
        if charged < 4000:
            assert (
                metric(stack, "matrixinfer_gateway_usage_reports_total", source="aborted") > aborted
            )
            break
        completed += 1
        print(f"stream {completed} had finished upstream before its client closed it: again")
    assert completed < 3, "every stream had finished upstream before its client closed it"
    # usage.lua stores the running event count every 8 events: an abort is under-counted by up to 7
    assert 50 - 7 <= charged < 4000
