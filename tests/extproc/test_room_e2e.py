"""Overload without a fair queue, end to end (Envoy + extproc, no policies, the official openai
client): one simulator pod that runs 2 sequences at a time, behind a saturation filter that
counts it full at 1 waiting request. A burst of requests that finds it saturated waits in the
extproc's line for room — well past Envoy's base message timeout (1 s), which the extproc extends
— and every request is served, none refused; the waiters show in /debug/state and in the
ModelServer's waiting-requests gauge. A route whose queue.maxWait runs out first gets 503 with
Retry-After."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from matrixinfer.testing.metrics import metric
from sim.fleet import Fleet
from tests.conftest import sim_fleet
from tests.extproc.conftest import endpoints_yaml

WAITING = "matrixinfer_gateway_server_waiting_requests"
CONFIG = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: small}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  scheduler:
    filters: [{name: ready}, {name: saturation, args: {maxWaiting: 1}}]
    scorers: [{name: least-request, weight: 1}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: busy}
spec:
  modelName: busy-model
  rules: [{targets: [{modelServerName: small}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: impatient}
spec:
  modelName: impatient-model
  queue: {maxWait: 500ms}
  rules: [{targets: [{modelServerName: small}]}]
"""


@pytest.fixture(scope="module")
def room_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    # one pod that runs 2 sequences at a time; 40 tokens take ~0.4 s
    with sim_fleet(
        tmp_path_factory, "127.0.0.180", 1, "--time-scale", "1", "--max-num-seqs", "2",
        logs="room-sims",
    ) as fleet:  # fmt: skip
        config = tmp_path_factory.mktemp("room-config")
        (config / "model.yaml").write_text(CONFIG)
        (config / "sims.yaml").write_text(endpoints_yaml(fleet))
        opts = StackOptions(
            scrape_interval=0.1,
            config_poll=0.1,
            envoy_concurrency=1,
            message_timeout_ms=1000,  # the product's base: the wait must extend it
        )
        stack = GatewayStack(config, tmp_path_factory.mktemp("room-run"), opts).start()
        try:
            wait_until(stack.extproc_ready, 60, "extproc ready")
            ready_pods(stack, fleet)
            yield stack
        finally:
            stack.stop()


def ready_pods(stack: GatewayStack, fleet: Fleet) -> None:
    addresses = {p.address for p in fleet.pods}
    wait_until(lambda: addresses <= stack.envoy_hosts(), 30, "the pod known to Envoy")


def client(stack: GatewayStack) -> OpenAI:
    return OpenAI(base_url=stack.url, api_key="x", max_retries=0, timeout=60)


def chat(c: OpenAI, model: str, tokens: int) -> Any:
    return c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "q"}], max_tokens=tokens
    )


def line_for_room(stack: GatewayStack) -> list[dict[str, Any]]:
    waiting: dict[str, Any] = stack.state()["waiting"]
    line: list[dict[str, Any]] = waiting.get("default/small", {}).get("forRoom", [])
    return line


def test_a_burst_on_a_saturated_pod_waits_for_room_and_is_served(room_stack: GatewayStack) -> None:
    c = client(room_stack)
    with ThreadPoolExecutor(12) as pool:
        answers = [pool.submit(chat, c, "busy-model", 40) for _ in range(12)]
        wait_until(lambda: len(line_for_room(room_stack)) >= 3, 30, "requests waiting for room")
        wait_until(
            lambda: metric(room_stack, WAITING, server="small") >= 1.0,
            30,
            "the waiting requests in the ModelServer's gauge",
        )
        errors = [a.exception(timeout=60) for a in answers]
    assert errors == [None] * 12, errors  # none refused with 503 "saturated"
    for a in answers:
        reply = a.result()
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    wait_until(lambda: not line_for_room(room_stack), 10, "the line empty")
    assert metric(room_stack, WAITING, server="small") == 0.0


def test_a_wait_past_its_routes_max_wait_is_503_with_retry_after(room_stack: GatewayStack) -> None:
    c = client(room_stack)
    stop = threading.Event()
    errors: list[BaseException] = []

    def flood() -> None:  # keeps the pod saturated and others in the line for room
        while not stop.is_set():
            try:
                chat(c, "busy-model", 200)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(line_for_room(room_stack)) >= 3, 30, "a line for room")
        with pytest.raises(openai.InternalServerError) as err:
            chat(c, "impatient-model", 3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after"] == "1"
    body = err.value.response.json()["error"]
    assert body["code"] == "no_pod_available"
    assert "stayed saturated for 0.5s" in body["message"], body
    assert errors == []  # the flood itself waited and was served
