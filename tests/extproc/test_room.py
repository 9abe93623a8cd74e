"""Waiting for room without a fair queue: a request that finds every pod of its ModelServer
saturated, with no policies, waits in the ModelServer's line for room (first come first served)
instead of the immediate 503 — scheduled when a request of that server finishes or a scrape shows
room, at most its route's queue.maxWait (the gateway's wake timeout when the route sets no
queue) from its arrival, then 503 with Retry-After. A bound of 0 keeps the immediate 503; with
the fair queue (policies) the requests wait there, as before."""

from __future__ import annotations

import asyncio
from random import Random
from typing import Any

import orjson

from extproc.datastore import Datastore
from extproc.gateway import Gateway, Immediate, RequestState, Routed, WakeRoom
from extproc.metrics import GatewayMetrics
from extproc.policies.enforce import QUEUE_TIMEOUT_MARGIN, Policies, PolicySettings, queue_notice
from extproc.policies.queue import QueueEntry
from extproc.room import Waiter
from extproc.scheduling.types import AllPodsSaturated, NoPodAvailable, NoPodReady
from fleet.pods import PodMetrics
from tests.extproc.helpers import config
from tests.extproc.test_wake import BODY, POD, text, until, waiting

KEY = "default/pool"


class Clock:
    """A clock the test moves (the gateway's deadlines are read from it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    queue: str = "", wake_timeout: float = 30.0, clock: Clock | None = None
) -> tuple[Gateway, Datastore]:
    ds = Datastore()
    ds.apply(config(text(queue), [POD]))
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=0))  # ready, empty
    gw = Gateway(
        ds,
        GatewayMetrics(),
        rng=Random(1),
        wake_timeout=wake_timeout,
        clock=clock if clock is not None else Clock(),
    )
    return gw, ds


def start(gw: Gateway, n: int) -> RequestState:
    state, early = gw.start(
        {":method": "POST", ":path": "/v1/chat/completions", "x-request-id": f"r{n}"},
        end_of_stream=False,
    )
    assert early is None
    return state


def waits(gw: Gateway, outcome: str) -> float:
    """``matrixinfer_gateway_room_waits_total`` of the test's ModelServer for ``outcome``."""
    labels = {"namespace": "default", "server": "pool", "outcome": outcome}
    value = gw.metrics.registry.get_sample_value("matrixinfer_gateway_room_waits_total", labels)
    return value or 0.0


def outcomes(gw: Gateway) -> dict[str, float]:
    """The counted outcomes of the waits for room (those counted at least once)."""
    counted = {o: waits(gw, o) for o in ("served", "timed_out", "left", "failed")}
    return {o: n for o, n in counted.items() if n}


async def fill(gw: Gateway) -> list[RequestState]:
    """Route requests until the pod is saturated (the default saturation filter: 8 sent since
    the last scrape look like 8 waiting there)."""
    states = []
    for i in range(8):
        state = start(gw, i)
        answer = await gw.decide(state, BODY)
        assert isinstance(answer, Routed), answer
        states.append(state)
    return states


async def test_a_request_finding_every_pod_saturated_waits_and_is_scheduled_when_one_finishes() -> (
    None
):
    gw, ds = make()
    busy = await fill(gw)
    state = start(gw, 100)
    task = asyncio.create_task(gw.decide(state, BODY))
    await until(lambda: gw.waking.counts() == {KEY: 1}, "the request waiting for room")
    assert waiting(gw, ds) == 1.0  # the ModelServer's waiting demand counts it
    await asyncio.sleep(0.2)  # several retries: the pod stays saturated
    assert not task.done(), task.result()  # no 503 "saturated"
    gw.finish(busy[0])
    answer = await asyncio.wait_for(task, 10)
    assert isinstance(answer, Routed) and answer.pod.name == "p0", answer
    assert gw.waking.counts() == {} and ds.in_flight_total() == 8
    assert outcomes(gw) == {"served": 1}


async def test_a_scrape_that_shows_room_lets_the_waiting_request_in() -> None:
    gw, ds = make()
    await fill(gw)
    task = asyncio.create_task(gw.decide(start(gw, 100), BODY))
    await until(lambda: gw.waking.counts() == {KEY: 1}, "the request waiting for room")
    # no request finishes; the engine's next scrape shows its queue drained
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=8))
    answer = await asyncio.wait_for(task, 10)
    assert isinstance(answer, Routed), answer


async def test_waiting_requests_are_served_first_come_first_served() -> None:
    gw, ds = make()
    busy = await fill(gw)
    order: list[str] = []

    async def one(n: int) -> RequestState:
        state = start(gw, n)
        answer = await gw.decide(state, BODY)
        assert isinstance(answer, Routed), answer
        order.append(state.request_id)
        return state

    tasks = []
    for n in range(100, 105):  # each lines up before the next arrives
        tasks.append(asyncio.create_task(one(n)))
        await until(lambda: gw.waking.counts().get(KEY) == len(tasks), "lined up")
    state = gw.waking.state()[KEY]
    assert [w["requestId"] for w in state["forRoom"]] == [f"r{n}" for n in range(100, 105)]
    assert state["forReadyPod"] == 0
    # a newcomer while others wait does not take a slot that frees up: it lines up last
    late = asyncio.create_task(one(200))
    await until(lambda: gw.waking.counts().get(KEY) == 6, "the newcomer lined up")
    tasks.append(late)
    for i, finishing in enumerate(busy[:6]):
        gw.finish(finishing)
        await until(lambda n=i + 1: len(order) == n, f"waiter {i} served")  # type: ignore[misc]
    assert order == [*(f"r{n}" for n in range(100, 105)), "r200"]
    for t in tasks:
        assert t.done()
    assert gw.waking.counts() == {} and ds.in_flight_total() == 8


async def test_the_wait_ends_at_the_bound_from_arrival_with_503_and_retry_after() -> None:
    clock = Clock()
    gw, ds = make(wake_timeout=10.0, clock=clock)
    await fill(gw)
    state = start(gw, 100)  # arrives at 1000.0
    clock.now += 9.8  # ... its body only now: 0.2 s of the 10 s bound left
    answer = await asyncio.wait_for(gw.decide(state, BODY), 10)
    assert isinstance(answer, Immediate) and answer.status == 503, answer
    assert answer.headers["retry-after"] == "3"  # the bound / 4, as the fair queue's
    error = orjson.loads(answer.body)["error"]
    assert error["code"] == "no_pod_available"
    assert "stayed saturated for 10s" in error["message"] and "'pool'" in error["message"]
    assert gw.waking.counts() == {} and ds.in_flight_total() == 8
    assert outcomes(gw) == {"timed_out": 1}


async def test_the_route_queue_max_wait_bounds_the_wait() -> None:
    clock = Clock()
    gw, _ = make(queue="  queue: {maxWait: 2s}\n", wake_timeout=600.0, clock=clock)
    await fill(gw)
    state = start(gw, 100)
    clock.now += 1.9
    answer = await asyncio.wait_for(gw.decide(state, BODY), 10)
    assert isinstance(answer, Immediate) and answer.status == 503, answer
    assert answer.headers["retry-after"] == "1" and b"for 2s" in answer.body


async def test_a_bound_of_0_answers_503_at_once() -> None:
    gw, _ = make(wake_timeout=0.0)
    await fill(gw)
    answer = await asyncio.wait_for(gw.decide(start(gw, 100), BODY), 5)
    assert isinstance(answer, Immediate) and answer.status == 503, answer
    assert b"saturated" in answer.body and "retry-after" not in answer.headers
    assert gw.waking.counts() == {} and outcomes(gw) == {}  # it never waited


async def test_envoy_is_told_to_wait_for_the_message_while_the_request_waits() -> None:
    gw, _ = make(wake_timeout=30.0)
    busy = await fill(gw)
    told: list[float] = []

    async def notice(seconds: float) -> None:
        told.append(seconds)

    async def decide() -> Routed | Immediate:
        queue_notice.set(notice)  # this task's ext_proc stream
        return await gw.decide(start(gw, 100), BODY)

    task = asyncio.create_task(decide())
    await until(lambda: gw.waking.counts() == {KEY: 1}, "the request waiting for room")
    assert told == [30.0 + QUEUE_TIMEOUT_MARGIN]
    gw.finish(busy[0])
    assert isinstance(await asyncio.wait_for(task, 10), Routed)


async def test_a_request_whose_client_goes_away_leaves_the_line() -> None:
    gw, ds = make()
    busy = await fill(gw)
    gone = asyncio.create_task(gw.decide(start(gw, 100), BODY))
    await until(lambda: gw.waking.counts() == {KEY: 1}, "lined up")
    stays = asyncio.create_task(gw.decide(start(gw, 101), BODY))
    await until(lambda: gw.waking.counts() == {KEY: 2}, "lined up")
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert gw.waking.state()[KEY]["forRoom"][0]["requestId"] == "r101"
    gw.finish(busy[0])
    answer = await asyncio.wait_for(stays, 10)
    assert isinstance(answer, Routed)
    assert gw.waking.counts() == {} and ds.in_flight_total() == 8
    assert outcomes(gw) == {"left": 1, "served": 1}


async def test_with_the_fair_queue_the_request_waits_there_not_in_the_line() -> None:
    gw, _ = make()
    policies = Policies(PolicySettings(), gw.metrics.registry)
    gw.policies = policies
    busy = await fill(gw)
    task = asyncio.create_task(gw.decide(start(gw, 100), BODY))
    await until(lambda: len(policies.queues.get(KEY, ())) == 1, "the request in the fair queue")
    assert gw.waking.counts() == {}
    gw.finish(busy[0])
    assert isinstance(await asyncio.wait_for(task, 10), Routed)
    await policies.close()


async def test_a_request_scheduled_just_as_its_client_goes_away_gives_its_pod_back() -> None:
    gw, ds = make()
    busy = await fill(gw)
    gone = asyncio.create_task(gw.decide(start(gw, 100), BODY))
    await until(lambda: gw.waking.counts() == {KEY: 1}, "lined up")
    ds.finish(busy[0].pod_name or "")  # room: the waiter is scheduled (in flight on p0) ...
    assert gw.waking.serve(KEY) == 1 and ds.in_flight_total() == 8
    gone.cancel()  # ... and its client goes away before it could answer
    await asyncio.gather(gone, return_exceptions=True)
    assert ds.in_flight_total() == 7 and gw.waking.counts() == {}
    assert outcomes(gw) == {"left": 1}  # its pod was given back: it was not served


async def test_a_scheduling_failure_while_waiting_is_its_answer_and_counted_failed() -> None:
    gw, ds = make()
    await fill(gw)
    task = asyncio.create_task(gw.decide(start(gw, 100), BODY))
    await until(lambda: gw.waking.counts() == {KEY: 1}, "lined up")
    ds.apply(config(text(""), []))  # the ModelServer loses its pod
    answer = await asyncio.wait_for(task, 10)
    assert isinstance(answer, Immediate) and answer.status == 503, answer
    assert outcomes(gw) == {"failed": 1}


async def test_no_ready_pod_for_a_moment_keeps_the_line_waiting_in_order() -> None:
    """The pod's scrape finds nothing listening (an engine restarting) while a request waits for
    room: it keeps its place, as in the fair queue, instead of a 503 while a newcomer (waiting
    for a ready pod) waits on; once the pod is back with room for one, the first in line gets
    it and the newcomer lines up behind."""
    gw, ds = make()
    busy = await fill(gw)
    first = asyncio.create_task(gw.decide(start(gw, 100), BODY))
    await until(lambda: gw.waking.counts() == {KEY: 1}, "lined up")
    ds.publish_metrics("p0", PodMetrics(stale=True, unreachable=True))  # not ready
    assert gw.waking.serve(KEY) == 0
    assert gw.waking.state()[KEY]["forRoom"][0]["requestId"] == "r100"  # still in line
    late = asyncio.create_task(gw.decide(start(gw, 101), BODY))
    await until(lambda: gw.waking.counts() == {KEY: 2}, "the newcomer waiting for a ready pod")
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=7, running=0))  # back: room for 1
    answer = await asyncio.wait_for(first, 10)
    assert isinstance(answer, Routed), answer
    await until(lambda: gw.waking.counts() == {KEY: 1}, "the newcomer in line")
    assert not late.done()
    gw.finish(busy[0])
    assert isinstance(await asyncio.wait_for(late, 10), Routed)
    assert outcomes(gw) == {"served": 2}


async def test_the_line_waits_while_no_pod_can_take_anyone_and_answers_the_rest() -> None:
    """The head keeps its place (and nobody overtakes) while every pod is saturated or none is
    ready; a failure of the head's own (no pod has its LoRA adapter) is its answer at once, as
    a newcomer's would be, and the requests behind it go on."""
    room = WakeRoom()
    head_error: list[Exception] = [AllPodsSaturated("full")]
    result: Any = object()

    def head() -> Any:
        raise head_error[0]

    first, second = Waiter(head, "r1"), Waiter(lambda: result, "r2")
    entries = [QueueEntry("", 0, 0, payload=w) for w in (first, second)]
    for entry in entries:
        room.join(KEY, entry)
    for error in (AllPodsSaturated("full"), NoPodReady("none of the 1 pod is ready")):
        head_error[0] = error
        assert room.serve(KEY) == 0 and not first.future.done() and not second.future.done()
    lora = NoPodAvailable("no pod can serve LoRA adapter 'x'")
    head_error[0] = lora
    assert room.serve(KEY) == 1
    assert first.future.exception() is lora and second.future.result() is result
    assert not room.waiting(KEY)
    for entry in entries:
        room.leave(KEY, entry)


async def test_requests_woken_from_zero_keep_their_arrival_order_into_the_line() -> None:
    """Requests that waited for a first pod are scheduled in arrival order when it is ready:
    the first 8 get it (then it looks saturated), the rest line up for room in the same order."""
    gw, ds = make()
    ds.publish_metrics("p0", PodMetrics(stale=True, unreachable=True))  # starting
    order: list[str] = []

    async def one(n: int) -> None:
        state = start(gw, n)
        answer = await gw.decide(state, BODY)
        assert isinstance(answer, Routed), answer
        order.append(state.request_id)

    tasks = []
    for n in range(12):
        tasks.append(asyncio.create_task(one(n)))
        await until(lambda: waiting(gw, ds) == len(tasks), "waiting for a ready pod")
    ds.publish_metrics("p0", PodMetrics(stale=False, waiting=0, running=0))  # ready, empty
    await until(lambda: gw.waking.counts() == {KEY: 4}, "the rest lined up for room")
    assert order == [f"r{n}" for n in range(8)]
    assert [w["requestId"] for w in gw.waking.state()[KEY]["forRoom"]] == [
        f"r{n}" for n in range(8, 12)
    ]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
