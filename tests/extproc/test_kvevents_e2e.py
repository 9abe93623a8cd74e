"""Precise prefix routing end to end: openai client -> Envoy -> extproc -> simulator pods that
publish KV events, with the gateway subscribed to them."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from matrixinfer.process import free_port, wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.conftest import sim_fleet
from tests.extproc.conftest import endpoints_yaml, start_stack

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.94"


def model_yaml(port: int, replay_port: int) -> str:
    return f"""
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: pool}}
spec:
  inferenceEngine: vLLM
  workloadSelector: {{matchLabels: {{app: sim}}}}
  workloadPort: {{port: 8000}}
  kvEvents: {{port: {port}, replayPort: {replay_port}, hashSeed: "7"}}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: demo}}
spec:
  modelName: demo-model
  rules: [{{targets: [{{modelServerName: pool}}]}}]
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    port, replay = free_port(HOST), free_port(HOST)
    events = json.dumps({
        "enable_kv_cache_events": True, "publisher": "zmq",
        "endpoint": f"tcp://*:{port}", "replay_endpoint": f"tcp://*:{replay}",
    })  # fmt: skip
    old = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "7"  # the engines' seed: kvEvents.hashSeed
    try:
        with sim_fleet(
            tmp_path_factory, HOST, 2, "--time-scale", "0.02", "--kv-events-config", events,
            logs="kv-sims",
        ) as f:  # fmt: skip
            f.kv_ports = (port, replay)  # type: ignore[attr-defined]
            yield f
    finally:
        if old is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = old


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fleet: Fleet) -> Iterator[GatewayStack]:
    d = tmp_path_factory.mktemp("kv-config")
    (d / "model.yaml").write_text(model_yaml(*fleet.kv_ports))  # type: ignore[attr-defined]
    (d / "sims.yaml").write_text(endpoints_yaml(fleet))
    s = start_stack(d, tmp_path_factory.mktemp("kv-run"), fleet)
    try:
        yield s
    finally:
        s.stop()


def kv_blocks(stack: GatewayStack, pod: str) -> int:
    pods: dict[str, Any] = stack.state()["kvEvents"]["pods"]
    return int(pods.get(pod, {}).get("blocks", 0))


def chat(client: OpenAI, content: str) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="demo-model", messages=[{"role": "user", "content": content}], max_tokens=2
    )
    return str(raw.headers["x-inference-pod"])


def direct(url: str, path: str, body: dict[str, Any] | None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url + path, data, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def test_requests_follow_the_blocks_the_engines_report(stack: GatewayStack, fleet: Fleet) -> None:
    client = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)
    try:
        names = [p.name for p in fleet.pods]
        wait_until(
            lambda: set(names) <= set(stack.state()["kvEvents"]["pods"]), 20, "subscriptions"
        )
        prompt = " ".join(f"shared{i} context words" for i in range(120))  # ~600 tokens
        first = chat(client, prompt)
        wait_until(lambda: kv_blocks(stack, first) >= 20, 20, "the first pod's blocks indexed")
        # the same conversation goes back to the pod that holds its blocks
        assert {chat(client, prompt) for _ in range(4)} == {first}

        # that pod's cache is reset (as an eviction would); the other pod gets the prompt from
        # elsewhere (say another gateway replica): only the engines' events tell the gateway
        other = next(p for p in fleet.pods if p.name != first)
        holder = next(p for p in fleet.pods if p.name == first)
        direct(holder.url, "/reset_prefix_cache", None)
        direct(other.url, "/v1/chat/completions", {
            "model": "demo-model", "max_tokens": 2,
            "messages": [{"role": "user", "content": prompt}],
        })  # fmt: skip
        wait_until(
            lambda: kv_blocks(stack, first) == 0 and kv_blocks(stack, other.name) >= 20,
            20,
            "the reset and the other pod's blocks indexed",
        )
        assert {chat(client, prompt) for _ in range(4)} == {other.name}
        state = stack.state()["kvEvents"]
        assert state["blocks"] >= 20 and state["pods"][other.name]["lagSeconds"] is not None
        with urllib.request.urlopen(f"{stack.extproc_url}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert "matrixinfer_kv_index_blocks " in metrics
        assert f'matrixinfer_kv_events_lag_seconds{{pod="{other.name}"}}' in metrics
    finally:
        client.close()
