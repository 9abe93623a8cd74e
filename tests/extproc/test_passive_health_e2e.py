"""Passive health end to end: a simulator pod that answers every request 500 is ejected after a
few attempts (Envoy's upstream log tells the extproc each attempt's outcome), no client request
fails meanwhile (Envoy retries on the fallbacks), the ejection shows in /debug/state and the
metrics, and the pod comes back once it answers again (half-open, then healthy)."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.conftest import sim_fleet
from tests.extproc.conftest import endpoints_yaml, start_stack

pytestmark = pytest.mark.timeout(180)

CONFIG = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: flaky}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  trafficPolicy:
    retry: {attempts: 2, retryOn: [5xx, connect-failure, reset]}
    passiveHealth:
      consecutiveFailures: 2
      baseEjectionTime: 3s
      maxEjectionTime: 30s
      maxEjectionPercent: 50
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: flaky}
spec:
  modelName: demo-model
  rules: [{targets: [{modelServerName: flaky}]}]
"""


@pytest.fixture(scope="module")
def health_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with sim_fleet(
        tmp_path_factory, "127.0.0.130", 3, "--time-scale", "0.01", logs="health-sims"
    ) as f:
        yield f


@pytest.fixture(scope="module", params=["grpc", "h2"])
def health_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, health_fleet: Fleet
) -> Iterator[GatewayStack]:
    """The stack with either ext_proc transport (each serves Envoy's access-log streams too)."""
    config = tmp_path_factory.mktemp("health-config")
    (config / "model.yaml").write_text(CONFIG)
    (config / "sims.yaml").write_text(endpoints_yaml(health_fleet))
    s = start_stack(
        config, tmp_path_factory.mktemp("health-run"), health_fleet, transport=request.param
    )
    try:
        yield s
    finally:
        s.stop()


def _fault(pod: Any, **fault: float) -> None:
    req = urllib.request.Request(
        f"http://{pod.address}/sim/fault",
        data=json.dumps(fault).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5):
        pass


def _chat(client: OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="demo-model",
        messages=[{"role": "user", "content": f"hello {uuid.uuid4().hex}"}],
        max_tokens=2,
    )
    raw.parse()
    return str(raw.headers["x-inference-pod"])


def _server(stack: GatewayStack) -> dict[str, Any]:
    state = stack.state()
    return next(s for s in state["modelServers"] if s["key"].endswith("flaky"))


def _metric(stack: GatewayStack, name: str) -> float:
    with urllib.request.urlopen(f"{stack.extproc_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_failing_pod_is_ejected_without_failing_clients_and_returns(
    health_stack: GatewayStack, health_fleet: Fleet
) -> None:
    bad = health_fleet.pods[1]
    client = OpenAI(base_url=health_stack.url, api_key="unused", max_retries=0, timeout=20)
    try:
        _fault(bad, error_rate=1.0)
        sent = 0
        while bad.name not in _server(health_stack)["ejected"]:
            served = _chat(client)  # raises on any failed request
            assert served != bad.name
            sent += 1
            assert sent <= 30, "the failing pod was not ejected within 30 requests"
        state = health_stack.state()
        health = state["passiveHealth"][bad.address]
        assert health["state"] == "ejected" and health["ejectionsInARow"] == 1
        labels = f'{{pod="{bad.name}",server="flaky"}}'
        assert _metric(health_stack, f"matrixinfer_gateway_pod_ejections_total{labels}") == 1
        assert _metric(health_stack, "matrixinfer_gateway_pods_ejected") == 1
        # ejected: it is no candidate (nor a fallback), so nothing is even tried there
        picks = f"matrixinfer_gateway_pod_picks_total{labels}"
        picks_before = _metric(health_stack, picks)
        for _ in range(10):
            assert _chat(client) != bad.name
        assert _metric(health_stack, picks) == picks_before
        # it recovers: after the ejection, one request at a time tries it (half-open); a
        # success makes it a candidate like the others
        _fault(bad, error_rate=0.0)

        def served_again() -> bool:
            return _chat(client) == bad.name

        wait_until(served_again, 60, "the recovered pod serving again", interval=0.1)
        wait_until(
            lambda: (
                bad.address not in health_stack.state()["passiveHealth"]
                and not _server(health_stack)["ejected"]
            ),
            10,
            "the pod healthy again",
        )
        assert _metric(health_stack, "matrixinfer_gateway_pods_ejected") == 0
    finally:
        _fault(bad, error_rate=0.0)
        client.close()
