"""The decision core without gRPC: Gateway + Datastore + the real scheduler."""

from __future__ import annotations

from random import Random
from typing import Any

import orjson
import pytest

import extproc.parsing
from extproc.datastore import Datastore
from extproc.gateway import NO_POLICIES, Gateway, Immediate, NoPolicies, RequestState, Routed
from extproc.metrics import GatewayMetrics
from extproc.policies.enforce import Policies, PolicySettings
from fleet.pods import PodMetrics
from tests.extproc.helpers import config, server_yaml

ROUTES = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  modelName: chat
  rules: [{targets: [{modelServerName: pool}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: none}
spec:
  modelName: lonely
  rules: [{targets: [{modelServerName: nobody}]}]
"""
PODS = [(f"p{i}", f"10.0.0.{i}:8000", {"app": "chat"}) for i in range(3)]


def make(model: str | None = "upstream/chat-7b") -> tuple[Gateway, Datastore]:
    text = (
        server_yaml("pool", {"app": "chat"}, model=model)
        + "---\n"
        + server_yaml("nobody", {"app": "none"})
        + "---\n"
        + ROUTES
    )
    ds = Datastore()
    ds.apply(config(text, PODS))
    # no wake stage: a ModelServer without a ready pod answers 503 at once (test_wake.py waits)
    return Gateway(ds, GatewayMetrics(), rng=Random(3), body_limit=4096, wake_timeout=0.0), ds


HEADERS = {":method": "POST", ":path": "/v1/chat/completions", "x-request-id": "r1"}
BODY = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})


async def test_routed_request_counts_in_flight_until_the_stream_ends() -> None:
    gw, ds = make()
    state, early = gw.start(HEADERS, end_of_stream=False)
    assert early is None
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed)
    assert decision.endpoints[0] == decision.pod.address and len(decision.endpoints) >= 2
    assert len(set(decision.endpoints)) == len(decision.endpoints)
    assert decision.pod.in_flight == 1 and ds.in_flight_total() == 1
    assert decision.body is not None and orjson.loads(decision.body)["model"] == "upstream/chat-7b"
    gw.routed(state)
    gw.finish(state)
    gw.finish(state)  # idempotent
    assert ds.in_flight_total() == 0


async def test_no_rewrite_keeps_the_body_untouched() -> None:
    gw, _ = make(model=None)
    state, _ = gw.start(HEADERS, end_of_stream=False)
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed) and decision.body is None


def test_models_list_and_early_answers() -> None:
    gw, _ = make()
    _, answer = gw.start({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)
    assert isinstance(answer, Immediate) and answer.status == 200
    # "lonely" has no pod: not listed
    assert [m["id"] for m in orjson.loads(answer.body)["data"]] == ["chat"]
    _, answer = gw.start({**HEADERS, "content-length": "5000"}, end_of_stream=False)
    assert answer is not None and answer.status == 413
    _, answer = gw.start(HEADERS, end_of_stream=True)
    assert answer is not None and answer.status == 400


async def test_server_without_pods_is_503_and_unready_pods_are_skipped() -> None:
    gw, ds = make()
    state, _ = gw.start(HEADERS, end_of_stream=False)
    lonely = orjson.dumps({"model": "lonely", "prompt": "x"})
    state, _ = gw.start({**HEADERS, ":path": "/v1/completions"}, end_of_stream=False)
    answer = await gw.decide(state, lonely)
    assert isinstance(answer, Immediate) and answer.status == 503
    assert b"nobody" in answer.body
    # stale metrics (slow or failing scrapes) are unknown: the pods stay in rotation
    for name in ("p0", "p1", "p2"):
        ds.publish_metrics(name, PodMetrics(stale=True))
    state, _ = gw.start(HEADERS, end_of_stream=False)
    assert isinstance(await gw.decide(state, BODY), Routed)
    # unreachable pods (nothing listens) are taken out; none left -> 503 with the reason
    for name in ("p0", "p1", "p2"):
        ds.publish_metrics(name, PodMetrics(stale=True, unreachable=True))
    state, _ = gw.start(HEADERS, end_of_stream=False)
    answer = await gw.decide(state, BODY)
    assert isinstance(answer, Immediate) and answer.status == 503
    assert b"ready" in answer.body
    ds.publish_metrics("p1", PodMetrics(stale=False, waiting=0, running=0))
    state, _ = gw.start(HEADERS, end_of_stream=False)
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed) and decision.pod.name == "p1"


async def test_reload_keeps_pod_state_and_forgets_removed_pods() -> None:
    gw, ds = make()
    state, _ = gw.start(HEADERS, end_of_stream=False)
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed)
    picked = decision.pod.name
    text = server_yaml("pool", {"app": "chat"}) + "---\n" + ROUTES
    kept = [p for p in PODS if p[0] == picked]
    ds.apply(config(text, kept))
    assert ds.snapshot.pods[picked].in_flight == 1  # the same Pod object survived the reload
    gw.finish(state)
    assert ds.in_flight_total() == 0
    assert set(ds.snapshot.pods) == {picked}


async def test_traffic_policy_retries_become_envoy_headers() -> None:
    gw, ds = make()
    state, _ = gw.start({**HEADERS, "x-envoy-max-retries": "9"}, end_of_stream=False)
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed)
    # no retry policy: none (the client's own header is overwritten, its status codes removed)
    assert decision.headers["x-envoy-max-retries"] == "0"
    assert decision.headers["x-envoy-retriable-status-codes"] == ""
    retrying = server_yaml("pool", {"app": "chat"}) + (
        "  trafficPolicy:\n    retry: {attempts: 5, retryOn: [connect-failure, '503']}\n"
    )
    ds.apply(config(retrying + "---\n" + ROUTES, PODS))
    state, _ = gw.start(HEADERS, end_of_stream=False)
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed)
    h = decision.headers
    # capped by the fallbacks the scheduler returned (each retry goes to the next one)
    assert h["x-envoy-max-retries"] == str(len(decision.endpoints) - 1)
    assert h["x-envoy-retry-on"] == "connect-failure,retriable-status-codes"
    assert h["x-envoy-retriable-status-codes"] == "503"


async def test_a_scheduler_bug_costs_one_request_a_500_not_the_process() -> None:
    gw, ds = make()

    class Broken:
        def schedule(self, request: object, pods: object) -> object:
            raise RuntimeError("plugin bug")

    for key in ds.snapshot.servers:
        gw._schedulers[key] = (ds.snapshot.servers[key].profile, Broken())  # type: ignore[assignment]
    state, _ = gw.start(HEADERS, end_of_stream=False)
    answer = await gw.decide(state, BODY)
    assert isinstance(answer, Immediate) and answer.status == 500
    assert b"request id r1" in answer.body
    assert ds.in_flight_total() == 0


# ---------------------------------------------------------------- the pipeline's stages


class RecordedStages(NoPolicies):
    """Policy stages that only record their calls (``wait``: as if others waited in the queue)."""

    def __init__(self, calls: list[str], wait: bool = False) -> None:
        self.calls = calls
        self.wait = wait

    def authenticate(self, state: RequestState) -> None:
        self.calls.append("authenticate")

    async def admit(self, *args: Any) -> None:
        self.calls.append("admit")

    def waiting(self, server_key: str) -> bool:
        return self.wait

    async def queue(self, state: RequestState, parsed: Any, view: Any, *rest: Any) -> Any:
        self.calls.append("queue")
        attempt = rest[1]  # (saturated, attempt, undo)
        return attempt()  # dispatched at once: the schedule stage runs from the queue

    def mark(self, state: RequestState, parsed: Any, routed: Routed) -> None:
        self.calls.append("mark")


def recording(gw: Gateway, calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the gateway's own stages (parse, route, schedule) into ``calls``."""

    def spy(name: str, fn: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return recorded

    classify = spy("parse request line", extproc.parsing.classify)
    monkeypatch.setattr("extproc.gateway.classify", classify)
    for stage in ("parse", "route", "schedule"):
        monkeypatch.setattr(gw, f"_{stage}", spy(stage, getattr(gw, f"_{stage}")))


@pytest.mark.parametrize("wait", [False, True])
async def test_pipeline_runs_the_stages_in_order(
    wait: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, ds = make()
    calls: list[str] = []
    recording(gw, calls, monkeypatch)
    gw.policy_stages = RecordedStages(calls, wait=wait)
    state, early = gw.start(HEADERS, end_of_stream=False)
    assert early is None
    decision = await gw.decide(state, BODY)
    assert isinstance(decision, Routed) and ds.in_flight_total() == 1
    queued = ["queue"] if wait else []
    assert calls == [
        "parse request line",
        "authenticate",
        "parse",
        "route",
        "admit",
        *queued,
        "schedule",
        "mark",
    ]
    gw.finish(state)
    assert ds.in_flight_total() == 0


async def test_without_policies_no_policy_stage_runs(tmp_path: Any) -> None:
    gw, _ = make()
    policies = Policies(PolicySettings(), gw.metrics.registry)
    calls: list[str] = []
    authenticate, admit = policies.authenticate, policies.admit

    def spy_authenticate(headers: Any) -> Any:
        calls.append("authenticate")
        return authenticate(headers)

    async def spy_admit(*args: Any, **kwargs: Any) -> Any:
        calls.append("admit")
        return await admit(*args, **kwargs)

    policies.authenticate = spy_authenticate  # type: ignore[method-assign]
    policies.admit = spy_admit  # type: ignore[method-assign]
    headers = {**HEADERS, "authorization": "Bearer not-checked"}

    async def request() -> tuple[RequestState, Routed]:
        state, early = gw.start(headers, end_of_stream=False)
        assert early is None
        decision = await gw.decide(state, BODY)
        assert isinstance(decision, Routed)
        gw.finish(state)
        return state, decision

    gw.policies = policies  # configured: both stages run, the request carries its charge
    state, decision = await request()
    assert calls == ["authenticate", "admit"] and state.charge is not None
    assert decision.metadata is not None and decision.headers["authorization"] == ""

    gw.policies = None  # off: no-op stages, nothing authenticated, admitted or marked
    assert gw.policy_stages is NO_POLICIES
    calls.clear()
    state, decision = await request()
    assert calls == [] and state.identity is None and state.charge is None
    assert decision.metadata is None and "authorization" not in decision.headers


async def test_a_failing_stage_answers_500_and_releases_the_pod() -> None:
    gw, ds = make()

    class Failing(NoPolicies):
        def mark(self, state: RequestState, parsed: Any, routed: Routed) -> None:
            raise RuntimeError("bug after the pod was taken")

    gw.policy_stages = Failing()
    state, _ = gw.start(HEADERS, end_of_stream=False)
    answer = await gw.decide(state, BODY)
    assert isinstance(answer, Immediate) and answer.status == 500
    assert b"request id r1" in answer.body
    assert ds.in_flight_total() == 0 and state.pod_name is None
    assert in_flight_gauge(gw) == 0
    gw.finish(state)  # the stream's end does not count the request off twice
    assert ds.in_flight_total() == 0 and in_flight_gauge(gw) == 0


def in_flight_gauge(gw: Gateway) -> float | None:
    """``matrixinfer_gateway_in_flight_requests`` as the gateway's registry exposes it."""
    return gw.metrics.registry.get_sample_value("matrixinfer_gateway_in_flight_requests")


async def test_the_in_flight_gauge_counts_routed_requests_until_they_finish() -> None:
    gw, _ = make()
    first, _ = gw.start(HEADERS, end_of_stream=False)
    assert isinstance(await gw.decide(first, BODY), Routed)
    second, _ = gw.start({**HEADERS, "x-request-id": "r2"}, end_of_stream=False)
    assert isinstance(await gw.decide(second, BODY), Routed)
    assert in_flight_gauge(gw) == 2
    gw.finish(first)
    assert in_flight_gauge(gw) == 1
    gw.finish(second)
    gw.finish(second)  # a stream ends once; a second call counts nothing off
    assert in_flight_gauge(gw) == 0
