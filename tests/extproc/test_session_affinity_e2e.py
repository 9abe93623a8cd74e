"""Session affinity end to end: openai client -> Envoy -> extproc (default profile) -> sims.

A conversation (the ``x-session-id`` header, else the body's ``user`` field) stays on the pod that
served it first, even when that pod is busier than the others, until the saturation filter takes
the pod out; then it moves to another pod and stays there."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet, SimPod
from tests.conftest import sim_fleet
from tests.extproc.conftest import endpoints_yaml, start_stack

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.97"
MODEL_YAML = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: pool}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: demo}
spec:
  modelName: demo-model
  rules: [{targets: [{modelServerName: pool}]}]
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # four running sequences per pod: further requests wait, and the scraper sees them waiting
    with sim_fleet(
        tmp_path_factory, HOST, 3, "--time-scale", "1", "--max-num-seqs", "4", logs="sa-sims"
    ) as f:
        yield f


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fleet: Fleet) -> Iterator[GatewayStack]:
    d = tmp_path_factory.mktemp("sa-config")
    (d / "model.yaml").write_text(MODEL_YAML)
    (d / "sims.yaml").write_text(endpoints_yaml(fleet))
    s = start_stack(d, tmp_path_factory.mktemp("sa-run"), fleet)
    try:
        yield s
    finally:
        s.stop()


def chat(client: OpenAI, *, session: str | None = None, user: str | None = None) -> str:
    """One short request with a fresh prompt (no prefix to follow); the pod that served it."""
    extra: dict[str, Any] = {}
    if session is not None:
        extra["extra_headers"] = {"x-session-id": session}
    if user is not None:
        extra["user"] = user
    raw = client.chat.completions.with_raw_response.create(
        model="demo-model",
        messages=[{"role": "user", "content": f"hello {uuid.uuid4().hex}"}],
        max_tokens=1,
        **extra,
    )
    return str(raw.headers["x-inference-pod"])


def occupy(pod: SimPod, n: int) -> None:
    """``n`` long requests straight to the pod (not through the gateway); past its 4 running
    sequences they wait. They end when the fleet stops."""

    def one() -> None:
        body = {"model": "demo-model", "prompt": "busy", "max_tokens": 4000, "ignore_eos": True}
        headers = {"content-type": "application/json"}
        data = json.dumps(body).encode()
        req = urllib.request.Request(f"{pod.url}/v1/completions", data, headers)
        try:
            with urllib.request.urlopen(req, timeout=110) as resp:
                resp.read()
        except OSError:
            pass

    for _ in range(n):
        threading.Thread(target=one, daemon=True).start()


def scraped(stack: GatewayStack, pod: str, metric: str) -> int:
    for p in stack.state()["pods"]:
        if p["name"] == pod:
            return int(p["metrics"][metric] or 0)
    return 0


def test_a_session_stays_on_its_pod_until_the_pod_saturates(
    stack: GatewayStack, fleet: Fleet
) -> None:
    client = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=30)
    try:
        first = chat(client, session="conv-1")
        by_user = chat(client, user="alice")
        pods = {p.name: p for p in fleet.pods}
        # the session's pod gets busier than the others (3 of its 4 sequences running, nothing
        # waiting): least-request alone would now send fresh prompts elsewhere
        occupy(pods[first], 3)
        wait_until(lambda: scraped(stack, first, "running") >= 3, 20, f"{first} busy")
        assert chat(client) != first  # no session: the least loaded pod
        assert {chat(client, session="conv-1") for _ in range(4)} == {first}
        assert {chat(client, user="alice") for _ in range(3)} == {by_user}

        # the pod saturates (waiting >= 8): the session moves, then stays where it moved
        occupy(pods[first], 9)
        wait_until(lambda: scraped(stack, first, "waiting") >= 8, 20, f"{first} saturated")
        moved = chat(client, session="conv-1")
        assert moved != first
        assert {chat(client, session="conv-1") for _ in range(3)} == {moved}
    finally:
        client.close()
