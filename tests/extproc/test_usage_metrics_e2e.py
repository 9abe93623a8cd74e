"""The gateway's token and time-to-first-token metrics in the default configuration (no
``--policies``), end to end through real Envoy and simulator pods (issue #23 item 3): a streamed
request observes its time to the first token and inter-token latency; input and output tokens are
counted for streamed and non-streamed answers; ``/v1/responses`` answers (JSON and stream) count
their ``input_tokens``/``output_tokens``."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack

pytestmark = pytest.mark.timeout(120)

MODEL = "demo-model"
TTFT = "matrixinfer_gateway_time_to_first_token_seconds"
ITL = "matrixinfer_gateway_inter_token_latency_seconds"
INPUT = "matrixinfer_gateway_input_tokens_total"
OUTPUT = "matrixinfer_gateway_output_tokens_total"


@pytest.fixture(scope="module")
def client(stack: GatewayStack) -> Iterator[OpenAI]:
    c = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)
    yield c
    c.close()


def _samples(stack: GatewayStack) -> dict[str, float]:
    """``name`` -> value of the extproc's series for :data:`MODEL`."""
    with urllib.request.urlopen(f"{stack.extproc_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == MODEL and "le" not in s.labels:
                out[s.name] = s.value
    return out


def _grown(stack: GatewayStack, before: dict[str, float], expected: dict[str, float]) -> bool:
    now = _samples(stack)
    return all(now.get(k, 0.0) - before.get(k, 0.0) == v for k, v in expected.items())


def _prompt() -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"tell me about {uuid.uuid4().hex}"}]


def test_stream_observes_time_to_first_token_and_tokens(
    client: OpenAI, stack: GatewayStack
) -> None:
    """A stream the client asked usage for: its exact usage is counted, its first token
    observed; one that did not ask still counts (the forced usage event is not shown)."""
    before = _samples(stack)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=_prompt(),
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    expected = {
        f"{TTFT}_count": 1.0,
        f"{ITL}_count": 1.0,  # six tokens: five gaps after the first
        INPUT: float(usage.prompt_tokens),
        OUTPUT: 6.0,
    }
    wait_until(lambda: _grown(stack, before, expected), 10, f"stream counted: {expected}")
    after = _samples(stack)
    assert after[f"{TTFT}_sum"] > before.get(f"{TTFT}_sum", 0.0)

    before = after
    plain = list(
        client.chat.completions.create(model=MODEL, messages=_prompt(), max_tokens=4, stream=True)
    )
    assert all(c.usage is None for c in plain)  # the forced usage event stays hidden
    assert sum(1 for c in plain if c.choices and c.choices[0].delta.content) == 4
    expected = {f"{TTFT}_count": 1.0, OUTPUT: 4.0}
    wait_until(lambda: _grown(stack, before, expected), 10, f"plain stream counted: {expected}")


def test_non_streamed_answer_counts_tokens_not_first_token(
    client: OpenAI, stack: GatewayStack
) -> None:
    before = _samples(stack)
    answer = client.chat.completions.create(model=MODEL, messages=_prompt(), max_tokens=5)
    assert answer.usage is not None
    expected = {INPUT: float(answer.usage.prompt_tokens), OUTPUT: 5.0}
    wait_until(lambda: _grown(stack, before, expected), 10, f"JSON answer counted: {expected}")
    after = _samples(stack)
    # not a stream: its first token is not observable, so no time to first token
    assert after.get(f"{TTFT}_count", 0.0) == before.get(f"{TTFT}_count", 0.0)


def test_responses_usage_is_counted(client: OpenAI, stack: GatewayStack) -> None:
    """``/v1/responses``: a JSON answer's ``usage.input_tokens``/``output_tokens``; a stream's
    ``response.completed`` usage, and its first delta event as the first token."""
    before = _samples(stack)
    answer = client.responses.create(model=MODEL, input=f"hi {uuid.uuid4().hex}",
                                     max_output_tokens=3)  # fmt: skip
    assert answer.usage is not None and answer.usage.output_tokens == 3
    expected = {INPUT: float(answer.usage.input_tokens), OUTPUT: 3.0}
    wait_until(lambda: _grown(stack, before, expected), 10, f"responses counted: {expected}")

    before = _samples(stack)
    events = list(client.responses.create(model=MODEL, input=f"hi {uuid.uuid4().hex}",
                                          max_output_tokens=4, stream=True))  # fmt: skip
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    usage = completed[0].response.usage
    assert usage is not None and usage.output_tokens == 4
    expected = {
        f"{TTFT}_count": 1.0,
        f"{ITL}_count": 1.0,
        INPUT: float(usage.input_tokens),
        OUTPUT: 4.0,
    }
    wait_until(lambda: _grown(stack, before, expected), 10, f"responses stream: {expected}")
