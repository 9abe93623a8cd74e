"""The gateway's wake stage (scale from zero), without gRPC: a request for a ModelServer with no
ready pod waits until one is ready, counts as the ModelServer's demand meanwhile, and gets a 503
with Retry-After after its route's queue.maxWait (or the gateway's wake timeout)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from random import Random

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controllers.autoscaling.planner import (
    Homogeneous,
    MetricGoal,
    Planner,
    RateRule,
    Settings,
)
from controllers.autoscaling.sources import GATEWAY_WAITING, gateway_values
from extproc.datastore import Datastore
from extproc.demand import DemandCollector
from extproc.gateway import Gateway, Immediate, RequestState, Routed
from extproc.metrics import GatewayMetrics
from extproc.policies.enforce import QUEUE_TIMEOUT_MARGIN, Policies, PolicySettings, queue_notice
from fleet.pods import PodMetrics
from tests.extproc.helpers import config, server_yaml


def routes(queue: str = "") -> str:
    return f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: chat}}
spec:
  modelName: chat
  rules: [{{targets: [{{modelServerName: pool}}]}}]
{queue}"""


HEADERS = {":method": "POST", ":path": "/v1/chat/completions", "x-request-id": "r1"}
BODY = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
POD = ("p0", "10.0.0.1:8000", {"app": "chat"})


def text(queue: str = "") -> str:
    return server_yaml("pool", {"app": "chat"}) + "---\n" + routes(queue)


def make(
    pods: list[tuple[str, str, dict[str, str]]], queue: str = "", wake_timeout: float = 30.0
) -> tuple[Gateway, Datastore]:
    ds = Datastore()
    ds.apply(config(text(queue), pods))
    gw = Gateway(ds, GatewayMetrics(), rng=Random(1), wake_timeout=wake_timeout)
    return gw, ds


async def until(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def waiting_page(gw: Gateway, ds: Datastore) -> str:
    reg = CollectorRegistry()
    reg.register(DemandCollector(ds, lambda: None, gw.waking.counts))
    return generate_latest(reg).decode()


def waiting(gw: Gateway, ds: Datastore) -> float:
    return gateway_values(waiting_page(gw, ds), "default", "pool").get(GATEWAY_WAITING, -1.0)


async def decide(gw: Gateway) -> Routed | Immediate:
    state, early = gw.start(HEADERS, end_of_stream=False)
    assert early is None
    return await gw.decide(state, BODY)


async def test_a_request_for_a_server_at_zero_waits_and_is_served_by_its_first_pod() -> None:
    gw, ds = make([])
    task = asyncio.create_task(decide(gw))
    await until(lambda: waiting(gw, ds) == 1.0, "the request counted as waiting")
    assert not task.done()
    ds.apply(config(text(), [POD]))  # the autoscaler's first pod, ready
    answer = await asyncio.wait_for(task, 10)
    assert isinstance(answer, Routed) and answer.pod.name == "p0"
    assert waiting(gw, ds) == 0.0 and ds.in_flight_total() == 1


async def test_a_pod_that_becomes_ready_serves_the_waiting_request() -> None:
    # the pod exists but its scrape finds nothing listening yet (starting): not ready
    gw, ds = make([POD])
    ds.publish_metrics("p0", PodMetrics(stale=True, unreachable=True))
    task = asyncio.create_task(decide(gw))
    await until(lambda: waiting(gw, ds) == 1.0, "the request counted as waiting")
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=0))
    answer = await asyncio.wait_for(task, 10)
    assert isinstance(answer, Routed) and answer.pod.name == "p0"


async def test_with_policies_the_request_waits_too_and_is_then_scheduled() -> None:
    gw, ds = make([])
    policies = Policies(PolicySettings(), gw.metrics.registry)
    gw.policies = policies
    task = asyncio.create_task(decide(gw))
    await until(lambda: waiting(gw, ds) == 1.0, "the request counted as waiting")
    assert not policies.queues  # it waits for a ready pod, not in the fair queue
    ds.apply(config(text(), [POD]))
    answer = await asyncio.wait_for(task, 10)
    assert isinstance(answer, Routed) and answer.pod.name == "p0"
    assert answer.metadata is not None  # the policy stages went on after the wait
    await policies.close()


async def test_route_max_wait_then_503_with_retry_after() -> None:
    gw, ds = make([], queue="  queue: {maxWait: 200ms}\n")
    answer = await decide(gw)
    assert isinstance(answer, Immediate) and answer.status == 503
    assert answer.headers["retry-after"] == "1"
    error = orjson.loads(answer.body)["error"]
    assert error["code"] == "no_pod_available"
    assert "'pool'" in error["message"] and "0.2s" in error["message"]
    assert "queue.maxWait" in error["message"]
    assert waiting(gw, ds) == 0.0


async def test_without_a_route_queue_the_gateway_wake_timeout_bounds_the_wait() -> None:
    gw, _ = make([], wake_timeout=0.1)
    answer = await decide(gw)
    assert isinstance(answer, Immediate) and answer.status == 503
    assert "retry-after" in answer.headers and b"0.1s" in answer.body
    gw, _ = make([], wake_timeout=0.0)  # no wait at all: the schedule stage's 503
    answer = await decide(gw)
    assert isinstance(answer, Immediate) and answer.status == 503
    assert "retry-after" not in answer.headers and b"has no pods" in answer.body
    with pytest.raises(ValueError, match="wake_timeout"):
        Gateway(Datastore(), wake_timeout=-1)


async def test_the_wait_extends_envoys_message_timeout() -> None:
    gw, _ = make([], queue="  queue: {maxWait: 50ms}\n")
    extended: list[float] = []

    async def notice(seconds: float) -> None:
        extended.append(seconds)

    queue_notice.set(notice)
    answer = await decide(gw)
    assert isinstance(answer, Immediate) and answer.status == 503
    assert extended == [pytest.approx(0.05 + QUEUE_TIMEOUT_MARGIN)]


async def test_a_client_that_goes_away_stops_waiting() -> None:
    gw, ds = make([])
    task = asyncio.create_task(decide(gw))
    await until(lambda: waiting(gw, ds) == 1.0, "the request counted as waiting")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert waiting(gw, ds) == 0.0 and gw.waking.counts() == {}


async def test_fifty_first_requests_wake_one_scale_up_and_are_all_served() -> None:
    """50 concurrent requests at zero are 50 waiting in the demand gauge; the autoscaler's
    planner decides one scale-up from zero and does not scale again while they wait for the pod
    to start; the first ready pod serves every one of them."""
    gw, ds = make([])
    tasks = [asyncio.create_task(decide(gw)) for _ in range(50)]
    await until(lambda: waiting(gw, ds) == 50.0, "50 requests counted as waiting")
    clock = [1000.0]
    planner = Planner(
        Settings(
            metrics=(MetricGoal(GATEWAY_WAITING, 100.0),),
            up=RateRule(instances=4, period=60.0),
            down=RateRule(instances=4, period=60.0),
            stable_window=30.0,
            panic_window=6.0,
        ),
        Homogeneous("pool", 0, 10),
        lambda: clock[0],
    )
    replicas = 0
    decisions = []
    for _ in range(5):  # five sync periods while the pod starts; the requests keep waiting
        page = waiting_page(gw, ds)
        d = planner.step(gateway_values(page, "default", "pool"), {"pool": replicas})
        if d.changed:
            decisions.append(d)
            replicas = d.replicas["pool"]
        clock[0] += 5.0
    assert [(d.reason, d.replicas) for d in decisions] == [("WakeUp", {"pool": 1})]
    assert not any(t.done() for t in tasks)
    ds.apply(config(text(), [POD]))
    answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert all(isinstance(a, Routed) and a.pod.name == "p0" for a in answers)
    assert waiting(gw, ds) == 0.0 and ds.in_flight_total() == 50


async def test_woken_requests_that_find_the_pod_saturated_wait_on_for_room() -> None:
    """The burst that waited for a first pod arrives at once; the saturation filter counts what
    was sent since the pod's last scrape as waiting there, so past 8 the pod looks full. Without
    a fair queue the woken requests wait on (to their wake deadline) and are scheduled as
    requests finish or a scrape frees room: none gets the saturation 503."""
    gw, ds = make([POD])
    ds.publish_metrics("p0", PodMetrics(stale=True, unreachable=True))  # starting

    async def one() -> tuple[RequestState, Routed | Immediate]:
        state, early = gw.start(HEADERS, end_of_stream=False)
        assert early is None
        return state, await gw.decide(state, BODY)

    tasks = [asyncio.create_task(one()) for _ in range(20)]
    await until(lambda: waiting(gw, ds) == 20.0, "20 requests counted as waiting")
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=0))  # ready, empty
    await until(lambda: ds.in_flight_total() >= 8, "the first requests routed")
    await asyncio.sleep(0.05)
    assert not all(t.done() for t in tasks)  # the rest wait for room, not answered 503
    finished: set[int] = set()
    while len(finished) < 20:  # each finished request lets a waiting one in
        for i, t in enumerate(tasks):
            if t.done() and i not in finished:
                state, answer = t.result()
                assert isinstance(answer, Routed) and answer.pod.name == "p0", answer
                finished.add(i)
                gw.finish(state)
        await asyncio.sleep(0.01)


async def test_a_newcomer_waits_behind_woken_requests_that_wait_for_room() -> None:
    """A request that arrives once the woken pod is ready did not wait for it; while woken
    requests still wait for room (no fair queue) it waits behind them, as a newcomer behind the
    fair queue does: no saturation 503, and it is scheduled only after every woken request."""
    gw, ds = make([POD])
    ds.publish_metrics("p0", PodMetrics(stale=True, unreachable=True))  # starting
    order: list[str] = []

    async def one(name: str) -> tuple[RequestState, Routed | Immediate]:
        state, early = gw.start(HEADERS, end_of_stream=False)
        assert early is None
        answer = await gw.decide(state, BODY)
        order.append(name)
        return state, answer

    woken = [asyncio.create_task(one(f"woken{i}")) for i in range(20)]
    await until(lambda: waiting(gw, ds) == 20.0, "20 requests counted as waiting")
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=0))  # ready, empty
    await until(lambda: ds.in_flight_total() >= 8, "the first requests routed")
    await asyncio.sleep(0.05)
    assert not all(t.done() for t in woken)  # the rest wait for room
    newcomer = asyncio.create_task(one("newcomer"))
    await asyncio.sleep(0.05)
    assert not newcomer.done(), newcomer.result()  # waits, not answered 503 "saturated"
    tasks = [*woken, newcomer]
    finished: set[int] = set()
    while len(finished) < len(tasks):  # each finished request lets a waiting one in
        for i, t in enumerate(tasks):
            if t.done() and i not in finished:
                state, answer = t.result()
                assert isinstance(answer, Routed) and answer.pod.name == "p0", answer
                finished.add(i)
                gw.finish(state)
        await asyncio.sleep(0.01)
    assert order[-1] == "newcomer", order  # it did not overtake a woken request


async def test_with_a_wake_timeout_of_0_a_saturated_server_sheds_at_once() -> None:
    """Without a fair queue a request that finds every pod saturated waits for room
    (tests/extproc/test_room.py) for at most the wake timeout: 0 answers 503 at once."""
    gw, ds = make([POD], wake_timeout=0.0)
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=50, running=8))  # saturated
    answer = await asyncio.wait_for(decide(gw), 5)
    assert isinstance(answer, Immediate) and answer.status == 503, answer


def test_datastore_reports_a_server_once_when_it_gets_its_first_ready_pod() -> None:
    ds = Datastore()
    seen: list[str] = []
    ds.on_server_ready.append(seen.append)
    ds.apply(config(text(), []))
    assert seen == []
    ds.apply(config(text(), [("p0", "10.0.0.1:8000", {"app": "chat"})]))
    assert seen == ["default/pool"]
    ds.apply(config(text(), [POD, ("p1", "10.0.0.2:8000", {"app": "chat"})]))
    assert seen == ["default/pool"]  # it had a ready pod already
    for name in ("p0", "p1"):
        ds.publish_metrics(name, PodMetrics(stale=True, unreachable=True))
    ds.publish_metrics("p1", PodMetrics(stale=False))
    assert seen == ["default/pool", "default/pool"]
