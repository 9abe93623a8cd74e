"""Prefill/decode serving end to end: client -> Envoy -> extproc (pairing) -> the decode pod's PD
proxy (runtime.pd_proxy, its own process on the decode pod's address) -> prefill simulator, then
the decode simulator. One ModelServer per connector the simulator speaks: vLLM NIXL style and
SGLang bootstrap."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from fleet.pd import PREFILL_HEADER
from matrixinfer.process import Child, free_port, http_ok, wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet, SimPod
from tests.extproc.conftest import start_stack

pytestmark = pytest.mark.timeout(120)

PROMPT = " ".join(f"word{i}" for i in range(200))
SIM_ARGS = ("--time-scale", "0.02")


@dataclass
class PDSet:
    """One ModelServer's pods: prefill simulators, one decode simulator and its PD proxy."""

    connector: str
    prefill: Fleet
    decode: Fleet
    proxy: Child
    proxy_address: str

    @property
    def decode_pod(self) -> SimPod:
        return self.decode.pods[0]


def start_set(tmp: Path, connector: str, engine: str, first_host: str, n_prefill: int) -> PDSet:
    base = [*SIM_ARGS, "--engine", engine]
    prefill = Fleet(
        n_prefill, port=free_port(first_host), first_host=first_host, name_prefix=f"{connector}-p",
        args=[*base, "--role", "prefill"], log_dir=tmp,
    ).start()  # fmt: skip
    decode_host = f"{first_host.rsplit('.', 1)[0]}.{int(first_host.rsplit('.', 1)[1]) + n_prefill}"
    decode = Fleet(
        1, port=free_port(decode_host), first_host=decode_host, name_prefix=f"{connector}-d",
        args=[*base, "--role", "decode"], log_dir=tmp,
    ).start()  # fmt: skip
    port = free_port(decode_host)
    pod = decode.pods[0]
    proxy = Child(
        f"pd-proxy-{connector}",
        [sys.executable, "-m", "runtime.pd_proxy", "--engine", pod.url, "--host", decode_host,
         "--port", str(port), "--connector", connector, "--pod-name", pod.name,
         "--prefill-timeout", "5s"],
        log_path=tmp / f"pd-proxy-{connector}.log",
        ready=lambda: http_ok(f"http://{decode_host}:{port}/health"),
    ).start()  # fmt: skip
    return PDSet(connector, prefill, decode, proxy, f"{decode_host}:{port}")


def server_yaml(s: PDSet, engine: str) -> str:
    return f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: pd-{s.connector}}}
spec:
  model: demo-model
  inferenceEngine: {engine}
  workloadSelector:
    matchLabels: {{set: {s.connector}}}
    pdGroup: {{groupKey: group, prefillLabels: {{role: prefill}}, decodeLabels: {{role: decode}}}}
  workloadPort: {{port: 8000}}
  kvConnector: {{type: {s.connector}}}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: pd-{s.connector}}}
spec:
  modelName: {s.connector}-model
  rules: [{{targets: [{{modelServerName: pd-{s.connector}}}]}}]
"""


def endpoints(s: PDSet) -> list[str]:
    out = [
        f"  - {{name: {p.name}, address: '{p.address}', "
        f"labels: {{set: {s.connector}, role: prefill, group: g0}}}}"
        for p in s.prefill.pods
    ]
    out.append(
        f"  - {{name: {s.decode_pod.name}, address: '{s.proxy_address}', "
        f"labels: {{set: {s.connector}, role: decode, group: g0}}}}"
    )
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PDSet]]:
    logs = tmp_path_factory.mktemp("pd-pods")
    made: list[PDSet] = []
    try:
        made.append(start_set(logs, "nixl", "vllm", "127.0.0.90", 2))
        made.append(start_set(logs, "sglang", "sglang", "127.0.0.95", 2))
        yield {s.connector: s for s in made}
    finally:
        for s in made:
            s.proxy.stop()
            s.decode.stop()
            s.prefill.stop()


@pytest.fixture(scope="module")
def pd_stack(
    tmp_path_factory: pytest.TempPathFactory, sets: dict[str, PDSet]
) -> Iterator[GatewayStack]:
    d = tmp_path_factory.mktemp("pd-config")
    nixl, sglang = sets["nixl"], sets["sglang"]
    (d / "model.yaml").write_text(
        server_yaml(nixl, "vLLM") + "---\n" + server_yaml(sglang, "SGLang")
    )
    lines = ["apiVersion: gateway.matrixinfer.ai/v1alpha1", "kind: Endpoints",
             "metadata: {name: pd}", "spec:", "  endpoints:", *endpoints(nixl),
             *endpoints(sglang)]  # fmt: skip
    (d / "pods.yaml").write_text("\n".join(lines) + "\n")
    addresses = [p.address for s in sets.values() for p in s.prefill.pods]
    addresses += [s.proxy_address for s in sets.values()]
    fake_fleet: Any = SimpleNamespace(pods=[SimpleNamespace(address=a) for a in addresses])
    s = start_stack(d, tmp_path_factory.mktemp("pd-run"), fake_fleet)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(pd_stack: GatewayStack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=pd_stack.url, api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def sim_state(pod: SimPod) -> dict[str, Any]:
    return get_json(f"{pod.url}/sim/state")


def proxy_state(s: PDSet) -> dict[str, Any]:
    return get_json(f"http://{s.proxy_address}/debug/state")


def proxy_metric(s: PDSet, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{s.proxy_address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def totals(pods: list[SimPod]) -> dict[str, int]:
    keys = ("requests", "generation_tokens", "prefill_computed_tokens", "kv_transfers")
    out = dict.fromkeys(keys, 0)
    for p in pods:
        st = sim_state(p)
        for k in keys:
            out[k] += int(st[k])
    return out


def prefill_addresses(s: PDSet) -> set[str]:
    return {p.address for p in s.prefill.pods}


def ask(client: openai.OpenAI, model: str, *, stream: bool, headers: dict[str, str] | None = None
        ) -> str:  # fmt: skip
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    if stream:
        chunks = client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, stream=True, extra_headers=headers,
        )  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, extra_headers=headers,
    )  # fmt: skip
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    return answer.choices[0].message.content or ""


@pytest.mark.parametrize("connector", ["nixl", "sglang"])
def test_chat_and_stream_are_prefilled_on_a_prefill_pod_and_decoded_on_the_decode_pod(
    client: openai.OpenAI, sets: dict[str, PDSet], connector: str
) -> None:
    s = sets[connector]
    prefill_before = totals(s.prefill.pods)
    decode_before = totals([s.decode_pod])
    paired_before = proxy_metric(s, "matrixinfer_pd_requests_total", outcome="paired")
    for stream in (False, True):
        assert ask(client, f"{connector}-model", stream=stream)
    prefill = totals(s.prefill.pods)
    decode = totals([s.decode_pod])
    # the prefill pods prefilled both prompts and generated one token each: no decoding
    assert prefill["requests"] - prefill_before["requests"] == 2
    assert prefill["generation_tokens"] - prefill_before["generation_tokens"] == 2
    assert prefill["prefill_computed_tokens"] - prefill_before["prefill_computed_tokens"] > 200
    # the decode pod received both prompts' KV cache and computed at most their last token
    assert decode["kv_transfers"] - decode_before["kv_transfers"] == 2
    assert decode["generation_tokens"] - decode_before["generation_tokens"] == 12
    assert decode["prefill_computed_tokens"] - decode_before["prefill_computed_tokens"] <= 2
    # the pair is in the proxy's /debug/state and metrics
    recent = proxy_state(s)["recent"][-2:]
    assert all(h["outcome"] == "paired" and h["prefill"] in prefill_addresses(s) for h in recent)
    assert all(h["decode"] == s.decode_pod.name and h["handoffSeconds"] > 0 for h in recent)
    assert proxy_metric(s, "matrixinfer_pd_requests_total", outcome="paired") == paired_before + 2
    assert proxy_metric(s, "matrixinfer_pd_handoff_seconds_count", connector=connector) >= 2


def test_a_forged_prefill_header_is_overwritten_by_the_gateway(
    client: openai.OpenAI, sets: dict[str, PDSet]
) -> None:
    s = sets["nixl"]
    before = proxy_metric(s, "matrixinfer_pd_prefill_retries_total")
    assert ask(client, "nixl-model", stream=False, headers={PREFILL_HEADER: "127.0.0.1:9"})
    last = proxy_state(s)["recent"][-1]
    assert last["outcome"] == "paired" and last["prefill"] in prefill_addresses(s)
    assert last["attempts"] == []  # the forged address was never tried
    assert proxy_metric(s, "matrixinfer_pd_prefill_retries_total") == before


def proxy_chat(s: PDSet, prefill_header: str) -> dict[str, Any]:
    """A request straight to the PD proxy with the given prefill header (as Envoy sends it)."""
    body = {"model": "demo-model", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 4}  # fmt: skip
    req = urllib.request.Request(
        f"http://{s.proxy_address}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"content-type": "application/json", PREFILL_HEADER: prefill_header},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        data: dict[str, Any] = json.loads(resp.read())
        return data


@pytest.mark.parametrize("connector", ["nixl", "sglang"])
def test_a_dead_prefill_pod_is_retried_then_served_aggregated(
    sets: dict[str, PDSet], connector: str
) -> None:
    s = sets[connector]
    dead = f"{s.decode_pod.host}:{free_port(s.decode_pod.host)}"  # nothing listens there
    live = s.prefill.pods[0].address
    retries = proxy_metric(s, "matrixinfer_pd_prefill_retries_total")
    fallbacks = proxy_metric(s, "matrixinfer_pd_fallbacks_total", reason="prefill_failed")
    transfers = totals([s.decode_pod])["kv_transfers"]

    # the first prefill pod is down: retried on the next one, still a PD handoff
    assert proxy_chat(s, f"{dead},{live}")["usage"]["completion_tokens"] == 4
    last = proxy_state(s)["recent"][-1]
    assert last["outcome"] == "paired" and last["prefill"] == live
    assert last["attempts"] and last["attempts"][0].startswith(dead)
    assert proxy_metric(s, "matrixinfer_pd_prefill_retries_total") == retries + 1
    # (sglang sends the decode request with each prefill attempt and cancels it when the prefill
    # fails: the simulator may have counted the cancelled one's transfer)
    exact = connector != "sglang"
    transferred = totals([s.decode_pod])["kv_transfers"]
    assert transferred == transfers + 1 if exact else transferred >= transfers + 1

    # both down: the decode engine serves the request alone, counted
    assert proxy_chat(s, f"{dead},{dead}")["usage"]["completion_tokens"] == 4
    last = proxy_state(s)["recent"][-1]
    assert last["outcome"] == "fallback" and last["prefill"] is None
    assert len(last["attempts"]) == 2
    assert proxy_metric(s, "matrixinfer_pd_fallbacks_total", reason="prefill_failed") == (
        fallbacks + 1
    )
    if exact:
        assert totals([s.decode_pod])["kv_transfers"] == transferred  # no transfer this time


def test_a_killed_prefill_pod_fails_no_request(
    client: openai.OpenAI, sets: dict[str, PDSet], pd_stack: GatewayStack
) -> None:
    s = sets["nixl"]
    s.prefill.kill(0)
    try:
        for i in range(6):
            assert ask(client, "nixl-model", stream=bool(i % 2))
        recent = proxy_state(s)["recent"][-6:]
        assert all(h["prefill"] in (None, s.prefill.pods[1].address) for h in recent)
    finally:
        s.prefill.restart(0)
        name = s.prefill.pods[0].name
        wait_until(
            lambda: any(p["name"] == name and p["ready"] for p in pd_stack.state()["pods"]),
            30,
            f"{name} ready again",
        )


def test_a_client_that_goes_away_cancels_the_decode(sets: dict[str, PDSet]) -> None:
    s = sets["nixl"]
    from tests.sim.conftest import metrics, sample

    def aborted() -> float:
        fams = metrics(s.decode_pod)
        try:
            return sample(fams, "vllm:request_success_total", finished_reason="abort")
        except KeyError:
            return 0.0

    before = aborted()
    c = openai.OpenAI(base_url=f"http://{s.proxy_address}/v1", api_key="x", max_retries=0,
                      timeout=30)  # fmt: skip
    stream = c.chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": PROMPT}], max_tokens=2000,
        stream=True, extra_headers={PREFILL_HEADER: s.prefill.pods[1].address},
    )  # fmt: skip
    next(iter(stream))
    stream.close()
    c.close()
    wait_until(lambda: aborted() >= before + 1, 20, "the decode engine aborted the request")
