"""LoRA placement end to end: the openai client -> Envoy -> extproc -> three simulator pods, an
adapter loaded on a subset of them at run time (issue #25 item 2)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.conftest import sim_fleet
from tests.extproc.conftest import endpoints_yaml, post_json, start_stack

pytestmark = pytest.mark.timeout(120)

# the ModelServer keeps the default scheduler profile: that is what users get
LORA_YAML = """
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
metadata: {name: adapters}
spec:
  modelName: demo-model
  loraAdapters: [sql, chat]
  rules: [{targets: [{modelServerName: pool}]}]
"""


@pytest.fixture(scope="module")
def lora_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # no adapter at start, two adapter slots per pod, as the demo's simulators
    with sim_fleet(
        tmp_path_factory, "127.0.0.85", 3, "--time-scale", "0.02", "--max-loras", "2",
        logs="lora-sims",
    ) as f:  # fmt: skip
        yield f


@pytest.fixture(scope="module")
def lora_stack(
    tmp_path_factory: pytest.TempPathFactory, lora_fleet: Fleet
) -> Iterator[GatewayStack]:
    config = tmp_path_factory.mktemp("lora-config")
    (config / "model.yaml").write_text(LORA_YAML)
    (config / "sims.yaml").write_text(endpoints_yaml(lora_fleet))
    stack = start_stack(config, tmp_path_factory.mktemp("lora-run"), lora_fleet)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(lora_stack: GatewayStack) -> Iterator[OpenAI]:
    c = OpenAI(base_url=lora_stack.url, api_key="unused", max_retries=0, timeout=20)
    yield c
    c.close()


def engine_post(url: str, body: dict[str, str]) -> None:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def load(fleet: Fleet, index: int, adapter: str) -> None:
    body = {"lora_name": adapter, "lora_path": f"/adapters/{adapter}"}
    engine_post(f"{fleet.pods[index].url}/v1/load_lora_adapter", body)


def unload(fleet: Fleet, index: int, adapter: str) -> None:
    engine_post(f"{fleet.pods[index].url}/v1/unload_lora_adapter", {"lora_name": adapter})


def loaded(stack: GatewayStack) -> dict[str, list[str] | None]:
    """What the gateway knows each pod has loaded."""
    return {p["name"]: p["metrics"]["loadedLoras"] for p in stack.state()["pods"]}


def wait_loaded(stack: GatewayStack, expected: dict[str, list[str]]) -> None:
    wait_until(
        lambda: loaded(stack) == expected, 30, f"the gateway sees adapters loaded as {expected}"
    )


def chat(client: OpenAI, model: str) -> str:
    """One chat completion; the pod that served it (a non-2xx answer raises)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": f"hello {uuid.uuid4().hex}"}],
        max_tokens=4,
    )
    assert raw.status_code == 200
    raw.parse()
    return str(raw.headers["x-inference-pod"])


def test_lora_requests_reach_only_pods_with_the_adapter(
    lora_stack: GatewayStack, lora_fleet: Fleet, client: OpenAI
) -> None:
    load(lora_fleet, 0, "sql")
    load(lora_fleet, 1, "sql")
    wait_loaded(lora_stack, {"sim-0": ["sql"], "sim-1": ["sql"], "sim-2": []})

    # sequential: the pod without the adapter answers 404 at once and looks least loaded; it must
    # never be picked (before the fix about a third of these went there)
    sequential = Counter(chat(client, "sql") for _ in range(30))
    assert set(sequential) <= {"sim-0", "sim-1"}, sequential

    # concurrent: about half went to the pod without the adapter before the fix
    with ThreadPoolExecutor(8) as pool:
        concurrent = Counter(pool.map(lambda _: chat(client, "sql"), range(40)))
    assert set(concurrent) <= {"sim-0", "sim-1"}, concurrent
    assert sum(concurrent.values()) == 40

    # requests for the base model still use every pod; which pods a batch reaches follows their
    # load as scraped, so batches go on until each pod has served one (at most 300 requests)
    base: Counter[str] = Counter()
    with ThreadPoolExecutor(6) as pool:
        for _ in range(10):
            base.update(pool.map(lambda _: chat(client, "demo-model"), range(30)))
            if set(base) == {"sim-0", "sim-1", "sim-2"}:
                break
    assert set(base) == {"sim-0", "sim-1", "sim-2"}, base


def test_adapter_loads_and_unloads_move_its_requests(
    lora_stack: GatewayStack, lora_fleet: Fleet, client: OpenAI
) -> None:
    load(lora_fleet, 2, "chat")
    wait_loaded(lora_stack, {"sim-0": ["sql"], "sim-1": ["sql"], "sim-2": ["chat"]})
    assert {chat(client, "chat") for _ in range(10)} == {"sim-2"}

    unload(lora_fleet, 1, "sql")  # the periodic read of /v1/models sees it
    wait_loaded(lora_stack, {"sim-0": ["sql"], "sim-1": [], "sim-2": ["chat"]})
    with ThreadPoolExecutor(6) as pool:
        served = Counter(pool.map(lambda _: chat(client, "sql"), range(20)))
    assert set(served) == {"sim-0"}, served


def test_adapter_no_pod_has_loaded_gets_a_clear_503(
    lora_stack: GatewayStack, lora_fleet: Fleet
) -> None:
    # "chat" is on sim-2 only: take sim-2's copy away, then nobody has it
    unload(lora_fleet, 2, "chat")
    wait_loaded(lora_stack, {"sim-0": ["sql"], "sim-1": [], "sim-2": []})
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(urllib.error.HTTPError) as e:
        post_json(f"{lora_stack.url}/chat/completions", body)
    assert e.value.code == 503
    text = e.value.read().decode()
    assert "LoRA adapter 'chat'" in text and "3 pods have not loaded it" in text, text
