"""Token budgets shared through Redis by every gateway replica (:class:`RedisBuckets`)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.policies.ratelimit import (
    Admission,
    Buckets,
    Limits,
    decide,
    limiter_unavailable,
    refill,
    refused,
)

__all__ = ["RedisBuckets"]

log = logging.getLogger("matrixinfer.extproc.ratelimit")

LUA_PATH = Path(__file__).with_name("ratelimit.lua")
# connections to Redis per gateway replica (redis-py's default cap; beyond it calls wait)
MAX_CONNECTIONS = 100
_ADMITTED_REDIS = Admission(True, where="redis")
_ADMITTED_AHEAD = Admission(True, where="redis", ahead=True)
# how long Redis remembers a settlement batch it applied (its id key, ~130 bytes: one per call
# that carries settlements): a batch sent again within this time is skipped, not applied twice.
# Far above a resend's delay (``late_limit``, then the next call); only a resend held back by an
# outage longer than this, after Redis ran the call it gave up, could apply a batch twice
ONCE_FOR = 600


@dataclass(slots=True)
class _Settlement:
    """A settlement on its way to Redis: carried on the next admission or flushed by the timer."""

    key: str
    limits: Limits
    correction: int  # added to the input level: estimate - prompt (-prompt: reserved locally)
    # debited from the output level: completion - reservation (a refund when negative; the whole
    # completion when reserved locally; the reservation for the charge of a request admitted ahead)
    output: int
    queued: float  # loop time it was queued
    kept: bool = False  # kept through an outage (Redis down): replayed when it is back
    requests: int = 0  # requests debited: 1 for the charge of a request admitted ahead
    # the id key of the batch it was first sent in ("" until then): sent again, it keeps it, so
    # Redis applies the batch once (ratelimit.lua); a batch travels whole (:meth:`_take`)
    batch: str = ""


@dataclass(slots=True)
class _Mirror:
    """A replica's view of one key's buckets in Redis: the levels of the latest reply (by Redis
    ``TIME``: ``seen``), refilled up to ``at`` and with this replica's settlements since applied.
    ``heard``: local time of that reply; ``busy``: admissions for the key in Redis now;
    ``owed``/``owed_input``/``owed_output``: charges (requests, input estimates, output
    reservations) of requests admitted ahead that no reply has included yet."""

    levels: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    at: float = float("-inf")
    heard: float = float("-inf")
    seen: float = float("-inf")
    busy: int = 0
    owed: int = 0
    owed_input: int = 0
    owed_output: int = 0
    reading: bool = False  # a read of the key is planned (charge_delay after an admission)


class RedisBuckets:
    """The same buckets in Redis (one hash per key), shared by every gateway replica.

    One round trip per request: an admission is one ``EVALSHA`` that first settles the usage
    reports this replica has received since its previous call (up to ``carry`` of them), then
    admits. Settlements no admission carries within ``flush_delay`` seconds go in a call of their
    own. So this replica's admissions always see every settlement it has received (the budget
    holds as with one call per settlement), and other replicas see them at most ``flush_delay``
    later (their reports already take Envoy's access-log flush interval to arrive).

    **Admitting ahead.** Every reply to an admission or a read carries the key's levels; the
    replica keeps them (a :class:`_Mirror`: refilled by the clock, its own charges and
    settlements applied). When that view is recent (a reply within ``fresh_for`` seconds), no
    admission of this replica for the key is in Redis, fewer than ``max_owed`` of its charges are
    unconfirmed, and the request would leave at least ``headroom`` of every limited bucket, the
    request is admitted at once. Its charge (a request, the estimate, the output reservation) is
    queued like a settlement — so any call that goes first carries it, an admission asking Redis
    included — and ``charge_delay`` later a read of the key carries it if nothing has, bringing a
    fresh view. Otherwise the admission asks Redis first, as above. So near the limit every
    decision is Redis's own (the budget holds within one request's estimate), and far from it a
    request waits for nobody. The budget can only be overrun if, within ``fresh_for`` of this
    replica's last reply, the other replicas took more than ``headroom`` of a bucket; the overrun
    is debt, repaid before the next admission. A charge Redis does not take (an outage) is kept
    and replayed like any settlement. ``headroom >= 1`` asks Redis first every time.

    A key with an output-token limit is never admitted ahead: every output reservation is Redis's
    own decision, so across any number of replicas the admitted reservations exceed the budget by
    at most one request's reservation (replicas admitting ahead from their own views could each
    spend the same headroom).
    """

    def __init__(
        self,
        address: str,
        *,
        fail_open: bool = True,
        fallback: Buckets | None = None,
        password: str | None = None,
        password_ref: tuple[str, str, str] | None = None,
        timeout: float = 0.1,
        retry_after: float = 1.0,
        on_outage: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_delay: float = 0.02,
        carry: int = 32,
        batch: int = 256,
        backlog_limit: int = 100_000,
        single_connection: bool = False,
        headroom: float = 0.25,
        fresh_for: float = 0.25,
        charge_delay: float = 0.01,
        max_owed: int = 16,
        late_limit: float = 5.0,
    ) -> None:
        if not headroom > 0:
            raise ValueError(f"headroom must be > 0 (a fraction of each bucket), got {headroom}")
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        host, _, port = address.rpartition(":")
        self.address = address
        self.password = password
        self.password_ref = password_ref  # (namespace, Secret, key) the password comes from

        # No socket_timeout: redis-py would run every send in a task of its own (asyncio.wait_for)
        # and arm a timer per read; _call puts one deadline of ``timeout`` around the whole call
        # instead (a cancelled call closes its connection in redis-py, as a timed-out one does).
        # At most MAX_CONNECTIONS connections; a call that finds them all busy waits for one
        # (within its deadline) — redis-py's default pool raised "Too many connections" at its
        # 100th concurrent call instead, which read as an outage and failed open for
        # ``retry_after`` under a burst (bench.soak).
        def connect(password: str | None) -> Any:
            pool = aioredis.BlockingConnectionPool(
                host=host,
                port=int(port),
                password=password,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # an outage must cost one fast failure, not retries
                max_connections=MAX_CONNECTIONS,
                timeout=None,  # the wait for a free connection: bounded by the call's deadline
            )
            return aioredis.Redis(connection_pool=pool, single_connection_client=single_connection)

        self._connect = connect
        self.client = connect(password)
        self._lua = LUA_PATH.read_text()
        self.script = self.client.register_script(self._lua)
        self._retired: list[Any] = []  # clients replaced by a password change, closed later
        self.timeout = timeout
        self.fail_open = fail_open
        self.fallback = fallback or Buckets(clock)
        self.retry_after = retry_after
        self.on_outage = on_outage
        self.clock = clock
        self.down_since: float | None = None
        self._next_try = float("-inf")
        self.flush_delay = flush_delay
        self.carry = carry
        self.batch = batch
        # settlements not yet in Redis, oldest first: the ones received since the last call, and
        # during an outage the ones Redis could not take (bounded: the oldest are dropped)
        self.pending: deque[_Settlement] = deque()
        self.backlog_limit = backlog_limit
        self.dropped = 0
        self.replayed = 0  # settlements written after an outage had kept them
        self.skipped = 0  # settlements whose key Redis refused (not a hash)
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._carrying: set[asyncio.Future[None]] = set()  # calls with settlements on their way
        self.headroom = headroom
        self.fresh_for = fresh_for
        # a read carries the charges this long after an admission ahead: its Python work
        # (~0.25 ms) then runs after the request's reply to Envoy is on its way, not before it on
        # the same event loop, and the charges and settlements of that time share one call
        self.charge_delay = charge_delay
        self.max_owed = max_owed
        self.mirrors: dict[str, _Mirror] = {}
        self.ahead = 0  # requests admitted ahead of their charge (not waiting for Redis)
        # how long a call nobody waits for any more (past its deadline, or its request
        # cancelled) may still be answered (:meth:`_late`), and how many were: their
        # settlements applied once, not sent again
        self.late_limit = late_limit
        self.late = 0
        # settlement batch ids: unique across replicas (a random prefix) and calls (a counter)
        self._batch_prefix = f"mi:rl-once:{secrets.token_hex(8)}:"
        self._batch_ids = itertools.count(1)
        self.repeated = 0  # settlements Redis left out as applied by an earlier call

    @staticmethod
    def _args(limits: Limits) -> tuple[int, int, int, float]:
        return (limits.requests or 0, limits.input or 0, limits.output or 0, limits.period)

    def _waiting_out_outage(self) -> bool:
        return self.down_since is not None and self.clock() < self._next_try

    async def _call(
        self,
        settlements: list[_Settlement],
        admission: tuple[str, Limits, int, int] | None,
        read: bool = False,
    ) -> list[Any] | None:
        """One EVALSHA: settle ``settlements``, then admit ``admission`` (key, limits, estimate,
        output reservation) — or, with ``read``, only read that key's levels. None when Redis
        failed (the settlements are then back at the front of ``pending``) or did not answer
        within ``timeout`` (they then wait for its late answer: :meth:`_late`)."""
        keys = [f"mi:rl:{s.key}" for s in settlements]
        batches = self._batches(settlements)
        args: list[Any] = [
            len(settlements),
            0 if admission is None else 2 if read else 1,
            len(batches),
            ONCE_FOR,
        ]
        args.extend(batches.values())
        for s in settlements:
            args.extend(self._args(s.limits))
            args.append(s.correction)
            args.append(s.output)
            args.append(s.requests)
        mirror: _Mirror | None = None
        if admission is not None:
            key, limits, estimate, output = admission
            keys.append(f"mi:rl:{key}")
            args.extend(self._args(limits))
            args.append(estimate)
            args.append(output)
            mirror = self.mirrors.get(key)
            if mirror is None:
                mirror = self.mirrors[key] = _Mirror()
            if not read:
                mirror.busy += 1
        keys.extend(batches)
        carrying: asyncio.Future[None] | None = None
        if settlements:
            carrying = asyncio.get_running_loop().create_future()
            self._carrying.add(carrying)
        call = asyncio.ensure_future(self.script(keys=keys, args=args))
        try:
            result: list[Any] = await asyncio.wait_for(asyncio.shield(call), self.timeout)
        except asyncio.CancelledError:
            # the request is gone (client gone) while Redis decides: the call runs on, the
            # settlements it carries are not lost, and what it reserves for nobody comes back
            self._spawn(self._late(call, settlements, None if read else admission))
            raise
        except Exception as exc:  # connection refused/reset, timeout, script error
            if isinstance(exc, TimeoutError):
                # Redis may still run a call past its deadline (its reply is late, the call is
                # not lost): sent again, its settlements would be applied twice. They wait for
                # the call's outcome instead (:meth:`_late`).
                self._spawn(self._late(call, settlements, None if read else admission))
            else:
                self._requeue(settlements)
            now = self.clock()
            self._next_try = now + self.retry_after
            if self.down_since is None:
                self.down_since = now
                for m in self.mirrors.values():  # ask Redis first once it is back
                    m.heard = float("-inf")
                log.error(
                    "Redis rate limiter %s unreachable (%s): failing %s",
                    self.address,
                    f"no answer within {self.timeout:g}s"
                    if isinstance(exc, TimeoutError)
                    else repr(exc),
                    "open to local buckets" if self.fail_open else "closed (503)",
                )
                if self.on_outage:
                    self.on_outage(True)
            if self.pending:
                self._arm(self.retry_after)
            return None
        finally:
            if mirror is not None and not read:
                mirror.busy -= 1
            if carrying is not None:
                self._carrying.discard(carrying)
                carrying.set_result(None)
        self._written(settlements, result)
        if mirror is not None:
            self._observe(mirror, result)
        self._answered()
        return result

    def _answered(self) -> None:
        """Redis answered a call (in time, or late): an outage is over."""
        if self.down_since is not None:
            log.warning(
                "Redis rate limiter %s is back after %.1fs",
                self.address,
                self.clock() - self.down_since,
            )
            self.down_since = None
            if self.on_outage:
                self.on_outage(False)
        if len(self.pending) > self.carry:  # a backlog (after an outage): write it now
            self._arm(0.0)

    def _batches(self, settlements: list[_Settlement]) -> dict[str, int]:
        """The id keys of the batches ``settlements`` come in, with their sizes, in order: those
        sent before keep theirs; the others (never sent) form one new batch."""
        batches: dict[str, int] = {}
        new = ""
        for s in settlements:
            if not s.batch:
                new = new or f"{self._batch_prefix}{next(self._batch_ids)}"
                s.batch = new
            batches[s.batch] = batches.get(s.batch, 0) + 1
        return batches

    async def _late(
        self,
        call: asyncio.Future[Any],
        settlements: list[_Settlement],
        admission: tuple[str, Limits, int, int] | None,
    ) -> None:
        """A call nobody waits for any more (past its deadline, or its request cancelled): wait
        up to ``late_limit`` for what Redis did with it. Applied: its settlements are in, and an
        admission it granted is given back (its request was decided without Redis, and settles
        as one admitted locally; or is gone). Failed, or still not answered (then cancelled,
        which closes its connection): its settlements go back to the front of the queue, as
        after any failed call — sent again in their batch (:meth:`_batches`), which Redis
        applies once even if it still runs this call."""
        try:
            result: list[Any] = await asyncio.wait_for(call, self.late_limit)
        except Exception:
            self._requeue(settlements)
            if self.pending:
                self._arm(max(0.0, self._next_try - self.clock()))
            return
        self.late += 1
        self._written(settlements, result)
        if admission is not None:
            self._give_back(admission, result)
        self._answered()  # a slow answer, not a lost Redis: no need to wait out retry_after

    def _written(self, settlements: list[_Settlement], result: list[Any]) -> None:
        """Redis answered a call: its settlements are in, but those whose key is not a bucket
        hash (skipped: counted, logged)."""
        for s in settlements:
            if s.kept:
                self.replayed += 1
            if s.requests:  # a charge: now in Redis
                self._confirmed(s)
        # the reply: {settled, skipped, repeated} without an admission, else skipped and
        # repeated are its 5th and 7th values
        if not settlements:
            return
        short = len(result) == 3
        skipped = int(result[1] if short else result[4])
        repeated = int(result[2] if short else result[6])
        if repeated:
            self.repeated += repeated
            log.info(
                "Redis rate limiter %s: %d settlement(s) sent again were applied by an earlier "
                "call (left out)",
                self.address,
                repeated,
            )
        if skipped:
            self.skipped += skipped
            log.error(
                "Redis rate limiter %s: %d settlement(s) not written: their key is not a bucket "
                "hash (something else wrote into mi:rl:*)",
                self.address,
                skipped,
            )

    def _requeue(self, settlements: list[_Settlement]) -> None:
        """Settlements of a failed call: back at the front of the queue, in their order, kept
        for after the outage."""
        for s in reversed(settlements):
            s.kept = True
            self.pending.appendleft(s)
        self._trim()

    def _give_back(self, admission: tuple[str, Limits, int, int], result: list[Any]) -> None:
        """An admission whose answer no request uses (past its deadline, or its request gone):
        if Redis granted it, its reservation (``estimate`` input, ``output`` output tokens) is
        queued back, as a settlement of nothing used. The request unit stays taken."""
        key, limits, estimate, output = admission
        if int(result[0]) == 1 and (estimate or output):
            self._queue(_Settlement(key, limits, estimate, -output, self._loop_time()))

    def _confirmed(self, charge: _Settlement) -> None:
        """A charge is in Redis (or dropped): its key's view no longer owes it."""
        mirror = self.mirrors.get(charge.key)
        if mirror is not None and mirror.owed:
            mirror.owed -= 1
            mirror.owed_input += charge.correction  # (-estimate)
            mirror.owed_output -= charge.output  # (the reservation)

    def _observe(self, mirror: _Mirror, result: list[Any]) -> None:
        """Keep a reply's levels, less the charges it does not include yet, as the key's view,
        unless a later call's reply came first."""
        seen = float(result[5])
        if seen >= mirror.seen:
            mirror.levels = [
                float(result[1]) - mirror.owed,
                float(result[2]) - mirror.owed_input,
                float(result[3]) - mirror.owed_output,
            ]
            mirror.seen = seen
            mirror.at = mirror.heard = self.clock()

    def _may_admit_ahead(self, mirror: _Mirror, limits: Limits, estimate: int, output: int) -> bool:
        now = self.clock()
        if (
            mirror.busy
            or mirror.owed >= self.max_owed
            or now - mirror.heard > self.fresh_for
            or self.down_since is not None
        ):
            return False
        levels = mirror.levels
        refill(levels, limits, now - mirror.at)
        mirror.at = now
        h = self.headroom
        return (
            limits.output is None  # output reservations: Redis decides (see the class docstring)
            and (limits.requests is None or levels[0] - 1 >= h * limits.requests)
            and (limits.input is None or levels[1] - estimate >= h * limits.input)
        )

    async def _read(self, key: str, limits: Limits, mirror: _Mirror, since: float) -> None:
        """``charge_delay`` after a request was admitted ahead (its reply to Envoy is on its way
        by then): carry the queued charges and settlements and read the key's levels — unless a
        reply for the key has come since (an admission that asked Redis carried the charge)."""
        try:
            await asyncio.sleep(self.charge_delay)
        finally:
            mirror.reading = False  # from now on a new admission ahead plans a read of its own
        if mirror.heard <= since and not self._waiting_out_outage():
            await self._call(self._take(self.carry), (key, limits, 0, 0), True)

    async def admit(self, key: str, limits: Limits, estimate: int, output: int = 0) -> Admission:
        """Admit a request reserving ``estimate`` input and ``output`` output tokens: ahead from
        this replica's view, or by Redis."""
        if limits.output is None:
            output = 0
        mirror = self.mirrors.get(key)
        if mirror is not None and self._may_admit_ahead(mirror, limits, estimate, output):
            if limits.requests is not None:
                mirror.levels[0] -= 1
            if limits.input is not None:
                mirror.levels[1] -= estimate
            if limits.output is not None:
                mirror.levels[2] -= output
            mirror.owed += 1
            mirror.owed_input += estimate
            mirror.owed_output += output
            self.ahead += 1
            self._queue(_Settlement(key, limits, -estimate, output, self._loop_time(), requests=1))
            if not mirror.reading:
                mirror.reading = True
                self._spawn(self._read(key, limits, mirror, self.clock()))
            return _ADMITTED_AHEAD
        result = None
        if not self._waiting_out_outage():
            # (a request cancelled meanwhile: :meth:`_call` hands its call to :meth:`_late`)
            result = await self._call(self._take(self.carry), (key, limits, estimate, output))
        if result is None:
            if self.fail_open:
                return self.fallback.admit(key, limits, estimate, output)
            raise limiter_unavailable(self.address)
        if int(result[0]) == 1:
            return _ADMITTED_REDIS
        levels = (float(result[1]), float(result[2]), float(result[3]))
        return refused(limits, levels, decide(limits, levels, output))

    def settle(
        self,
        key: str,
        limits: Limits,
        estimate: int,
        prompt: int,
        completion: int,
        where: str = "redis",
        reserved: int = 0,
    ) -> None:
        """Settle where the reservation was made (``estimate`` input, ``reserved`` output
        tokens); the shared budget always learns the usage: a request admitted locally during an
        outage is charged to Redis in full (its real prompt and output). Queued for Redis:
        carried on this replica's next admission, or written by itself after ``flush_delay``;
        kept through an outage and replayed when Redis is back."""
        if where == "local":
            self.fallback.settle(key, limits, estimate, prompt, completion, reserved)
            correction = -prompt  # Redis never reserved this request's estimate
            output = completion  # nor its output
        else:
            correction = estimate - prompt
            output = completion - reserved
        mirror = self.mirrors.get(key)
        if mirror is not None:  # this replica's view learns its own usage at once
            if limits.input is not None:
                mirror.levels[1] = min(float(limits.input), mirror.levels[1] + correction)
            if limits.output is not None:
                mirror.levels[2] = min(float(limits.output), mirror.levels[2] - output)
        self._queue(
            _Settlement(
                key, limits, correction, output, self._loop_time(), self.down_since is not None
            )
        )

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    def _queue(self, settlement: _Settlement) -> None:
        """Queue for Redis: carried by the next call, or written by the timer ``flush_delay``
        later (armed here if it is not)."""
        self.pending.append(settlement)
        self._trim()
        if self._timer is None:
            self._arm(self.flush_delay)

    def _take(self, n: int) -> list[_Settlement]:
        """The oldest ``n`` queued settlements (fewer if fewer wait), off the queue — and the
        rest of the last one's batch: a batch sent again goes whole (Redis applies it or skips
        it as one; a part sent alone would mark the rest applied)."""
        taken = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
        if taken and taken[-1].batch:
            batch = taken[-1].batch
            while self.pending and self.pending[0].batch == batch:
                taken.append(self.pending.popleft())
        return taken

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own that ``drain`` and ``close`` wait for."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _trim(self) -> None:
        while len(self.pending) > self.backlog_limit:
            if (dropped := self.pending.popleft()).requests:
                self._confirmed(dropped)
            if not self.dropped:
                log.error(
                    "Redis rate limiter %s: more than %d settlements wait for Redis; dropping "
                    "the oldest",
                    self.address,
                    self.backlog_limit,
                )
            self.dropped += 1

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        if not self.pending:
            return  # admissions carried everything: re-armed by the next settlement
        if self._waiting_out_outage():
            self._arm(self._next_try - self.clock())
            return
        wait = self.pending[0].queued + self.flush_delay - self._loop_time()
        if wait > 0.001:  # the oldest came after the last call: give an admission its chance
            self._arm(wait)
            return
        self._spawn(self.flush())

    async def flush(self) -> None:
        """Write every pending settlement now (in calls of ``batch``); stops at a failure."""
        while self.pending and not self._waiting_out_outage():
            if await self._call(self._take(self.batch), None) is None:
                return

    async def drain(self) -> None:
        """Return once every settlement received so far is in Redis, or kept for after an
        outage: the pending ones are written, and calls already carrying some (the flush timer's,
        an admission's, a charge behind an admitted request) have ended."""
        while True:
            await self.flush()
            under_way = [*self._carrying, *self._tasks]
            if not under_way:
                return
            # a failed one puts its settlements back
            await asyncio.gather(*under_way, return_exceptions=True)

    def sweep(self, horizon: float) -> int:
        """Forget the views of keys not heard of for ``horizon`` seconds."""
        now = self.clock()
        old = [
            k
            for k, m in self.mirrors.items()
            if not (m.busy or m.owed or m.reading) and now - m.heard > horizon
        ]
        for k in old:
            del self.mirrors[k]
        return len(old)

    async def set_password(self, password: str | None) -> None:
        """Reconnect with a new password (the Secret changed). Calls in flight finish on the old
        client; the next call uses the new one at once (an outage's retry wait is skipped)."""
        if password == self.password:
            return
        old = self.client
        self.password = password
        self.client = self._connect(password)
        self.script = self.client.register_script(self._lua)
        self._next_try = float("-inf")
        log.info("Redis rate limiter %s: password changed, reconnecting", self.address)
        for retired in self._retired:  # the previous change's client: idle by now
            await retired.aclose(close_connection_pool=True)
        self._retired = [old]

    async def close(self) -> None:
        """Write what is pending (unless Redis is down), then close the connections."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.drain()
        for retired in self._retired:
            await retired.aclose(close_connection_pool=True)
        self._retired.clear()
        await self.client.aclose(close_connection_pool=True)
