"""The fair queue end to end: one small simulator pod kept saturated by a flooding heavy user; a
light user's requests wait in the gateway's queue but are served first (fair share), the queue
is bounded (429) and timed (503 + Retry-After), and a client that goes away leaves the queue."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from matrixinfer.process import ReadinessTimeout, wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric
from tests.conftest import sim_fleet
from tests.policies.conftest import KEYS, envoy_counter, keys_yaml, policy_stack, write_config

ROUTES = """
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
  queue: {maxQueued: 40, maxWait: 8s, priorityHeader: x-priority}
  rules: [{targets: [{modelServerName: small}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: tiny-queue}
spec:
  modelName: tiny-model
  queue: {maxQueued: 0, maxWait: 1s}
  rules: [{targets: [{modelServerName: small}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: impatient}
spec:
  modelName: impatient-model
  queue: {maxQueued: 10, maxWait: 300ms, priorityHeader: x-priority}
  rules: [{targets: [{modelServerName: small}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: past-base}
spec:
  modelName: past-base-model
  queue: {maxQueued: 40, maxWait: 1500ms, priorityHeader: x-priority}
  rules: [{targets: [{modelServerName: small}]}]
"""


@pytest.fixture(scope="module")
def queue_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    # one pod that runs 2 sequences at a time, 60 tokens take ~0.6 s
    with sim_fleet(
        tmp_path_factory, "127.0.0.80", 1, "--time-scale", "1", "--max-num-seqs", "2",
        logs="queue-sims",
    ) as fleet:  # fmt: skip
        config = tmp_path_factory.mktemp("queue-config")
        write_config(config, fleet, ROUTES)
        secrets = tmp_path_factory.mktemp("queue-secrets")
        (secrets / "keys.yaml").write_text(keys_yaml(KEYS))
        (secrets / "auth.yaml").write_text(f"apiKeysFile: {secrets / 'keys.yaml'}\n")
        stack = policy_stack(
            config,
            tmp_path_factory.mktemp("queue-run"),
            fleet,
            ("--auth-config", str(secrets / "auth.yaml")),
            # the generator's base timeout (1 s); queued requests are extended by the extproc up
            # to the max_message_timeout derived from maxWait (8 s)
            message_timeout_ms=None,
        )
        try:
            yield stack
        finally:
            stack.stop()


_clients: dict[tuple[str, str, float], OpenAI] = {}


def call(
    stack: GatewayStack,
    key: str,
    model: str,
    tokens: int = 8,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
) -> float:
    c = _clients.get((stack.url, key, timeout))
    if c is None:
        c = _clients[(stack.url, key, timeout)] = OpenAI(
            base_url=stack.url, api_key=key, max_retries=0, timeout=timeout
        )
    began = time.monotonic()
    c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "q"}],
        max_tokens=tokens,
        extra_headers=headers,
    )
    return time.monotonic() - began


def test_light_user_is_served_ahead_of_a_flood(queue_stack: GatewayStack) -> None:
    stop = threading.Event()
    heavy: list[float] = []
    errors: list[BaseException] = []

    threads = heavy_load(queue_stack, stop, 12, heavy, errors)
    try:
        wait_until(
            lambda: (
                metric(queue_stack, "matrixinfer_gateway_queue_length", model="busy-model") >= 4
            ),
            20,
            "the heavy user's flood queues in the gateway",
        )
        light = [call(queue_stack, "key-light", "busy-model", tokens=60) for _ in range(10)]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    light_p90 = statistics.quantiles(light, n=10)[-1]
    heavy_p50 = statistics.median(heavy)
    print(f"light p90 {light_p90 * 1000:.0f} ms, heavy p50 {heavy_p50 * 1000:.0f} ms")
    # the light user overtakes the queued flood: its slow tail is below the heavy user's median
    assert light_p90 < heavy_p50
    assert metric(queue_stack, "matrixinfer_gateway_queue_outcomes_total", result="dispatched") > 0


def heavy_load(
    stack: GatewayStack,
    stop: threading.Event,
    callers: int,
    served: list[float] | None = None,
    errors: list[BaseException] | None = None,
) -> list[threading.Thread]:
    """``callers`` started threads calling busy-model as the heavy user (60 tokens) in a closed
    loop until ``stop``: latencies go to ``served``; with ``errors`` a thread's error is collected
    there and ends that thread, without it API errors are ignored."""

    def load() -> None:
        while not stop.is_set():
            try:
                took = call(stack, "key-heavy", "busy-model", tokens=60)
            except BaseException as exc:  # collected, asserted by the caller
                if errors is None:
                    if isinstance(exc, openai.APIError):
                        continue
                    raise
                errors.append(exc)
                return
            if served is not None:
                served.append(took)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(callers)]
    for t in threads:
        t.start()
    return threads


def _saturate(stack: GatewayStack, stop: threading.Event) -> list[threading.Thread]:
    threads = heavy_load(stack, stop, 8)
    wait_until(
        lambda: metric(stack, "matrixinfer_gateway_queue_length", model="busy-model") >= 2,
        20,
        "the pod is saturated and requests queue",
    )
    return threads


def test_full_queue_429_and_timeout_503_and_disconnect(queue_stack: GatewayStack) -> None:
    stop = threading.Event()
    threads = _saturate(queue_stack, stop)
    try:
        with pytest.raises(openai.RateLimitError) as full:
            call(queue_stack, "key-light", "tiny-model")
        assert "maxQueued" in str(full.value)
        late = _times_out_in_the_queue(queue_stack)
        assert late.status_code == 503
        assert int(late.response.headers["retry-after"]) >= 1
        assert "maxWait" in str(late)
        # a client that gives up while queued leaves the queue at once
        assert _gives_up_while_queued(queue_stack), "no disconnected request left the queue"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    with urllib.request.urlopen(f"{queue_stack.extproc_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'matrixinfer_gateway_queue_wait_seconds_bucket{le="0.005",model="busy-model"' in text


def _times_out_in_the_queue(stack: GatewayStack, attempts: int = 5) -> openai.APIStatusError:
    """The 503 of a request that waited past its route's maxWait (300 ms). It asks for priority
    -5, behind the flood's queued requests: as the light user it would otherwise take the next
    free slot by fair share, and on a loaded machine one often frees within 300 ms. An attempt
    may still be served when a scrape happened to show the pod with room (or its metrics were
    unknown) as it arrived; it is repeated; a queue that never times out fails every attempt."""
    for _ in range(attempts):
        try:
            call(stack, "key-light", "impatient-model", headers={"x-priority": "-5"})
        except openai.InternalServerError as exc:
            return exc
    raise AssertionError(f"none of {attempts} requests timed out in the queue")


def _gives_up_while_queued(stack: GatewayStack, attempts: int = 5) -> bool:
    """A priority -5 request (behind everyone) whose client gives up after 1 s; True once such a
    request was queued and the disconnect removed it (``cancelled`` outcome). An attempt may miss
    on a loaded machine — served when the queue happened to be empty, or timed out before it was
    queued — so it is repeated; an entry the disconnect does not remove fails every attempt."""

    def cancelled() -> float:
        return metric(stack, "matrixinfer_gateway_queue_outcomes_total", result="cancelled")

    for _ in range(attempts):
        before = cancelled()

        def left(before: float = before) -> bool:
            return cancelled() > before

        try:
            call(stack, "key-light", "busy-model", timeout=1.0, headers={"x-priority": "-5"})
        except openai.APITimeoutError:
            with contextlib.suppress(ReadinessTimeout):
                wait_until(left, 5, "the disconnected request left")
                return True
    return False


def waited_longer_than(stack: GatewayStack, seconds: float) -> float:
    """Dispatched-or-not queue waits above ``seconds`` (histogram count minus that bucket)."""
    total = metric(stack, "matrixinfer_gateway_queue_wait_seconds_count", model="busy-model")
    below = metric(
        stack, "matrixinfer_gateway_queue_wait_seconds_bucket", model="busy-model", le=str(seconds)
    )
    return total - below


def test_requests_queued_past_the_base_message_timeout_succeed(queue_stack: GatewayStack) -> None:
    """The stack keeps the generator's 1 s base message timeout: requests that wait longer in the
    queue are still served, because the extproc extends Envoy's timeout for them."""
    timeouts_before = envoy_counter(queue_stack, "ext_proc", ".message_timeouts")
    long_before = waited_longer_than(queue_stack, 1.0)
    dispatched_before = metric(
        queue_stack, "matrixinfer_gateway_queue_outcomes_total", result="dispatched"
    )
    stop = threading.Event()
    served: list[float] = []
    errors: list[BaseException] = []

    threads = heavy_load(queue_stack, stop, 10, served, errors)
    try:
        # 10 callers on a pod serving 2 at a time (~0.6 s each): waits reach several seconds
        wait_until(
            lambda: waited_longer_than(queue_stack, 1.0) > long_before or bool(errors),
            30,
            "a request waited in the queue for longer than the 1 s base message timeout",
        )
        # maxWait 1.5 s > the base timeout; priority -5 stays behind the load: the answer is
        # the extproc's own 503 + Retry-After at maxWait, not Envoy's message timeout. (A scrape
        # that shows the pod with room at that instant lets a request through unqueued: retry.)
        late: openai.InternalServerError | None = None
        for _ in range(5):
            try:
                call(queue_stack, "key-light", "past-base-model", headers={"x-priority": "-5"})
            except openai.InternalServerError as exc:
                late = exc
                break
        assert late is not None, "no low-priority request was held in the queue past maxWait"
        assert late.status_code == 503
        assert int(late.response.headers["retry-after"]) >= 1
        assert "maxWait" in str(late) and "ext_proc_error" not in str(late)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    # the long waits ended in dispatch (served), not in Envoy's per-message timeout
    assert envoy_counter(queue_stack, "ext_proc", ".message_timeouts") == timeouts_before
    assert envoy_counter(queue_stack, "ext_proc", ".override_message_timeout_received") > 0
    assert envoy_counter(queue_stack, "ext_proc", ".override_message_timeout_ignored") == 0
    dispatched = metric(
        queue_stack, "matrixinfer_gateway_queue_outcomes_total", result="dispatched"
    )
    assert dispatched > dispatched_before
