"""Scale from zero through the gateway, end to end (Envoy + extproc, no policies, the official
openai client): a request for a ModelServer with no pod waits in the extproc while its first pod
is created and starts (a simulator with --slow-start), counts as the ModelServer's waiting demand
meanwhile, and is answered once the pod is ready — well past Envoy's base message timeout (1 s),
which the extproc extends while the request waits. A ModelServer whose pod never comes answers
503 with Retry-After after its route's queue.maxWait.

The test plays the cluster's part: it creates the pod (not ready while the simulator's /health
answers 503) and marks it ready once /health answers 200, as the local stack's pod watcher does."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from matrixinfer.process import ReadinessTimeout, wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from matrixinfer.testing.metrics import metric
from sim.fleet import Fleet, SimPod
from tests.conftest import sim_fleet

WAITING = "matrixinfer_gateway_server_waiting_requests"
CONFIG = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: sleepy}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sleepy}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: sleepy}
spec:
  modelName: sleepy-model
  queue: {maxWait: 30s}
  rules: [{targets: [{modelServerName: sleepy}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: never}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: never}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: never}
spec:
  modelName: never-model
  queue: {maxWait: 2s}
  rules: [{targets: [{modelServerName: never}]}]
"""


def endpoints(pod: SimPod | None, ready: bool) -> str:
    head = "apiVersion: gateway.matrixinfer.ai/v1alpha1\nkind: Endpoints\nmetadata: {name: pods}\n"
    if pod is None:
        return head + "spec: {endpoints: []}\n"
    flag = "true" if ready else "false"
    return (
        head + f"spec:\n  endpoints:\n  - {{name: {pod.name}, address: '{pod.address}', "
        f"ready: {flag}, labels: {{app: sleepy}}}}\n"
    )


@pytest.fixture(scope="module")
def sleepy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One simulator, not started: its /health answers 503 for 2 s once it is."""
    fleet = sim_fleet(
        tmp_path_factory, "127.0.0.170", 1, "--time-scale", "0.02", "--slow-start", "2s",
        logs="sleepy", name_prefix="sleepy",
    )  # fmt: skip
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayStack, Path]]:
    config_dir = tmp_path_factory.mktemp("wake-config")
    (config_dir / "model.yaml").write_text(CONFIG)
    (config_dir / "pods.yaml").write_text(endpoints(None, False))
    opts = StackOptions(
        scrape_interval=0.1,
        config_poll=0.1,
        envoy_concurrency=1,
        request_body_idle_timeout=1.0,  # a waiting request is silent: the wait outlasts it
        message_timeout_ms=1000,  # the product's base: the wait must extend it
    )
    s = GatewayStack(config_dir, tmp_path_factory.mktemp("wake-run"), opts).start()
    try:
        wait_until(s.extproc_ready, 60, "extproc ready")
        yield s, config_dir
    finally:
        s.stop()


def healthy(pod: SimPod) -> bool:
    try:
        with urllib.request.urlopen(f"{pod.url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_a_request_at_zero_waits_for_the_first_pod_and_is_answered(
    stack: tuple[GatewayStack, Path], sleepy: Fleet
) -> None:
    s, config_dir = stack
    pod = sleepy.pods[0]
    client = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=60)
    with ThreadPoolExecutor(1) as pool:
        answer: Future[openai.types.chat.ChatCompletion] = pool.submit(
            client.chat.completions.create,
            model="sleepy-model",
            messages=[{"role": "user", "content": "wake up"}],
            max_tokens=3,
        )
        try:
            wait_until(
                lambda: metric(s, WAITING, server="sleepy") == 1.0,
                30,
                "the request counted as the ModelServer's waiting demand",
            )
        except ReadinessTimeout:
            raise AssertionError(f"{answer.done() and answer.exception()}") from None
        # the cluster creates the pod: listed, not ready while the engine starts
        (config_dir / "pods.yaml").write_text(endpoints(pod, ready=False))
        starting = threading.Thread(target=sleepy.start)
        starting.start()
        wait_until(lambda: pod.address in s.envoy_hosts(), 30, "the new pod known to Envoy")
        assert not answer.done()
        starting.join(60)
        assert healthy(pod)
        assert not answer.done() and metric(s, WAITING, server="sleepy") == 1.0
        (config_dir / "pods.yaml").write_text(endpoints(pod, ready=True))
        reply = answer.result(timeout=30)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert metric(s, WAITING, server="sleepy") == 0.0


def test_no_pod_within_max_wait_is_503_with_retry_after(
    stack: tuple[GatewayStack, Path],
) -> None:
    s, _ = stack
    client = OpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(
            model="never-model", messages=[{"role": "user", "content": "hello?"}], max_tokens=3
        )
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after"] == "1"
    body = err.value.response.json()["error"]
    assert body["code"] == "no_pod_available"
    assert "'never'" in body["message"] and "2s" in body["message"]
    assert metric(s, WAITING, server="never") == 0.0
