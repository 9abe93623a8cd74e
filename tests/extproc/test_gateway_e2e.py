"""The gateway end to end: the openai client -> Envoy -> extproc -> simulator pods."""

from __future__ import annotations

import collections
import http.client
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.extproc.conftest import BODY_LIMIT, post_json

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def client(stack: GatewayStack) -> Iterator[OpenAI]:
    c = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)
    yield c
    c.close()


def chat(
    client: OpenAI,
    model: str = "demo-model",
    content: str | None = None,
    headers: dict[str, str] | None = None,
    max_tokens: int = 4,
) -> tuple[str, Any]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": content or f"hello {uuid.uuid4().hex}"}],
        max_tokens=max_tokens,
        extra_headers=headers or {},
    )
    return raw.headers["x-inference-pod"], raw.parse()


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def raw_post(url: str, body: bytes) -> Reply:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.headers, exc.read())


def picks(stack: GatewayStack) -> dict[str, int]:
    with urllib.request.urlopen(f"{stack.extproc_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, int] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("matrixinfer_gateway_pod_picks_total{"):
            pod = line.split('pod="', 1)[1].split('"', 1)[0]
            out[pod] += int(float(line.rsplit(" ", 1)[1]))
    return dict(out)


def pod_state(stack: GatewayStack, name: str) -> dict[str, Any]:
    for pod in stack.state()["pods"]:
        if pod["name"] == name:
            return dict(pod)
    raise AssertionError(f"pod {name} not in /debug/state")


# ------------------------------------------------------------------------------ routing


def test_the_pod_the_extproc_picks_serves_the_request(stack: GatewayStack, client: OpenAI) -> None:
    for _ in range(8):
        before = picks(stack)
        pod, _ = chat(client)
        after = picks(stack)
        changed = {p for p in after if after[p] != before.get(p, 0)}
        assert changed == {pod}


def test_pinned_route_lands_on_the_chosen_pod(client: OpenAI) -> None:
    served = {chat(client, headers={"x-pin": "sim-0"})[0] for _ in range(6)}
    assert served == {"sim-0"}


def test_client_forged_destination_header_is_ignored(client: OpenAI, fleet: Fleet) -> None:
    forged = {"x-pin": "sim-0", "x-gateway-destination-endpoint": fleet.pods[1].address}
    served = {chat(client, headers=forged)[0] for _ in range(6)}
    assert served == {"sim-0"}


def test_models_are_listed_by_the_gateway(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"demo-model", "alias-model", "split-model", "lora-a", "lora-b"} <= ids


def test_model_rewrite_reaches_the_pod(client: OpenAI) -> None:
    pod, completion = chat(client, model="alias-model")
    assert pod.startswith("sim-")
    assert completion.model == "demo-model"


def test_weighted_split_within_statistical_bounds(client: OpenAI) -> None:
    n = 120
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def worker(k: int) -> None:
        for _ in range(k):
            pod, _ = chat(client, model="split-model", max_tokens=1)
            with lock:
                counts[pod] += 1

    threads = [threading.Thread(target=worker, args=(n // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(counts) <= {"sim-2", "sim-3"} and sum(counts.values()) == n
    # 30 % expected: mean 36, sd 5.0; bounds are +-4.5 sd
    assert 13 <= counts["sim-2"] <= 59, counts


def test_streaming_through_envoy(client: OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="demo-model",
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=12,
        stream=True,
    ) as resp:
        assert resp.headers["x-inference-pod"].startswith("sim-")
        chunks = [c for c in resp.parse() if c.choices]
    assert len(chunks) >= 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()


def test_repeated_prefix_sticks_to_one_pod(client: OpenAI) -> None:
    prefix = "You are a careful assistant. " * 60 + uuid.uuid4().hex
    served = [chat(client, content=prefix + f" question {i}")[0] for i in range(6)]
    assert len(set(served[1:])) == 1, served


# ------------------------------------------------------------------------------ errors


def test_400_bad_request(client: OpenAI, stack: GatewayStack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo-model", messages=[])
    assert "messages" in err.value.message
    r = raw_post(f"{stack.url}/chat/completions", b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = raw_post(f"{stack.url}/chat/completions", b'{"messages": []}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_404_unknown_model_names_it(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="no-such-model")
    assert "no-such-model" in err.value.message


def test_404_no_matching_rule_names_the_route(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="strict-model")
    assert "strict" in err.value.message
    pod, _ = chat(client, model="strict-model", headers={"x-team": "ml"})
    assert pod.startswith("sim-")


def test_413_over_the_body_limit(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, content="x" * (BODY_LIMIT + 10))
    assert err.value.status_code == 413
    assert str(BODY_LIMIT) in err.value.message


def test_413_without_content_length(stack: GatewayStack) -> None:
    """A chunked body has no content-length: the limit is checked on the body itself."""
    host, port = stack.url.split("//", 1)[1].split("/", 1)[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    head = b'{"model": "demo-model", "messages": [{"role": "user", "content": "'
    chunks = [head, *([b"x" * 65536] * ((BODY_LIMIT // 65536) + 1)), b'"}]}']
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=iter(chunks),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413
    assert (
        body["error"]["code"] == "request_too_large" and str(BODY_LIMIT) in body["error"]["message"]
    )


def test_503_when_no_pod_is_ready(client: OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        chat(client, model="empty-model")
    assert err.value.status_code == 503
    assert "no ready pod" in err.value.message and "empty" in err.value.message
    assert err.value.response.headers["retry-after"] == "1"  # after the route's maxWait (1 s)


# ------------------------------------------------------------------------------ load


def _hung_request(stack: GatewayStack, headers: dict[str, str]) -> http.client.HTTPConnection:
    """A chat request sent without reading its answer: it stays in flight until the connection
    is closed (no client timeout ends it while the test runs, however slow the machine)."""
    host, port = stack.url.split("//", 1)[1].split("/", 1)[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "hang"}]}
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    return conn


def test_least_request_moves_load_off_a_busy_pod(
    stack: GatewayStack, client: OpenAI, fleet: Fleet
) -> None:
    busy = fleet.pods[0]
    post_json(f"{busy.url}/sim/fault", {"hang_rate": 1.0})
    hung: list[http.client.HTTPConnection] = []
    try:
        hung.extend(_hung_request(stack, {"x-pin": "sim-0"}) for _ in range(4))
        wait_until(lambda: pod_state(stack, "sim-0")["inFlight"] >= 4, 30, "4 requests on sim-0")
        served = [chat(client)[0] for _ in range(12)]
        assert "sim-0" not in served, served
        # the premise held throughout: the four hung requests were still in flight on sim-0
        assert pod_state(stack, "sim-0")["inFlight"] >= 4
    finally:
        post_json(f"{busy.url}/sim/fault", {"hang_rate": 0.0})
        for conn in hung:
            conn.close()  # the client goes away: Envoy resets the stream, the sim drops it
    wait_until(lambda: pod_state(stack, "sim-0")["inFlight"] == 0, 30, "hung requests finished")


def test_lora_affinity(stack: GatewayStack, client: OpenAI, fleet: Fleet) -> None:
    # a long lora-a request keeps the adapter active on sim-0
    done = threading.Event()

    def long_request() -> None:
        try:
            chat(client, model="lora-a", headers={"x-pin": "sim-0"}, max_tokens=4000)
        finally:
            done.set()

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    wait_until(
        lambda: "lora-a" in pod_state(stack, "sim-0")["metrics"]["runningLoras"] or done.is_set(),
        30,
        "sim-0 reports lora-a running",
    )
    assert not done.is_set(), "the long LoRA request ended before the test could use it"
    served = [chat(client, model="lora-a", max_tokens=2)[0] for _ in range(5)]
    t.join(timeout=30)
    assert served == ["sim-0"] * 5, served


# ------------------------------------------------------------------------------ failures


def test_killed_pod_is_avoided_and_no_request_fails(
    stack: GatewayStack, client: OpenAI, fleet: Fleet
) -> None:
    """A killed pod leaves the rotation within a few scrape intervals and no request fails.

    Its first refused scrape marks it not ready (extproc/scraper.py); a request that picks it
    before that is retried on a fallback by Envoy. Whether any does is a race here (the stack
    scrapes every 0.1 s), so the retries themselves are checked in test_fallback_retry.py on a
    stack that does not notice the kill.
    """
    victim = 3
    name = fleet.pods[victim].name
    assert pod_state(stack, name)["ready"]
    fleet.kill(victim)
    try:
        # keep sending while the scraper notices: none fails, none is served by the dead pod
        served: list[str] = []

        def noticed() -> bool:
            served.append(chat(client)[0])
            return not pod_state(stack, name)["ready"]

        # a generous bound on the poll, not a latency claim (a loaded CI machine may take seconds
        # per round here). Only the refused-connection path can make the pod not ready: a scrape
        # that just goes stale (STALE_AFTER) leaves a pod in rotation (Datastore.publish_metrics)
        wait_until(noticed, 30, f"the scraper marking the killed pod {name}")
        assert name not in served
        state = pod_state(stack, name)
        assert state["metrics"]["stale"] is True
        # from now on it is never chosen
        before = picks(stack).get(name, 0)
        served = [chat(client)[0] for _ in range(12)]
        assert name not in served
        assert picks(stack).get(name, 0) == before
    finally:
        fleet.restart(victim)
    wait_until(lambda: pod_state(stack, name)["ready"], 30, f"{name} ready again")


def envoy_retry_successes(stack: GatewayStack) -> int:
    url = f"{stack.admin_url}/stats?filter=cluster.matrixinfer_pods.upstream_rq_retry_success"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return int(text.strip().rsplit(":", 1)[1])


def test_bad_config_keeps_the_last_good_one(
    stack: GatewayStack, client: OpenAI, config_dir: Path
) -> None:
    bad = config_dir / "zz-bad.yaml"
    bad.write_text(
        "apiVersion: networking.matrixinfer.ai/v1alpha1\nkind: ModelRoute\n"
        "metadata: {name: broken}\nspec:\n  modelName: extra-model\n"
        "  rules: [{targets: [{modelServerName: rewrite, weight: 900}]}]\n"
    )
    try:
        wait_until(
            lambda: "zz-bad.yaml" in (stack.state()["config"].get("lastError") or ""),
            30,
            "the bad file reported",
        )
        error = stack.state()["config"]["lastError"]
        assert 'ModelRoute "broken"' in error and "weight" in error
        assert chat(client)[0].startswith("sim-")  # still served by the last good config
        with pytest.raises(openai.NotFoundError):
            chat(client, model="extra-model")
        bad.write_text(bad.read_text().replace("weight: 900", "weight: 90"))
        wait_until(
            lambda: "extra-model" in {m.id for m in client.models.list()}, 30, "fixed file applied"
        )
        assert chat(client, model="extra-model")[0].startswith("sim-")
    finally:
        bad.unlink(missing_ok=True)
    wait_until(
        lambda: "extra-model" not in {m.id for m in client.models.list()}, 30, "file removed"
    )


def test_side_port_endpoints(stack: GatewayStack) -> None:
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(stack.extproc_url + path, timeout=10) as resp:
            assert resp.status == 200
    with urllib.request.urlopen(stack.extproc_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for name in (
        "matrixinfer_gateway_requests_total",
        "matrixinfer_gateway_request_duration_seconds_bucket",
        "matrixinfer_gateway_scheduling_duration_seconds_bucket",
        "matrixinfer_gateway_pod_picks_total",
        "matrixinfer_gateway_datastore_objects",
        "matrixinfer_gateway_scrape_age_seconds",
    ):
        assert name in text, name
    assert 'code="404"' in text and 'route="demo"' in text
    state = json.loads(
        urllib.request.urlopen(stack.extproc_url + "/debug/state", timeout=10).read()
    )
    assert {p["name"] for p in state["pods"]} == {"sim-0", "sim-1", "sim-2", "sim-3"}


def test_grpc_health_service(stack: GatewayStack) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_default_transport_is_h2(stack: GatewayStack) -> None:
    """The stack's extproc runs the hand-written HTTP/2 transport unless told otherwise
    (test_gateway_e2e_grpc reruns the key tests on grpc.aio)."""
    assert "ext_proc (h2 transport)" in stack.extproc.log_tail(200)


# ------------------------------------------------------------------------------ extproc down


def _one_chat(url: str) -> Reply:
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return raw_post(f"{url}/chat/completions", json.dumps(body).encode())


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_extproc_killed(tmp_path: Path, config_dir: Path, fleet: Fleet, fail_open: bool) -> None:
    from tests.extproc.conftest import start_stack

    s = start_stack(config_dir, tmp_path / "run", fleet, fail_open=fail_open)
    try:
        assert _one_chat(s.url).status_code == 200
        s.extproc.kill()
        r = _one_chat(s.url)
        if fail_open:
            assert r.status_code == 200 and r.headers["x-inference-pod"].startswith("sim-")
        else:
            assert r.status_code == 503
            error = r.json()["error"]
            assert error["code"] == "extproc_unavailable"
            assert "extproc" in error["message"]
            with pytest.raises(openai.InternalServerError):
                OpenAI(base_url=s.url, api_key="x", max_retries=0).chat.completions.create(
                    model="demo-model", messages=[{"role": "user", "content": "hi"}]
                )
    finally:
        s.stop()


def test_full_duplex_streamed_body_mode(tmp_path: Path, config_dir: Path, fleet: Fleet) -> None:
    from tests.extproc.conftest import start_stack

    s = start_stack(config_dir, tmp_path / "run", fleet, body_mode="FULL_DUPLEX_STREAMED")
    try:
        c = OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=20)
        # a body of several chunks, with the model rewritten (the body goes back as one mutation)
        pod, completion = chat(c, model="alias-model", content="word " * 4000)
        assert pod.startswith("sim-") and completion.model == "demo-model"
        assert chat(c, headers={"x-pin": "sim-0"})[0] == "sim-0"
        with pytest.raises(openai.NotFoundError):
            chat(c, model="no-such-model")
        with pytest.raises(openai.APIStatusError) as err:
            chat(c, content="x" * (BODY_LIMIT + 10))
        assert err.value.status_code == 413
        c.close()
    finally:
        s.stop()
