"""Global buckets in a real Redis: shared by replicas, atomic, fail-open/closed across an outage,
and end to end with two gateway stacks (two extproc replicas) sharing one budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
import redis.asyncio as aioredis
from openai import OpenAI

from extproc.errors import GatewayError
from extproc.policies.ratelimit import Buckets, Limits, output_reservation
from extproc.policies.redis_buckets import MAX_CONNECTIONS, RedisBuckets
from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric
from matrixinfer.testing.redis import RedisServer
from sim.fleet import Fleet
from tests.policies.conftest import KEYS, keys_yaml, policy_stack, write_config


@pytest.fixture
async def direct(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test's Redis, to read and write bucket hashes directly."""
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        yield client
    finally:
        await client.aclose()


def limits(redis: RedisServer, **kw: int) -> Limits:
    return Limits(
        kw.get("requests"), kw.get("input"), kw.get("output"), 3600.0, "route", redis.address
    )


async def test_drain_waits_for_settlements_already_on_their_way(redis_server: RedisServer) -> None:
    """drain() returns only when the settlements received so far are in Redis: also those a
    call already carries (the flush timer's, an admission's), not just the pending ones."""
    buckets = RedisBuckets(redis_server.address, timeout=5.0)
    lim = limits(redis_server, input=1000)
    try:
        assert (await buckets.admit("drain-1", lim, 100)).ok
        buckets.settle("drain-1", lim, 100, 40, 0)  # 60 of the reservation back
        in_flight = asyncio.create_task(buckets.flush())  # as the flush timer starts it
        await asyncio.sleep(0)  # it has taken the settlement and waits for Redis
        assert not buckets.pending and not in_flight.done()
        await buckets.drain()
        assert in_flight.done()
        level = await buckets.client.hget("mi:rl:drain-1", "i")
        assert 960 <= float(level) < 961  # 1000 - the 40 really used (+ a second's refill)
    finally:
        await buckets.close()


async def test_two_replicas_share_one_budget(redis_server: RedisServer) -> None:
    # a generous client timeout: this test is about atomic sharing, not outages (with the 100 ms
    # default a loaded CI machine timed calls out and the fail-open local buckets admitted more);
    # headroom=1: every admission asks Redis first (admitting ahead has tests of its own)
    a = RedisBuckets(redis_server.address, timeout=5.0, headroom=1.0)
    b = RedisBuckets(redis_server.address, timeout=5.0, headroom=1.0)
    lim = limits(redis_server, requests=10, input=1000)
    try:
        results = await asyncio.gather(
            *[(a if i % 2 else b).admit("shared-1", lim, 30) for i in range(40)]
        )
        assert sum(r.ok for r in results) == 10  # requests: exactly the budget, never more
        lim2 = limits(redis_server, input=1000)
        admitted = 0
        for i in range(40):
            r = await (a if i % 2 else b).admit("shared-2", lim2, 150)
            admitted += 150 if r.ok else 0
        assert 1000 <= admitted <= 1000 + 150  # budget plus one request's estimate
        denied = await a.admit("shared-2", lim2, 150)
        assert not denied.ok and denied.retry_after > 0
        assert denied.headers["x-ratelimit-limit-input-tokens"] == "1000"
        # settlement returns an over-estimate and debits output from the exact usage
        lim3 = limits(redis_server, input=100, output=100)
        assert (await a.admit("shared-3", lim3, 90)).ok
        b.settle("shared-3", lim3, 90, 10, 150)  # prompt 10 (80 back), 150 output tokens
        await b.flush()  # (else carried on b's next admission)
        r = await a.admit("shared-3", lim3, 1)
        assert not r.ok and "output tokens" in r.reason  # the output bucket is in debt
        assert r.headers["x-ratelimit-remaining-input-tokens"] == "90"  # the 10 really used
    finally:
        await a.close()
        await b.close()


async def test_outage_fail_open_then_closed_then_recovery(redis_server: RedisServer) -> None:
    events: list[bool] = []
    now = [0.0]  # the injected clock: the retry wait passes without sleeping
    local = Buckets()
    # headroom=1: each admission asks Redis (one admitted ahead right after the stop would be
    # answered before the outage is known: test_a_charge_redis_did_not_take_is_replayed)
    open_ = RedisBuckets(
        redis_server.address, fail_open=True, fallback=local, retry_after=0.2,
        on_outage=events.append, headroom=1.0, clock=lambda: now[0],
    )  # fmt: skip
    closed = RedisBuckets(
        redis_server.address, fail_open=False, retry_after=0.2, headroom=1.0, clock=lambda: now[0]
    )
    lim = limits(redis_server, requests=1000)
    try:
        assert (await open_.admit("outage", lim, 1)).ok
        redis_server.stop()
        # fail-open: answered from the local fallback bucket, the outage is reported once
        r = await open_.admit("outage", lim, 1)
        assert r.ok and events == [True]
        assert "outage" in local.state
        # fail-closed: 503 naming the limiter
        with pytest.raises(GatewayError) as exc:
            await closed.admit("outage", lim, 1)
        assert exc.value.status == 503 and exc.value.code == "rate_limiter_unavailable"
        redis_server.restart()
        now[0] += 0.25  # past retry_after: the next call tries Redis again

        async def back() -> bool:
            return (await closed.admit("outage", lim, 1)).ok

        assert await back()
        assert (await open_.admit("outage", lim, 1)).ok
        assert events == [True, False] and open_.down_since is None
    finally:
        if not redis_server.answers():
            redis_server.restart()
        await open_.close()
        await closed.close()


GLOBAL_ROUTES = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: pool}}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {{matchLabels: {{app: sim}}}}
  workloadPort: {{port: 8000}}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: shared}}
spec:
  modelName: shared-model
  rateLimit:
    requestsPerUnit: 12
    unit: hour
    global: {{redis: {{address: "{address}"}}}}
  rules: [{{targets: [{{modelServerName: pool}}]}}]
"""


@pytest.fixture(scope="module")
def two_stacks(
    tmp_path_factory: pytest.TempPathFactory, policy_fleet: Fleet, redis_server: RedisServer
) -> Iterator[tuple[GatewayStack, GatewayStack]]:
    config = tmp_path_factory.mktemp("global-config")
    write_config(config, policy_fleet, GLOBAL_ROUTES.format(address=redis_server.address))
    secrets = tmp_path_factory.mktemp("global-secrets")
    (secrets / "keys.yaml").write_text(keys_yaml(KEYS))
    (secrets / "auth.yaml").write_text(f"apiKeysFile: {secrets / 'keys.yaml'}\n")
    args = ("--auth-config", str(secrets / "auth.yaml"), "--ratelimit-fail", "open")
    first = policy_stack(config, tmp_path_factory.mktemp("g1"), policy_fleet, args)
    try:
        second = policy_stack(config, tmp_path_factory.mktemp("g2"), policy_fleet, args)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        second.stop()
        first.stop()


def ask(stack: GatewayStack) -> bool:
    c = OpenAI(base_url=stack.url, api_key="key-alice", max_retries=0, timeout=20)
    try:
        c.chat.completions.create(
            model="shared-model", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    except openai.RateLimitError:
        return False
    return True


def redis_admissions(stack: GatewayStack, decided: str) -> float:
    """``matrixinfer_gateway_ratelimit_redis_admissions_total{decided}`` of a stack."""
    return metric(stack, "matrixinfer_gateway_ratelimit_redis_admissions_total", decided=decided)


def test_two_gateways_share_the_redis_budget_and_survive_an_outage(
    two_stacks: tuple[GatewayStack, GatewayStack], redis_server: RedisServer, tmp_path: Path
) -> None:
    first, second = two_stacks
    admitted = sum(ask(first if i % 2 else second) for i in range(20))
    assert admitted == 12  # one global budget across both replicas
    # far from the limit some went ahead of Redis, near it Redis decided: all 12 are counted
    by = {d: [redis_admissions(s, d) for s in two_stacks] for d in ("ahead", "redis")}
    assert sum(by["ahead"]) + sum(by["redis"]) == 12, by
    assert sum(by["redis"]) >= 2, by
    redis_server.stop()
    try:
        # fail-open: each replica falls back to its own local bucket (the same 12/hour), no crash
        assert ask(first) and ask(second)
        wait_until(lambda: "failing open" in first.extproc.log_tail(200), 5, "the outage is logged")
        assert redis_admissions(first, "fallback") == 1  # counted as the local fallback's
    finally:
        redis_server.restart()
    # Redis came back empty (no persistence): the shared budget starts again and is shared again
    wait_until(
        lambda: ask(first) and "is back after" in first.extproc.log_tail(200),
        10,
        "the gateway uses Redis again",
    )
    assert first.extproc.running() and second.extproc.running()


async def test_settlements_during_an_outage_are_replayed(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    now = [0.0]
    buckets = RedisBuckets(
        redis_server.address, fail_open=True, retry_after=0.2, clock=lambda: now[0]
    )
    lim = limits(redis_server, input=1000, output=1000)
    try:
        before = await buckets.admit("replay", lim, 100)
        assert before.ok and before.where == "redis"
        redis_server.stop()
        buckets.settle("replay", lim, 100, 40, 300, "redis")
        await buckets.flush()  # Redis down: kept
        during = await buckets.admit("replay", lim, 10)  # fail-open: a local reservation
        assert during.ok and during.where == "local"
        buckets.settle("replay", lim, 10, 10, 200, "local")  # charged locally and kept
        assert len(buckets.pending) == 2
        redis_server.restart()
        now[0] += 0.25  # past retry_after
        # Redis restarted empty (no persistence): the replay charges the outage's usage to the
        # fresh shared bucket — nothing settled during the outage is lost
        assert (await buckets.admit("replay", lim, 0)).ok
        assert not buckets.pending and buckets.replayed == 2
        level = float(await direct.hget("mi:rl:replay", "o") or 0)
        assert level == pytest.approx(1000 - 300 - 200, abs=1)
    finally:
        if not redis_server.answers():
            redis_server.restart()
        await buckets.close()


async def test_settlements_ride_on_the_next_admission(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """One round trip per request: the settlements a replica received go with its next
    admission (settled first, so that admission sees them), in one script call."""
    buckets = RedisBuckets(redis_server.address, timeout=5.0, flush_delay=30.0)
    lim = limits(redis_server, input=1000, output=100)
    other = limits(redis_server, requests=5)
    calls = 0
    script = buckets.script

    async def counted(**kw: object) -> object:
        nonlocal calls
        calls += 1
        return await script(**kw)

    buckets.script = counted
    try:
        assert (await buckets.admit("ride-a", lim, 100)).ok
        assert (await buckets.admit("ride-b", other, 0)).ok
        buckets.settle("ride-a", lim, 100, 30, 120)  # 70 back, the output bucket in debt by 20
        buckets.settle("ride-b", other, 0, 0, 0)
        assert len(buckets.pending) == 2 and calls == 2  # nothing written yet (flush in 30 s)
        denied = await buckets.admit("ride-a", lim, 10)  # settles both, then admits: in debt
        assert calls == 3 and not buckets.pending
        assert not denied.ok and "output tokens" in denied.reason
        assert denied.headers["x-ratelimit-remaining-input-tokens"] == "970"
        assert float(await direct.hget("mi:rl:ride-b", "r") or 0) == pytest.approx(4, abs=0.01)
        assert await direct.ttl("mi:rl:ride-a") > 3600  # expires once full again, plus a unit
    finally:
        await buckets.close()


async def test_settlements_without_admissions_are_flushed(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    buckets = RedisBuckets(redis_server.address, timeout=5.0, flush_delay=0.02)
    lim = limits(redis_server, output=1000)
    try:
        assert (await buckets.admit("flushed", lim, 0)).ok
        for _ in range(3):
            buckets.settle("flushed", lim, 0, 0, 100)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while float(await direct.hget("mi:rl:flushed", "o") or 0) > 750:
            assert loop.time() < deadline, "the flush timer did not write the settlements"
            await asyncio.sleep(0.01)
        assert not buckets.pending
        level = float(await direct.hget("mi:rl:flushed", "o") or 0)
        assert level == pytest.approx(700, abs=1)
    finally:
        await buckets.close()


async def test_close_writes_pending_settlements(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    buckets = RedisBuckets(redis_server.address, timeout=5.0, flush_delay=30.0)
    lim = limits(redis_server, output=1000)
    try:
        assert (await buckets.admit("closing", lim, 0)).ok
        buckets.settle("closing", lim, 0, 0, 400)
    finally:
        await buckets.close()  # writes the pending settlement
    level = float(await direct.hget("mi:rl:closing", "o") or 0)
    assert level == pytest.approx(600, abs=1)


async def test_a_cancelled_admission_still_writes_what_it_carried(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """The client of the admitting request goes away while its admission is in Redis: the
    settlements that admission carried still reach Redis (once). (headroom=1: the admission
    asks Redis first; one admitted ahead never waits, so there is nothing to cancel.)"""
    buckets = RedisBuckets(redis_server.address, timeout=5.0, flush_delay=30.0, headroom=1.0)
    lim = limits(redis_server, output=1000)
    try:
        assert (await buckets.admit("cancelled", lim, 0)).ok
        buckets.settle("cancelled", lim, 0, 0, 250)
        task = asyncio.create_task(buckets.admit("cancelled", lim, 0))
        await asyncio.sleep(0)  # the call is sent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while float(await direct.hget("mi:rl:cancelled", "o") or 0) > 800:
            assert loop.time() < deadline, "the carried settlement was lost"
            await asyncio.sleep(0.01)
        assert not buckets.pending
        await buckets.flush()
        level = float(await direct.hget("mi:rl:cancelled", "o") or 0)
        assert level == pytest.approx(750, abs=1)
    finally:
        await buckets.close()


async def test_a_settlement_on_a_foreign_key_does_not_fail_the_admission_carrying_it(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """Something else wrote a string at a bucket's key: its settlement is left out (counted,
    logged); the admission that carries it and the other settlements go through."""
    buckets = RedisBuckets(redis_server.address, timeout=5.0, flush_delay=30.0)
    lim = limits(redis_server, output=1000)
    try:
        assert (await buckets.admit("good", lim, 0)).ok
        await direct.set("mi:rl:foreign", "not a hash")
        buckets.settle("foreign", lim, 0, 0, 10)
        buckets.settle("good", lim, 0, 0, 300)
        admitted = await buckets.admit("good", lim, 0)
        await buckets.drain()  # (admitted ahead: its charge carries the settlements)
        assert admitted.ok and admitted.where == "redis" and buckets.down_since is None
        assert buckets.skipped == 1 and not buckets.pending
        assert float(await direct.hget("mi:rl:good", "o") or 0) == pytest.approx(700, abs=1)
        assert await direct.get("mi:rl:foreign") == b"not a hash"
    finally:
        await buckets.close()


def counting(buckets: RedisBuckets) -> list[int]:
    """Count the script calls ``buckets`` makes: [calls]."""
    calls = [0]
    script = buckets.script

    async def counted(**kw: object) -> object:
        calls[0] += 1
        return await script(**kw)

    buckets.script = counted
    return calls


async def test_far_from_the_limit_an_admission_does_not_wait_for_redis(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """With a recent view of the key and plenty left, the request is admitted at once and
    charged to Redis behind it; the charge takes exactly what an asked-first admission takes."""
    buckets = RedisBuckets(redis_server.address, timeout=5.0, fresh_for=5.0)
    calls = counting(buckets)
    lim = limits(redis_server, requests=100, input=10_000)
    try:
        assert (await buckets.admit("ahead", lim, 100)).ok  # no view yet: asks Redis
        assert calls[0] == 1 and buckets.ahead == 0
        task = asyncio.create_task(buckets.admit("ahead", lim, 100))
        await asyncio.sleep(0)  # one step: it never waits for Redis
        assert task.done() and task.result().ok and task.result().where == "redis"
        assert buckets.ahead == 1 and calls[0] == 1  # the charge has not even started
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        # 2 ms later: a read (its script call starts in a task of its own)
        while calls[0] < 2 or buckets.pending or buckets.mirrors["ahead"].reading:
            assert loop.time() < deadline, "the charge was not sent"
            await asyncio.sleep(0.005)
        assert calls[0] == 2  # the read carried the charge
        r, i = await direct.hmget("mi:rl:ahead", "r", "i")
        assert float(r or 0) == pytest.approx(98, abs=0.1)
        assert float(i or 0) == pytest.approx(9800, abs=5)
    finally:
        await buckets.close()


async def test_a_charge_goes_with_whichever_call_is_first(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """The charges of requests admitted ahead wait like settlements: an admission that asks
    Redis (here: the replica owes max_owed charges already) carries them and is decided after
    them, so it sees every request this replica has admitted."""
    buckets = RedisBuckets(
        redis_server.address, timeout=5.0, fresh_for=5.0, max_owed=2, charge_delay=1.0
    )
    calls = counting(buckets)
    lim = limits(redis_server, requests=100)
    try:
        assert (await buckets.admit("first-call", lim, 0)).ok  # asks (no view yet)
        assert (await buckets.admit("first-call", lim, 0)).ok  # ahead
        assert (await buckets.admit("first-call", lim, 0)).ok  # ahead
        assert calls[0] == 1 and buckets.ahead == 2 and len(buckets.pending) == 2
        task = asyncio.create_task(buckets.admit("first-call", lim, 0))
        await asyncio.sleep(0)
        assert not task.done()  # two charges owed: this one asks Redis, carrying them
        assert (await task).ok and calls[0] == 2 and not buckets.pending
        assert float(await direct.hget("mi:rl:first-call", "r") or 0) == pytest.approx(96, abs=0.1)
        assert buckets.mirrors["first-call"].owed == 0
    finally:
        await buckets.close()


async def test_concurrent_streams_against_an_output_budget_two_replicas(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """Eight streams of max_tokens 300 at once, from two replicas with fresh views of the key,
    against 100 output tokens: the reservation (300, capped at 100) leaves no headroom, so no
    replica admits ahead; Redis admits one and refuses seven. Its exact usage then refunds what
    it did not use, for both replicas; an admission ahead charges its reservation."""
    a = RedisBuckets(redis_server.address, timeout=5.0, fresh_for=60.0)
    b = RedisBuckets(redis_server.address, timeout=5.0, fresh_for=60.0)
    lim = Limits(None, None, 100, 60.0, "user", redis_server.address)
    await direct.delete("mi:rl:streams")
    try:
        for replica in (a, b):  # a fresh view each (a read), so that admitting ahead is possible
            await replica._call([], ("streams", lim, 0, 0), True)
        reserve = output_reservation(lim, 300)
        results = await asyncio.gather(
            *[(a if n % 2 else b).admit("streams", lim, 0, reserve) for n in range(8)]
        )
        assert sum(r.ok for r in results) == 1 and a.ahead == b.ahead == 0
        refused = next(r for r in results if not r.ok)
        assert refused.limit == "output-tokens" and refused.retry_after > 50
        winner = a if results.index(next(r for r in results if r.ok)) % 2 else b
        winner.settle("streams", lim, 0, 0, 30, "redis", reserve)  # 30 answered: 70 back
        await winner.drain()
        level = float(await direct.hget("mi:rl:streams", "o") or 0)
        assert 70 <= level < 72  # (+ the refill of the test's seconds)
        other = b if winner is a else a
        assert not (await other.admit("streams", lim, 0, 80)).ok  # 80 not covered
        # far from the limit and with a fresh view, an output reservation still asks Redis
        assert (await other.admit("streams", lim, 0, 10)).ok
        assert (await other.admit("streams", lim, 0, 10)).ok and other.ahead == 0
        await other.drain()
        assert 50 <= float(await direct.hget("mi:rl:streams", "o") or 0) < 52
    finally:
        await a.close()
        await b.close()


async def test_output_reservations_across_replicas_stay_within_one_reservation(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """Three replicas with fresh views and a full bucket, 30 concurrent requests reserving 10
    output tokens each against 100: whatever the interleaving, the admitted reservations stay
    within the budget plus one reservation (each replica alone would have admitted 7 ahead)."""
    replicas = [RedisBuckets(redis_server.address, timeout=5.0, fresh_for=60.0) for _ in range(3)]
    lim = Limits(None, None, 100, 3600.0, "user", redis_server.address)
    await direct.delete("mi:rl:spread")
    try:
        for replica in replicas:
            await replica._call([], ("spread", lim, 0, 0), True)
        results = await asyncio.gather(
            *[replicas[n % 3].admit("spread", lim, 0, 10) for n in range(30)]
        )
        admitted = 10 * sum(r.ok for r in results)
        assert admitted + 10 >= 100 and admitted <= 100 + 10
        assert all(r.ahead == 0 for r in replicas)
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_stale_view_asks_redis_first(redis_server: RedisServer) -> None:
    now = [0.0]
    buckets = RedisBuckets(redis_server.address, timeout=5.0, clock=lambda: now[0])
    lim = limits(redis_server, requests=100)
    try:
        assert (await buckets.admit("stale", lim, 0)).ok
        now[0] += buckets.fresh_for + 0.01  # no reply for the key since: the view is too old
        task = asyncio.create_task(buckets.admit("stale", lim, 0))
        await asyncio.sleep(0)
        assert not task.done()  # waiting for Redis
        assert (await task).ok and buckets.ahead == 0
        assert buckets.sweep(60.0) == 0 and "stale" in buckets.mirrors
        now[0] += 61  # the view of a key not heard of for a minute is dropped
        assert buckets.sweep(60.0) == 1 and not buckets.mirrors
    finally:
        await buckets.close()


async def test_a_burst_beyond_the_connection_pool_waits_not_fails_open(
    redis_server: RedisServer,
) -> None:
    """More admissions at once than the replica has connections to Redis: the rest wait for a
    connection (Redis is not down), none is taken as an outage that would fail open."""
    outages: list[bool] = []
    buckets = RedisBuckets(redis_server.address, timeout=10.0, on_outage=outages.append)
    lim = limits(redis_server, input=1000)
    try:
        n = MAX_CONNECTIONS * 3
        results = await asyncio.gather(*(buckets.admit(f"burst-{i}", lim, 10) for i in range(n)))
        assert outages == []
        assert all(r.ok and not r.ahead for r in results)  # Redis's decisions, each of them
        assert len(buckets.client.connection_pool._in_use_connections) == 0
    finally:
        await buckets.close()


async def test_near_the_limit_redis_decides(redis_server: RedisServer) -> None:
    """Admitting ahead stops once less than the headroom would be left: the last admissions and
    the refusal are Redis's own, so one replica never takes more than budget + one estimate."""
    buckets = RedisBuckets(redis_server.address, timeout=5.0, fresh_for=5.0)
    lim = limits(redis_server, input=1000)
    try:
        admitted = 0
        for _ in range(20):
            if (await buckets.admit("near", lim, 100)).ok:
                admitted += 100
        assert 1000 <= admitted <= 1100
        assert buckets.ahead > 0  # some went ahead (while more than 250 stayed)
        denied = await buckets.admit("near", lim, 100)
        assert not denied.ok and denied.headers["x-ratelimit-limit-input-tokens"] == "1000"
    finally:
        await buckets.close()


async def test_two_replicas_admitting_ahead_hold_the_budget(redis_server: RedisServer) -> None:
    """Two replicas alternate; each hears from Redis after each of its requests (its charge is
    in), so its view misses at most the other's one request (150 < the headroom of 250)."""
    a = RedisBuckets(redis_server.address, timeout=5.0, fresh_for=5.0)
    b = RedisBuckets(redis_server.address, timeout=5.0, fresh_for=5.0)
    lim = limits(redis_server, input=1000)
    try:
        admitted = 0
        for i in range(40):
            replica = a if i % 2 else b
            if (await replica.admit("ahead-shared", lim, 150)).ok:
                admitted += 150
            await replica.drain()
        assert 1000 <= admitted <= 1000 + 150  # budget plus one request's estimate
        assert a.ahead > 0 and b.ahead > 0
    finally:
        await a.close()
        await b.close()


async def test_a_charge_redis_did_not_take_is_replayed(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """Admitted ahead just as Redis went away: the charge fails, is kept (a request and the
    estimate), and reaches Redis with the next call once it is back."""
    now = [0.0]
    buckets = RedisBuckets(
        redis_server.address, retry_after=0.2, timeout=2.0, fresh_for=5.0, clock=lambda: now[0]
    )
    lim = limits(redis_server, requests=100, input=1000)
    try:
        assert (await buckets.admit("kept-charge", lim, 50)).ok
        redis_server.stop()
        admitted = await buckets.admit("kept-charge", lim, 50)
        assert admitted.ok and buckets.ahead == 1  # the outage is not known yet
        await buckets.drain()  # the charge fails: kept
        assert buckets.down_since is not None
        assert [(s.requests, s.correction) for s in buckets.pending] == [(1, -50)]
        redis_server.restart()  # empty (no persistence)
        now[0] += 0.25  # past retry_after (the retry timer may write the charge now)
        # the view from before the outage is not used: this admission asks Redis (and carries
        # the kept charge unless the timer has written it)
        task = asyncio.create_task(buckets.admit("kept-charge", lim, 0))
        await asyncio.sleep(0)
        assert not task.done() and (await task).ok and buckets.ahead == 1
        assert buckets.replayed == 1 and not buckets.pending and buckets.down_since is None
        r, i = await direct.hmget("mi:rl:kept-charge", "r", "i")
        assert float(r or 0) == pytest.approx(98, abs=0.1)  # the kept request and this one
        assert float(i or 0) == pytest.approx(950, abs=1)
    finally:
        if not redis_server.answers():
            redis_server.restart()
        await buckets.close()


def test_headroom_must_be_positive(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="headroom must be > 0"):
        RedisBuckets(redis_server.address, headroom=0)


def test_redis_headroom_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prometheus_client import CollectorRegistry

    from extproc.main import build_policies, parse_args
    from extproc.metrics import GatewayMetrics

    args = parse_args(["--config", str(tmp_path), "--policies", "--redis-headroom", "0.5"])
    policies = build_policies(args, GatewayMetrics(CollectorRegistry()))
    assert policies.settings.redis_headroom == 0.5
    assert parse_args(["--config", str(tmp_path)]).redis_headroom == 0.25
    for bad, named in (("0", "must be in (0, 1], got 0"), ("lots", "not a number: 'lots'")):
        with pytest.raises(SystemExit):
            parse_args(["--config", str(tmp_path), "--redis-headroom", bad])
        assert named in capsys.readouterr().err


async def test_a_call_answered_after_its_deadline_is_applied_once(tmp_path: Path) -> None:
    """Redis runs a call that it answers after the call's deadline (it was busy): the call's
    settlement must not be sent again (applied twice, it charged a request twice: the suite saw
    a shared budget 13 tokens short under load), and an admission it granted while the request
    was decided without Redis is given back."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    assert binary is not None
    server = RedisServer(binary, tmp_path, ("--enable-debug-command", "local"), name="redis-debug")
    server.start()
    buckets = RedisBuckets(server.address, timeout=0.1, late_limit=30.0)
    lim = limits(server, input=1000)
    direct = aioredis.Redis(host="127.0.0.1", port=server.port)

    async def input_level(key: str) -> float:
        return float(await direct.hget(f"mi:rl:{key}", "i"))  # type: ignore[arg-type]

    def busy_redis(seconds: float) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
        return s

    try:
        assert (await buckets.admit("late", lim, 10)).ok  # by Redis: 990 left
        buckets.settle("late", lim, estimate=10, prompt=23, completion=0)  # 13 more
        await direct.set("mi:rl:late-foreign", "not a hash")
        buckets.settle("late-foreign", lim, estimate=10, prompt=23, completion=0)
        blocker = busy_redis(0.6)
        await asyncio.sleep(0.1)  # Redis is asleep before the flush's call reaches it
        await buckets.flush()  # past its deadline: Redis runs it once awake
        late2 = await buckets.admit("late2", lim, 10)  # decided without Redis (the outage)
        assert late2.ok
        blocker.close()
        await buckets.drain()
        await asyncio.sleep(buckets.retry_after + 0.1)  # the outage's wait is over
        await buckets.drain()
        assert buckets.late >= 1
        assert 977 <= await input_level("late") < 977.5  # once: 1000 - 10 - 13 (+ refill)
        assert buckets.skipped == 1  # a late answer's skipped settlement is counted too
        # an admission Redis granted after its deadline: the reservation is given back
        blocker = busy_redis(0.6)
        await asyncio.sleep(0.1)
        assert (await buckets.admit("late3", lim, 10)).ok  # fails open; Redis reserves later
        blocker.close()
        await buckets.drain()
        await asyncio.sleep(buckets.retry_after + 0.1)  # the refund waits out the outage
        await buckets.drain()
        assert await input_level("late3") >= 999.9, await input_level("late3")
    finally:
        await direct.aclose()
        await buckets.close()
        server.stop()


async def test_a_call_still_unanswered_at_its_late_limit_is_applied_once(tmp_path: Path) -> None:
    """Redis is busy past a call's ``late_limit``: the call is given up and its settlements are
    sent again (and again: each resend also goes unanswered) while every one of those calls still
    waits in Redis, which runs them all once awake. The settlement batch carries one id that the
    script records: only the first of those calls to run applies it."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    assert binary is not None
    server = RedisServer(binary, tmp_path, ("--enable-debug-command", "local"), name="redis-debug")
    server.start()
    buckets = RedisBuckets(server.address, timeout=0.1, late_limit=0.2, retry_after=0.2)
    lim = limits(server, input=1000)
    direct = aioredis.Redis(host="127.0.0.1", port=server.port)
    try:
        assert (await buckets.admit("resent", lim, 10)).ok  # by Redis: 990 left
        buckets.settle("resent", lim, estimate=10, prompt=23, completion=0)  # 13 more
        blocker = socket.create_connection(("127.0.0.1", server.port))
        blocker.sendall(b"DEBUG SLEEP 1.5\r\n")
        await asyncio.sleep(0.1)  # Redis is asleep before the flush's call reaches it
        await buckets.flush()  # unanswered: given up after late_limit, then sent again
        await asyncio.sleep(1.5)  # Redis is awake and has run every call
        deadline = time.monotonic() + 30
        while buckets.pending or buckets._tasks:  # resends under way, or waiting for late answers
            assert time.monotonic() < deadline, "the settlement never reached Redis"
            await buckets.drain()
            await asyncio.sleep(0.05)
        blocker.close()
        assert buckets.replayed >= 1  # it was sent again after the first call was given up
        level = float(await direct.hget("mi:rl:resent", "i"))  # type: ignore[arg-type]
        assert 977 <= level < 977.5, f"applied {(990 - level) / 13:.2f} times"  # 1000 - 10 - 13
        assert buckets.repeated >= 1  # the calls that ran it again skipped it
    finally:
        await direct.aclose()
        await buckets.close()
        server.stop()


async def test_a_late_answer_ends_the_outage_a_slow_call_started(tmp_path: Path) -> None:
    """Redis is slow once (busy past a call's deadline), not gone: the call's late answer shows
    it is there, so admissions go back to Redis at once instead of failing closed for the whole
    ``retry_after``."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    assert binary is not None
    server = RedisServer(binary, tmp_path, ("--enable-debug-command", "local"), name="redis-slow")
    server.start()
    events: list[bool] = []
    buckets = RedisBuckets(
        server.address, fail_open=False, timeout=0.1, retry_after=3600.0, headroom=1.0,
        on_outage=events.append,
    )  # fmt: skip
    lim = limits(server, requests=1000)
    try:
        assert (await buckets.admit("slow", lim, 1)).ok
        blocker = socket.create_connection(("127.0.0.1", server.port))
        blocker.sendall(b"DEBUG SLEEP 0.5\r\n")
        await asyncio.sleep(0.1)  # Redis is asleep before the next call reaches it
        with pytest.raises(GatewayError) as exc:  # past its deadline: fail closed
            await buckets.admit("slow", lim, 1)
        assert exc.value.code == "rate_limiter_unavailable" and events == [True]
        deadline = time.monotonic() + 30
        while buckets.down_since is not None:  # Redis wakes and answers the call late
            assert time.monotonic() < deadline, "the late answer did not end the outage"
            await asyncio.sleep(0.05)
        blocker.close()
        assert events == [True, False]
        assert (await buckets.admit("slow", lim, 1)).ok  # by Redis, long before retry_after
    finally:
        await buckets.close()
        server.stop()


async def test_a_cancelled_admission_gives_its_reservation_back(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """The client goes away while Redis decides its admission: no request uses what Redis
    reserves for it, so the reservation (the input estimate, the output reservation — a whole
    output budget for a request without max_tokens) comes back. It stayed taken: nothing
    settles a request that was never admitted."""
    buckets = RedisBuckets(redis_server.address, timeout=5.0, headroom=1.0)
    lim = limits(redis_server, input=1000, output=1000)
    try:
        task = asyncio.create_task(buckets.admit("gone", lim, 100, 300))
        await asyncio.sleep(0)  # the admission is on its way to Redis
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            await buckets.drain()
            levels = await direct.hmget("mi:rl:gone", ["i", "o"])
            if [float(v) for v in levels if v is not None] == [1000.0, 1000.0]:
                break
            assert loop.time() < deadline, f"the reservation was not given back: {levels}"
            await asyncio.sleep(0.01)
    finally:
        await buckets.close()


async def test_an_admission_on_a_foreign_key_writes_nothing_it_carries(
    redis_server: RedisServer, direct: aioredis.Redis
) -> None:
    """Something else wrote a string at the admission's own key: the call fails (an outage, as
    documented) — and must write none of the settlements it carries, since a failed call's
    settlements are queued again: Redis keeps a script's writes made before its error, so they
    were applied once by the failed call and once more by the next one."""
    buckets = RedisBuckets(
        redis_server.address, timeout=5.0, flush_delay=30.0, headroom=1.0, retry_after=0.05
    )
    lim = limits(redis_server, output=1000)
    try:
        assert (await buckets.admit("carried", lim, 0)).ok
        await direct.set("mi:rl:taken", "not a hash")
        buckets.settle("carried", lim, 0, 0, 300)
        admitted = await buckets.admit("taken", lim, 0)  # carries the settlement; fails
        assert admitted.where == "local" and buckets.down_since is not None
        await asyncio.sleep(buckets.retry_after)
        await buckets.drain()
        assert not buckets.pending and buckets.replayed == 1
        assert float(await direct.hget("mi:rl:carried", "o") or 0) == pytest.approx(700, abs=1)
    finally:
        await buckets.close()
