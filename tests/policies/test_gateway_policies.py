"""Gateway.decide with policies, in process: credentials never reach the engine, usage is forced on
streams and marked for the usage report, and a rejected request leaves no reservation behind."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from extproc.gateway import Gateway, Immediate, Routed
from extproc.metrics import GatewayMetrics
from extproc.policies.auth import AuthConfig
from extproc.policies.enforce import Policies, PolicySettings
from extproc.transport.grpc_servicer import from_decision
from tests.extproc.helpers import config, server_yaml

ROUTE = """---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  modelName: m
  rateLimit: {requestsPerUnit: 1, unit: hour, scope: user}
  rules: [{targets: [{modelServerName: s}]}]
"""
HEADERS = {
    ":method": "POST",
    ":path": "/v1/chat/completions",
    "content-type": "application/json",
    "authorization": "Bearer secret-key",
}


def gateway(tmp_path: Path, text: str | None = None, **settings: Any) -> Gateway:
    """A gateway with policies on one pod p0 of ModelServer s: ``text`` (default: s + ROUTE),
    the API key ``secret-key`` of t/u, ``settings`` for PolicySettings."""
    from extproc.datastore import Datastore

    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(b"secret-key").hexdigest()
    keys.write_text(f"keys: [{{sha256: {digest}, tenant: t, user: u}}]\n")
    ds = Datastore()
    text = server_yaml("s", {"app": "x"}) + ROUTE if text is None else text
    ds.apply(config(text, [("p0", "10.0.0.1:8000", {"app": "x"})]))
    gw = Gateway(ds, GatewayMetrics())
    auth = AuthConfig(api_keys_file=keys)
    gw.policies = Policies(PolicySettings(auth=auth, **settings), gw.metrics.registry)
    return gw


async def decide(gw: Gateway, body: Mapping[str, object]) -> Routed | Immediate:
    state, answer = gw.start(HEADERS, False)
    assert answer is None
    result = await gw.decide(state, json.dumps(body).encode())
    gw.finish(state)
    return result


async def test_credentials_stripped_usage_forced_and_marked(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    routed = await decide(gw, body)
    assert isinstance(routed, Routed)
    assert routed.headers["authorization"] == ""  # "" = remove the client's header
    reply = from_decision(routed, b"", duplex=False)
    mutation = reply.request_body.response.header_mutation
    assert "authorization" in mutation.remove_headers
    assert all(h.header.key != "authorization" for h in mutation.set_headers)
    sent = orjson.loads(reply.request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    lb = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["matrixinfer_rid"].string_value in gw.policies.ledger.open  # type: ignore[union-attr]


async def test_rejected_request_is_a_429_with_headers(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert isinstance(await decide(gw, body), Routed)
    limited = await decide(gw, body)
    assert isinstance(limited, Immediate) and limited.status == 429
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(limited.headers["retry-after"]) >= 1


QUEUED = """---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: s}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: x}}
  workloadPort: {port: 8000}
  scheduler:
    filters: [{name: saturation, args: {maxWaiting: 1}}]
    scorers: [{name: least-request, weight: 1}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  modelName: m
  queue: {maxQueued: 10, maxWait: 30s, priorityHeader: x-priority}
  rules: [{targets: [{modelServerName: s}]}]
"""


async def test_a_newcomer_queues_behind_waiting_requests(tmp_path: Path) -> None:
    """While requests wait for a server, a newcomer joins the fair queue even if the pod shows
    room at that instant: the waiting request with the higher priority is served first, the
    newcomer when the next slot frees."""
    import asyncio

    from fleet.pods import PodMetrics

    gw = gateway(tmp_path, QUEUED, dispatch_interval=3600.0)  # dispatches only when the test says
    ds, policies = gw.datastore, gw.policies
    assert policies is not None
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=5, running=2))  # saturated
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def request(priority: str) -> Routed | Immediate:
        state, answer = gw.start({**HEADERS, "x-priority": priority}, False)
        assert answer is None
        return await gw.decide(state, body)

    first = asyncio.create_task(request("5"))
    for _ in range(1000):  # the first request reaches the queue within a few loop turns
        if policies.waits.waiting("default/s"):
            break
        await asyncio.sleep(0)
    assert policies.waits.waiting("default/s")
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=0))  # room for one
    newcomer = asyncio.create_task(request("0"))
    # the waiting request got the free slot
    assert isinstance(await asyncio.wait_for(first, 5), Routed)
    await asyncio.sleep(0.01)
    assert not newcomer.done()  # the newcomer waits in the queue, it did not overtake
    policies.waits.serve("default/s")
    assert not newcomer.done()  # the slot was taken: the pod is full as far as the gateway knows
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=1))  # room again
    policies.waits.serve("default/s")  # the next slot: now the newcomer is served
    assert isinstance(await asyncio.wait_for(newcomer, 5), Routed)
    await policies.close()


async def test_a_queued_request_no_pod_can_ever_take_does_not_hold_the_queue(
    tmp_path: Path,
) -> None:
    """The fair queue waits while every pod is saturated or none is ready; a request whose own
    attempt fails for good (no pod has what it asks for) gets its error at once, and the
    requests behind it are served."""
    import asyncio

    from extproc.policies.enforce import RoutePolicy
    from extproc.policies.usage import Charge
    from extproc.scheduling.types import AllPodsSaturated, NoPodAvailable, NoPodReady

    gw = gateway(tmp_path, QUEUED, dispatch_interval=3600.0)
    policies = gw.policies
    assert policies is not None
    policy = RoutePolicy("default/r", "r", None, None, 10, 30.0, None)
    room = [False]

    def fits(name: str) -> object:
        if not room[0]:
            raise AllPodsSaturated("full")
        return name

    def unroutable() -> object:
        if not room[0]:
            raise AllPodsSaturated("full")
        raise NoPodAvailable("no pod of s has adapter 'x'")

    def not_ready() -> object:
        raise NoPodReady("no pod ready")

    async def wait(user: str, attempt: Any) -> Any:
        charge = Charge(rid=user, estimate=1, kind="chat", user=user)
        return await policies.wait_for_pod("k", "m", policy, charge, 0, attempt, lambda _: None)

    lost = asyncio.create_task(wait("a", unroutable))
    await asyncio.sleep(0)
    waits = asyncio.create_task(wait("b", not_ready))
    await asyncio.sleep(0)
    served = asyncio.create_task(wait("c", lambda: fits("pod")))
    await asyncio.sleep(0)
    room[0] = True
    policies.waits.serve("k")
    try:
        await asyncio.wait_for(lost, 5)
    except NoPodAvailable as exc:
        assert "adapter 'x'" in str(exc)
    else:
        raise AssertionError("the unroutable request was served")
    outcomes = policies.metrics.queue_outcomes
    assert outcomes.labels("m", "failed")._value.get() == 1  # counted as failed, not cancelled
    assert outcomes.labels("m", "cancelled")._value.get() == 0
    # the next one has no ready pod: it keeps waiting, and holds its place before c
    assert not waits.done() and not served.done()
    waits.cancel()
    await asyncio.sleep(0)
    policies.waits.serve("k")
    assert await asyncio.wait_for(served, 5) == "pod"
    await policies.close()


async def test_a_request_dispatched_just_as_its_client_goes_away_gives_its_pod_back(
    tmp_path: Path,
) -> None:
    """A queued request is dispatched (its pod counted) and its client goes away before its task
    runs again: the cancellation is not swallowed, the pod is given back and the outcome is
    ``cancelled`` — as in the line for room without policies."""
    import asyncio

    import pytest

    from extproc.policies.enforce import RoutePolicy
    from extproc.policies.usage import Charge
    from extproc.scheduling.types import AllPodsSaturated

    gw = gateway(tmp_path, QUEUED, dispatch_interval=3600.0)
    policies = gw.policies
    assert policies is not None
    policy = RoutePolicy("default/r", "r", None, None, 10, 30.0, None)
    room = [False]
    undone: list[Any] = []

    def attempt() -> object:
        if not room[0]:
            raise AllPodsSaturated("full")
        return "pod"

    charge = Charge(rid="a", estimate=1, kind="chat", user="a")
    task = asyncio.create_task(
        policies.wait_for_pod("k", "m", policy, charge, 0, attempt, undone.append)
    )
    for _ in range(100):
        if policies.waits.waiting("k"):
            break
        await asyncio.sleep(0)
    room[0] = True
    assert policies.waits.serve("k") == 1  # dispatched ...
    task.cancel()  # ... and its client goes away before the task could answer
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == ["pod"]
    labels = {"model": "m", "result": "cancelled"}
    registry = gw.metrics.registry
    assert registry.get_sample_value("matrixinfer_gateway_queue_outcomes_total", labels) == 1.0
    await policies.close()
