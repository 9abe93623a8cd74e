"""Pure cores: token buckets and the fair queue (hypothesis state machines), the usage ledger."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from extproc.policies.queue import FairQueue, QueueEntry, UsageWindow
from extproc.policies.ratelimit import Buckets, Limits, bucket_key, decide
from extproc.policies.usage import Charge, Usage, UsageLedger, force_usage, usage_from_fields


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


PERIOD = 60.0
INPUT = 1000
OUTPUT = 500
REQUESTS = 20


class BucketMachine(RuleBasedStateMachine):
    """Whatever the order of admissions, settlements and time: what was admitted over the run never
    exceeds the budget plus its refill plus one request's charge, and debt blocks admission."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.start = self.clock.now
        self.buckets = Buckets(self.clock)
        self.limits = Limits(REQUESTS, INPUT, OUTPUT, PERIOD)
        self.open: list[tuple[int, int]] = []  # (estimate, real prompt) of admitted requests
        self.admitted_requests = 0
        self.input_charged = 0  # estimates of open requests + real prompts of settled ones
        self.output_charged = 0
        self.largest = 0

    def budget(self, cap: int) -> float:
        return cap + cap * (self.clock.now - self.start) / PERIOD

    @rule(estimate=st.integers(0, 3000), real=st.integers(0, 3000))
    def admit(self, estimate: int, real: int) -> None:
        before = self.buckets.levels("k", self.limits)
        adm = self.buckets.admit("k", self.limits, estimate)
        ok, _, _ = decide(self.limits, before)
        assert adm.ok == ok
        if adm.ok:
            # admitted only while everything charged so far (estimates of open requests, exact
            # prompts of settled ones) is below the budget: beyond it by one estimate at most
            assert self.input_charged < self.budget(INPUT) + 1e-6
            assert self.output_charged < self.budget(OUTPUT) + 1e-6
            assert self.admitted_requests + 1 <= self.budget(REQUESTS) + 1e-6
            self.open.append((estimate, real))
            self.admitted_requests += 1
            self.input_charged += estimate
            self.largest = max(self.largest, estimate, real)
        else:
            assert adm.retry_after > 0
            assert adm.headers["x-ratelimit-limit-input-tokens"] == str(INPUT)

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 100), completion=st.integers(0, 2000))
    def settle(self, index: int, completion: int) -> None:
        estimate, real = self.open.pop(index % len(self.open))
        self.buckets.settle("k", self.limits, estimate, real, completion)
        self.input_charged += real - estimate
        self.output_charged += completion

    @rule(dt=st.floats(0, 120))
    def wait(self, dt: float) -> None:
        self.clock.now += dt

    @invariant()
    def never_beyond_budget_plus_one_request(self) -> None:
        assert self.admitted_requests <= self.budget(REQUESTS) + 1e-6

    @invariant()
    def debt_blocks(self) -> None:
        r, i, o = self.buckets.levels("k", self.limits)
        if i <= 0 or o <= 0 or r < 1:
            assert not decide(self.limits, (r, i, o))[0]


TestBuckets = BucketMachine.TestCase
TestBuckets.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


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


def test_force_usage() -> None:
    body: dict[str, object] = {"stream": True}
    assert force_usage(body) is True
    assert body["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert force_usage(asked) is False
