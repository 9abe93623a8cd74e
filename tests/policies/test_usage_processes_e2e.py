"""Issue 5 end to end: ONE Envoy, TWO extproc processes, a shared Redis token budget. Envoy's
access-log stream reaches one process only, so about half of the usage reports arrive at the
process that did not admit the request; every report must still be charged — the shared Redis
budget ends exactly the engines' prompt + completion tokens lower, and ``usage_tokens_total``
summed over both processes is exactly those tokens (none lost, none counted twice)."""

from __future__ import annotations

import concurrent.futures
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from matrixinfer.process import ReadinessTimeout, wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric, port_metric
from matrixinfer.testing.redis import RedisServer
from sim.fleet import Fleet
from tests.policies.conftest import POOL, documents, policy_stack, route_yaml, write_config

pytestmark = pytest.mark.timeout(150)

INPUT_CAP = 5000  # per day: the refill (0.06 tokens/s) stays well under one token in this test
OUTPUT_CAP = 3000

ROUTES = documents(
    POOL,
    route_yaml(
        "shared-budget",
        "budget-model",
        rateLimit="{inputTokensPerUnit: %d, outputTokensPerUnit: %d, unit: day, "
        'global: {redis: {address: "%s"}}}',
    ),
)


@pytest.fixture
def stack(tmp_path: Path, policy_fleet: Fleet, redis_server: RedisServer) -> Iterator[GatewayStack]:
    config = tmp_path / "config"
    config.mkdir()
    write_config(config, policy_fleet, ROUTES % (INPUT_CAP, OUTPUT_CAP, redis_server.address))
    s = policy_stack(
        config,
        tmp_path / "run",
        policy_fleet,
        ("--usage-grace", "1", "--stale-after", "5"),
        extproc_processes=2,
    )
    try:
        yield s
    finally:
        s.stop()


def one_conversation(stack: GatewayStack, n: int) -> tuple[int, int]:
    """Three requests with the same prompt — plain, streamed with usage asked, streamed without
    (the gateway forces and hides the usage event) — and the engine's prompt + completion tokens
    of the three (the last one's: the same prompt; the sim's output words are one token each)."""
    client = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=30)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": f"conversation {n}: tell me a story about a river"}
    ]
    try:
        plain = client.chat.completions.create(
            model="budget-model", messages=messages, max_tokens=5 + n
        )
        assert plain.usage is not None
        prompt, completion = plain.usage.prompt_tokens, plain.usage.completion_tokens
        assert completion == 5 + n
        stream = client.chat.completions.create(
            model="budget-model",
            messages=messages,
            max_tokens=7 + n,
            stream=True,
            stream_options={"include_usage": True},
        )
        usages = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert len(usages) == 1 and usages[0].prompt_tokens == plain.usage.prompt_tokens
        prompt += usages[0].prompt_tokens
        completion += usages[0].completion_tokens
        stream = client.chat.completions.create(
            model="budget-model", messages=messages, max_tokens=3 + n, stream=True
        )
        text = []
        for chunk in stream:
            assert chunk.usage is None
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
        words = len("".join(text).split())
        assert words == 3 + n
        return prompt + plain.usage.prompt_tokens, completion + words
    finally:
        client.close()


def test_every_report_is_charged_whichever_process_it_reaches(
    stack: GatewayStack, redis_server: RedisServer
) -> None:
    r = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=2)
    for key in r.keys("mi:rl:*shared-budget*"):  # an earlier test's bucket (one Redis per session)
        r.delete(key)
    began = r.time()
    conversations = 12
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        done = list(pool.map(lambda n: one_conversation(stack, n), range(conversations)))
    prompt = sum(p for p, _ in done)
    completion = sum(c for _, c in done)
    requests = 3 * conversations

    admitted = [
        port_metric(port, "matrixinfer_gateway_ratelimit_decisions_total", result="admitted")
        for port in stack.http_ports
    ]
    assert sum(admitted) == requests
    assert min(admitted) > 0, f"one process admitted nothing: {admitted}"

    def settled() -> bool:
        return (
            metric(stack, "matrixinfer_gateway_usage_reports_total", source="reported") >= requests
        )

    try:
        wait_until(settled, 20, "every usage report settled on one process or the other")
    except ReadinessTimeout:
        by_source = {
            x: metric(stack, "matrixinfer_gateway_usage_reports_total", source=x)
            for x in ("reported", "aborted", "error", "unreported")
        }
        foreign_by = {
            x: metric(stack, "matrixinfer_gateway_usage_foreign_reports_total", result=x)
            for x in ("settled", "no_charge", "duplicate", "invalid")
        }
        with urllib.request.urlopen(
            f"{stack.admin_url}/stats?filter=grpc_access_log", timeout=2
        ) as resp:
            als = resp.read().decode().strip().replace("\n", "; ")
        aborted = [
            line
            for log in sorted(stack.run_dir.glob("extproc*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if "no usage in the answer" in line
        ]
        raise AssertionError(
            f"{requests} requests; reports by source {by_source}; foreign {foreign_by}; "
            f"Envoy: {als}; aborted: {aborted}"
        ) from None
    # Envoy (one worker) streams its access log to one process: the other's requests were
    # settled there from the charge they carried
    foreign = metric(stack, "matrixinfer_gateway_usage_foreign_reports_total", result="settled")
    assert foreign > 0
    assert metric(stack, "matrixinfer_gateway_usage_reports_total", source="reported") == requests
    # the admitting process drops those after --usage-grace as unreported, counting nothing
    wait_until(
        lambda: (
            metric(stack, "matrixinfer_gateway_usage_reports_total", source="unreported") >= foreign
        ),
        20,
        "the admitting processes swept the charges settled elsewhere",
    )
    assert metric(stack, "matrixinfer_gateway_usage_reports_total", source="unreported") == foreign
    assert metric(stack, "matrixinfer_gateway_usage_foreign_reports_total", result="no_charge") == 0
    tokens = "matrixinfer_gateway_usage_tokens_total"
    assert metric(stack, tokens, model="budget-model", kind="prompt") == prompt
    assert metric(stack, tokens, model="budget-model", kind="completion") == completion

    # the shared budget: exactly the engines' tokens below capacity, but for the refill since
    # the first admission (Redis TIME)
    (key,) = r.keys("mi:rl:*shared-budget*")
    level_in, level_out, stamp = (float(v) for v in r.hmget(key, "i", "o", "t"))  # type: ignore[arg-type]
    refill_days = (stamp - (began[0] + began[1] / 1e6)) / 86400
    assert 0 <= level_in - (INPUT_CAP - prompt) <= INPUT_CAP * refill_days + 1e-6, (
        level_in,
        prompt,
    )
    assert 0 <= level_out - (OUTPUT_CAP - completion) <= OUTPUT_CAP * refill_days + 1e-6, (
        level_out,
        completion,
    )
