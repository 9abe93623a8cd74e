"""Timeouts for slow clients, end to end through Envoy: a client whose headers never finish is
disconnected, one whose body stalls gets 408, a ModelServer's trafficPolicy.maxDuration cuts a
request that takes longer (504); a stream and a silent unstreamed answer that last longer than
those limits are not cut."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.conftest import sim_fleet
from tests.extproc.conftest import endpoints_yaml, start_stack

pytestmark = pytest.mark.timeout(120)

# the cuts below happen after about a second (a stalled body: after max_message_timeout, as the
# extproc may hold a request that long; the routes' maxWait of 1 s keeps it at the stack's base
# message timeout, 10 s); the answers that must survive last several
HEADERS_TIMEOUT = 1.0
BODY_IDLE_TIMEOUT = 1.0
LONG_TOKENS = 300  # ~3 s at --time-scale 1 (10 ms simulated per decode step)

CONFIG = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: open}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: capped}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  trafficPolicy: {maxDuration: 1s}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: open}
spec:
  modelName: demo-model
  queue: {maxWait: 1s}
  rules: [{targets: [{modelServerName: open}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: capped}
spec:
  modelName: capped-model
  queue: {maxWait: 1s}
  rules: [{targets: [{modelServerName: capped}]}]
"""


@pytest.fixture(scope="module")
def slow_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with sim_fleet(tmp_path_factory, "127.0.0.135", 1, "--time-scale", "1", logs="slow-sims") as f:
        yield f


@pytest.fixture(scope="module")
def timeout_stack(
    tmp_path_factory: pytest.TempPathFactory, slow_fleet: Fleet
) -> Iterator[GatewayStack]:
    config = tmp_path_factory.mktemp("timeouts-config")
    (config / "model.yaml").write_text(CONFIG)
    (config / "sims.yaml").write_text(endpoints_yaml(slow_fleet))
    s = start_stack(
        config,
        tmp_path_factory.mktemp("timeouts-run"),
        slow_fleet,
        request_headers_timeout=HEADERS_TIMEOUT,
        request_body_idle_timeout=BODY_IDLE_TIMEOUT,
    )
    try:
        yield s
    finally:
        s.stop()


def _connect(stack: GatewayStack) -> socket.socket:
    sock = socket.create_connection((stack.options.listen_host, stack.listen_port), timeout=30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (the socket's 30 s timeout
    fails the test if it never does)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def test_a_client_whose_headers_never_finish_is_disconnected(timeout_stack: GatewayStack) -> None:
    with _connect(timeout_stack) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")
        answer = _read_all(sock)
    # closed; Envoy may say 408 first
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer


def test_a_stalled_body_gets_408(timeout_stack: GatewayStack) -> None:
    body = json.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]})
    with _connect(timeout_stack) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"content-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body[:10].encode()
        )
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"error"' in answer  # the OpenAI-style error body


def test_a_long_stream_is_not_cut(timeout_stack: GatewayStack) -> None:
    client = OpenAI(base_url=timeout_stack.url, api_key="unused", max_retries=0, timeout=60)
    began = time.monotonic()
    stream = client.chat.completions.create(
        model="demo-model",
        messages=[{"role": "user", "content": "a long story"}],
        max_tokens=LONG_TOKENS,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    took = time.monotonic() - began
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].delta.content) == LONG_TOKENS
    # the premise: it outlasted the body idle and header timeouts (not a timing assertion on
    # the gateway: it says the test exercised what it means to)
    assert took > 2 * BODY_IDLE_TIMEOUT
    client.close()


def test_a_silent_unstreamed_answer_outlasts_the_body_idle_timeout(
    timeout_stack: GatewayStack,
) -> None:
    client = OpenAI(base_url=timeout_stack.url, api_key="unused", max_retries=0, timeout=60)
    began = time.monotonic()
    answer = client.chat.completions.create(
        model="demo-model",
        messages=[{"role": "user", "content": "a long story"}],
        max_tokens=LONG_TOKENS,
    )
    assert answer.choices[0].finish_reason == "length"
    assert time.monotonic() - began > 2 * BODY_IDLE_TIMEOUT  # the premise, as above
    client.close()


def test_model_server_max_duration_cuts_with_504(timeout_stack: GatewayStack) -> None:
    # the client sent everything: the gateway timed out waiting for the answer (504, not 408)
    client = OpenAI(base_url=timeout_stack.url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as cut:
        client.chat.completions.create(
            model="capped-model",
            messages=[{"role": "user", "content": "a long story"}],
            max_tokens=LONG_TOKENS,
        )
    assert cut.value.status_code == 504
    assert "max_duration_timeout" in str(cut.value)
    # a short one fits
    short = client.chat.completions.create(
        model="capped-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert short.choices[0].finish_reason == "length"
    client.close()
