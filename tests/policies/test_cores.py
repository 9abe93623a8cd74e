"""Pure cores: token buckets and the fair queue (hypothesis state machines), the usage ledger."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from extproc.policies.queue import FairQueue, QueueEntry, UsageWindow
from extproc.policies.ratelimit import (
    Admission,
    Buckets,
    Limits,
    bucket_key,
    decide,
    output_reservation,
    rate_limited,
)
from extproc.policies.usage import Charge, Usage, UsageLedger, force_usage, usage_from_fields


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


PERIOD = 60.0
INPUT = 1000
OUTPUT = 500
ESTIMATE = 200  # output reserved by a request without max_tokens (rateLimit.outputTokensEstimate)
REQUESTS = 20


class BucketMachine(RuleBasedStateMachine):
    """Whatever the order of admissions, settlements and time — any number of requests open at
    once: input admitted never exceeds the budget plus its refill plus one request's estimate;
    output admitted (reservations of open requests, exact completions of settled ones) never
    exceeds the budget plus its refill, but for answers beyond their reservation (debt, which
    blocks admission); the engine stops at ``max_tokens``, so with ``max_tokens`` within the
    budget that part is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.start = self.clock.now
        self.buckets = Buckets(self.clock)
        self.limits = Limits(REQUESTS, INPUT, OUTPUT, PERIOD, output_estimate=ESTIMATE)
        # (estimate, real prompt, output reserved, most output the engine may answer)
        self.open: list[tuple[int, int, int, int]] = []
        self.admitted_requests = 0
        self.input_charged = 0  # estimates of open requests + real prompts of settled ones
        self.output_charged = 0  # reservations of open requests + completions of settled ones
        self.excess = 0  # output answered beyond its reservation (settled)

    def budget(self, cap: int) -> float:
        return cap + cap * (self.clock.now - self.start) / PERIOD

    @rule(
        estimate=st.integers(0, 3000),
        real=st.integers(0, 3000),
        max_tokens=st.none() | st.integers(0, 2 * OUTPUT),
    )
    def admit(self, estimate: int, real: int, max_tokens: int | None) -> None:
        before = self.buckets.levels("k", self.limits)
        reserve = output_reservation(self.limits, max_tokens)
        assert reserve == min(ESTIMATE if max_tokens is None else max_tokens, OUTPUT)
        adm = self.buckets.admit("k", self.limits, estimate, reserve)
        assert adm.ok == decide(self.limits, before, reserve).ok
        if adm.ok:
            # admitted only while everything charged so far (estimates of open requests, exact
            # prompts of settled ones) is below the budget: beyond it by one estimate at most
            assert self.input_charged < self.budget(INPUT) + 1e-6
            # the output reservation is covered: with it, what was charged is within the budget
            assert self.output_charged + reserve <= self.budget(OUTPUT) + 1e-6
            assert self.admitted_requests + 1 <= self.budget(REQUESTS) + 1e-6
            most = 3 * OUTPUT if max_tokens is None else max_tokens
            self.open.append((estimate, real, reserve, most))
            self.admitted_requests += 1
            self.input_charged += estimate
            self.output_charged += reserve
        else:
            assert adm.retry_after > 0
            assert adm.headers["x-ratelimit-limit-input-tokens"] == str(INPUT)
            assert adm.limit in ("requests", "input-tokens", "output-tokens")

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 100), share=st.floats(0, 1))
    def settle(self, index: int, share: float) -> None:
        estimate, real, reserved, most = self.open.pop(index % len(self.open))
        completion = round(share * most)
        self.buckets.settle("k", self.limits, estimate, real, completion, reserved)
        self.input_charged += real - estimate
        self.output_charged += completion - reserved
        self.excess += max(0, completion - reserved)

    @rule(dt=st.floats(0, 120))
    def wait(self, dt: float) -> None:
        self.clock.now += dt

    @invariant()
    def never_beyond_budget_plus_one_request(self) -> None:
        assert self.admitted_requests <= self.budget(REQUESTS) + 1e-6

    @invariant()
    def output_within_budget_but_for_answers_beyond_their_reservation(self) -> None:
        assert self.output_charged <= self.budget(OUTPUT) + self.excess + 1e-6

    @invariant()
    def debt_blocks(self) -> None:
        r, i, o = self.buckets.levels("k", self.limits)
        if i <= 0 or o < 1 or r < 1:
            assert not decide(self.limits, (r, i, o)).ok


TestBuckets = BucketMachine.TestCase
TestBuckets.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_concurrent_streams_against_an_output_budget_reserve_max_tokens() -> None:
    """Eight streams of max_tokens 300 at once against 100 output tokens a minute: the first
    reserves the whole budget (300 capped at 100), the other seven are refused before any usage
    is reported; its exact usage then refunds what it did not use."""
    clock = Clock()
    buckets = Buckets(clock)
    limits = Limits(None, None, 100, 60.0, "user")
    reserve = output_reservation(limits, 300)
    results = [buckets.admit("u", limits, 10, reserve) for _ in range(8)]
    assert [r.ok for r in results] == [True] + [False] * 7
    refused = results[1]
    assert refused.limit == "output-tokens" and "reserves 100" in refused.reason
    assert refused.retry_after == pytest.approx(60.0)  # the whole budget must refill
    assert refused.headers["x-ratelimit-remaining-output-tokens"] == "0"
    buckets.settle("u", limits, 10, 10, 40, reserve)  # 40 answered: 60 back
    assert buckets.levels("u", limits)[2] == pytest.approx(60.0)
    assert not buckets.admit("u", limits, 10, output_reservation(limits, 61)).ok
    assert buckets.admit("u", limits, 10, output_reservation(limits, 60)).ok
    # an answer beyond its reservation is debt: nothing is admitted until it is repaid
    buckets.settle("u", limits, 10, 10, 100, 60)
    assert buckets.levels("u", limits)[2] == pytest.approx(-40.0)
    assert not buckets.admit("u", limits, 10, 0).ok


def test_output_reservation_without_max_tokens() -> None:
    limits = Limits(None, None, 1000, 60.0)
    assert output_reservation(limits, None) == 1000  # no estimate: the whole budget
    assert output_reservation(Limits(None, None, 1000, 60.0, output_estimate=64), None) == 64
    assert output_reservation(Limits(None, None, 10, 60.0, output_estimate=64), None) == 10
    assert output_reservation(limits, 0) == 0
    assert output_reservation(Limits(5, 100, None, 60.0), 300) == 0  # no output limit


def test_token_limits_429_type_tokens_request_limit_type_requests() -> None:
    def limited(limit: str) -> str:
        return rate_limited(Admission(False, 1.0, {}, "x", limit), "r").error_type

    assert limited("output-tokens") == "tokens"
    assert limited("input-tokens") == "tokens"
    assert limited("requests") == "requests"
    buckets = Buckets(Clock())
    limits = Limits(1, 100, None, 60.0)
    assert buckets.admit("k", limits, 500).ok
    refused = buckets.admit("k", limits, 1)  # both empty: the longer wait (input debt) names it
    assert refused.limit == "input-tokens"


class QueueMachine(RuleBasedStateMachine):
    """No entry lost or served twice; FIFO per user; higher priority first; a light user waits
    behind at most one entry of a user who used more recently."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.queue = FairQueue(50, UsageWindow(60.0, 1, 2, self.clock), self.clock)
        self.waiting: dict[str, deque[QueueEntry]] = {}
        self.pushed: set[QueueEntry] = set()
        self.served: set[QueueEntry] = set()
        self.removed: set[QueueEntry] = set()

    @rule(user=st.sampled_from(["heavy", "light", "mid"]), priority=st.integers(0, 2),
          estimate=st.integers(1, 500))  # fmt: skip
    def push(self, user: str, priority: int, estimate: int) -> None:
        entry = QueueEntry(user, priority, estimate)
        ok = self.queue.push(entry)
        assert ok == (len(self.pushed) - len(self.served) - len(self.removed) < 50)
        if ok:
            self.pushed.add(entry)
            self.waiting.setdefault(user, deque()).append(entry)

    @rule()
    def pop(self) -> None:
        best_priority = max((e.priority for q in self.waiting.values() for e in q), default=None)
        entry = self.queue.pop()
        if best_priority is None:
            assert entry is None
            return
        assert entry is not None
        assert entry.priority == best_priority
        assert entry not in self.served
        # FIFO per user within a priority
        same = [e for e in self.waiting[entry.user] if e.priority == entry.priority]
        assert same[0] is entry
        self.waiting[entry.user].remove(entry)
        self.served.add(entry)

    @precondition(lambda self: any(self.waiting.values()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        entries = [e for q in self.waiting.values() for e in q]
        entry = data.draw(st.sampled_from(entries))
        assert self.queue.remove(entry)
        assert not self.queue.remove(entry)  # never twice
        self.waiting[entry.user].remove(entry)
        self.removed.add(entry)

    @rule(user=st.sampled_from(["heavy", "light", "mid"]), tokens=st.integers(0, 5000))
    def use(self, user: str, tokens: int) -> None:
        self.queue.usage.add(user, tokens, tokens)

    @rule(dt=st.floats(0, 30))
    def wait(self, dt: float) -> None:
        self.clock.now += dt

    @invariant()
    def nothing_lost(self) -> None:
        assert len(self.queue) == len(self.pushed) - len(self.served) - len(self.removed)
        assert len(self.queue) == sum(len(q) for q in self.waiting.values())


TestQueue = QueueMachine.TestCase
TestQueue.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)


def test_light_user_is_never_starved_by_a_flood() -> None:
    clock = Clock()
    q = FairQueue(10_000, UsageWindow(60.0, 1, 2, clock), clock)
    for _ in range(1000):
        q.push(QueueEntry("heavy", 0, 100))
    light = QueueEntry("light", 0, 100)
    q.push(light)
    order = []
    while True:
        e = q.pop()
        assert e is not None
        order.append(e)
        if e is light:
            break
    assert len(order) <= 2  # served at once (the heavy head may go first only on a tie)


def test_priority_beats_fair_share() -> None:
    clock = Clock()
    q = FairQueue(10, UsageWindow(60.0, 1, 2, clock), clock)
    q.usage.add("vip", 10_000, 10_000)
    low = QueueEntry("fresh", 0, 1)
    high = QueueEntry("vip", 5, 1)
    q.push(low)
    q.push(high)
    assert q.pop() is high
    assert q.pop() is low


def test_usage_window_slides() -> None:
    clock = Clock()
    w = UsageWindow(10.0, 1, 2, clock)
    w.add("u", 10, 5)
    assert w.use("u") == 20
    clock.now += 11
    assert w.use("u") == 0


def test_usage_window_record_is_bounded_without_reads() -> None:
    """Every request settles into the window, queue or not: an hour of 100 req/s by one user keeps
    at most one window of slots, and a user gone quiet is dropped a window later."""
    clock = Clock()
    w = UsageWindow(60.0, 1, 2, clock, slots=60)
    for _ in range(3600):  # one hour, 100 settlements a second
        for _ in range(100):
            w.add("busy", 10, 5)
        clock.now += 1.0
        if clock.now < 1000.0 + 30:
            w.add("gone", 1, 0)
    assert len(w._events["busy"]) <= 61
    assert w.use("busy") == 60 * 100 * 20  # the last 60 s (a settlement exactly 60 s old counts)
    assert len(w) == 1  # "gone" was swept


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 30), st.integers(0, 100)), max_size=40), st.floats(0, 40))
def test_usage_window_counts_the_window_to_one_slot(
    adds: list[tuple[float, int]], later: float
) -> None:
    """use() holds every settlement younger than the window and none older than window + one
    slot (the slot granularity), whatever the order of reads and writes."""
    clock = Clock()
    w = UsageWindow(10.0, 1, 2, clock, slots=10)
    history: list[tuple[float, int]] = []
    for step, amount in adds:
        clock.now += step / 10
        w.add("u", amount, 0)
        history.append((clock.now, amount))
    clock.now += later / 4
    got = w.use("u")
    now = clock.now
    assert sum(a for t, a in history if now - t < 10.0) <= got
    assert got <= sum(a for t, a in history if now - t < 11.0)


def test_bucket_keys_by_scope() -> None:
    assert bucket_key("ns/r", "route", "t", "u") == "ns/r"
    assert bucket_key("ns/r", "tenant", "t", "u") == "ns/r|t:t"
    assert bucket_key("ns/r", "user", "t", "u") == "ns/r|u:t/u"


def test_ledger_settles_reports_and_missing() -> None:
    clock = Clock()
    got: list[tuple[str, Usage]] = []
    ledger = UsageLedger(lambda c, u: got.append((c.rid, u)), grace=5, clock=clock)
    ledger.expect(Charge("a", 10, "chat", "t/u"))
    ledger.expect(Charge("b", 20, "chat", "t/u"))
    ledger.expect(Charge("c", 30, "chat", "t/u"))
    assert ledger.report("a", {"prompt": 12.0, "completion": 7.0, "events": 9.0}, 200) == Usage(
        12, 7, True, "reported"
    )
    assert ledger.report("a", {}, 200) is None  # never twice
    # aborted stream: 11 SSE events of which the first carries the role only
    assert ledger.report("b", {"events": 11.0}, 200) == Usage(20, 10, False, "aborted")
    ledger.finished("c")
    clock.now += 6
    assert ledger.sweep() == 1
    assert got[-1] == ("c", Usage(30, 0, False, "unreported"))
    assert not ledger.open


def test_engine_error_costs_nothing() -> None:
    assert usage_from_fields(Charge("x", 50, "chat", "u"), {}, 400) == Usage(0, 0, True, "error")


def test_responses_usage_and_aborted_responses_stream() -> None:
    """/v1/responses: the usage filters write input/output tokens as prompt/completion; an
    aborted stream is charged its delta events (the four events before the first carry none)."""
    charge = Charge("r", 50, "responses", "u")
    reported = usage_from_fields(charge, {"prompt": 9.0, "completion": 3.0, "events": 12.0}, 200)
    assert reported == Usage(9, 3, True, "reported")
    assert usage_from_fields(charge, {"events": 10.0}, 200) == Usage(50, 6, False, "aborted")
    assert usage_from_fields(charge, {"events": 2.0}, 200) == Usage(50, 0, False, "aborted")


def test_grpc_usage_exact_when_reported_else_the_reservations() -> None:
    """A gRPC call (kind oip): the engine's counts (response parameters, read by usage.lua)
    when the answer held them; otherwise it is charged what it reserved, counted as estimated."""
    charge = Charge("g", 50, "oip", "u", output_reserved=16)
    reported = usage_from_fields(charge, {"prompt": 7.0, "completion": 4.0}, 200)
    assert reported == Usage(7, 4, True, "reported")
    assert usage_from_fields(charge, {}, 200) == Usage(50, 16, False, "estimated")


def test_force_usage() -> None:
    body: dict[str, object] = {"stream": True}
    assert force_usage(body) is True
    assert body["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert force_usage(asked) is False
