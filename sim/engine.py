"""The engine core: a continuous-batching scheduler over a prefix-cached paged KV cache.

Pure: no asyncio, no HTTP. Time is passed in (simulated seconds). A driver calls
:meth:`Engine.schedule` to plan one step at time ``now``; the step lasts ``batch.duration``
(the timing model); the driver then calls :meth:`Engine.finish_step` at ``batch.end``, which
advances every scheduled sequence and returns the requests that produced a token or finished.

Scheduling follows vLLM v1: running requests first (each gets its remaining tokens, at most the
step's token budget: decode = 1 token, prefill = a chunk), preempting the most recently admitted
running request (recompute) when the KV cache cannot hold a step; then, if nothing was
preempted, waiting requests in FCFS order while there is budget, a free sequence slot and
KV room (a prefix-cache hit skips those tokens' prefill).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from sim.blockhash import BlockHash
from sim.config import EngineConfig
from sim.kvcache import KVCacheManager

__all__ = [
    "ABORTED",
    "FINISHED",
    "FINISH_REASONS",
    "RUNNING",
    "SGLANG_BUCKETS",
    "TRANSFERRING",
    "VLLM_BUCKETS",
    "WAITING",
    "Batch",
    "Buckets",
    "Engine",
    "EngineStats",
    "Histogram",
    "QueueFull",
    "Request",
]

WAITING, RUNNING, TRANSFERRING, FINISHED, ABORTED = range(5)
FINISH_REASONS = ("stop", "length", "abort")

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


# SGLang's default boundaries (python/sglang/srt/metrics/collector.py)
SGLANG_TTFT_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400,
)  # fmt: skip
SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080,
    0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)  # fmt: skip
SGLANG_E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800,
    2400,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Buckets:
    """Histogram boundaries of the latency metrics (the engine flavour decides them)."""

    ttft: tuple[float, ...] = TTFT_BUCKETS
    itl: tuple[float, ...] = ITL_BUCKETS
    e2e: tuple[float, ...] = REQUEST_LATENCY_BUCKETS


VLLM_BUCKETS = Buckets()
SGLANG_BUCKETS = Buckets(SGLANG_TTFT_BUCKETS, SGLANG_ITL_BUCKETS, SGLANG_E2E_BUCKETS)


class QueueFull(Exception):
    """The waiting queue is at ``max_waiting``."""


class Histogram:
    """Cumulative-free histogram: per-bucket counts (last slot = +Inf), sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += n
        self.sum += v * n
        self.count += n

    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0


# ``sum`` of floats adds them one by one in order on CPython up to 3.11 (3.12 compensates the
# rounding): then ``sum(values, start)`` is the loop ``start += v``, bit for bit, at C speed
_SUM_IS_SEQUENTIAL = sum([1e16, 1.0, -1e16], 0.0) == 0.0


def _sum_in_order(values: list[float], start: float) -> float:
    """``start`` plus ``values`` added one at a time in order (the float result of that loop)."""
    if _SUM_IS_SEQUENTIAL:
        return sum(values, start)
    for v in values:
        start += v
    return start


def _last_true(m: int, ok: Callable[[int], bool]) -> int:
    """The largest ``j <= m`` with ``ok(j)``, for ``ok`` true at 0 and monotone (true, then
    false)."""
    if ok(m):
        return m
    lo, hi = 0, m  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _build_1_2_5(max_value: int) -> tuple[float, ...]:
    out: list[float] = []
    exp = 1
    while True:
        for m in (1, 2, 5):
            v = m * exp
            if v > max_value:
                return tuple(out)
            out.append(float(v))
        exp *= 10


@dataclass(slots=True)
class EngineStats:
    """Everything the metrics endpoint reports; plain counters and histograms."""

    max_model_len: int = 8192
    buckets: Buckets = VLLM_BUCKETS
    prompt_tokens: int = 0  # prompt tokens of requests that produced their first token
    generation_tokens: int = 0
    prefill_computed_tokens: int = 0  # prompt/recompute tokens actually computed (work done)
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # tokens found there
    preemptions: int = 0
    steps: int = 0
    busy_time: float = 0.0
    kv_transfers: int = 0
    kv_transfer_tokens: int = 0
    requests_total: int = 0
    success: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    ttft: Histogram = field(init=False)
    itl: Histogram = field(init=False)
    e2e: Histogram = field(init=False)
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prefill_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    decode_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    inference_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prompt_len: Histogram = field(init=False)
    gen_len: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.ttft = Histogram(self.buckets.ttft)
        self.itl = Histogram(self.buckets.itl)
        self.e2e = Histogram(self.buckets.e2e)
        self.prompt_len = Histogram(_build_1_2_5(self.max_model_len))
        self.gen_len = Histogram(_build_1_2_5(self.max_model_len))


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. ``output_ids`` is the whole planned output (drawn at admission)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    arrival: float
    finish_reason_at_end: str = "length"  # "length" when max_tokens ends it, else "stop"
    lora: str | None = None
    remote_prefill: bool = False  # decode side: the prompt's KV comes from a prefill pod
    remote_decode: bool = False  # prefill side: another pod decodes; stop after the prefill
    # progress (engine-owned)
    status: int = WAITING
    num_computed: int = 0
    num_output: int = 0
    all_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at first scheduling (usage.cached_tokens)
    num_transferred_tokens: int = 0  # PD: prompt tokens received from the prefill pod
    num_preemptions: int = 0
    transfer_ready_at: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float = 0.0
    finished_at: float | None = None
    finish_reason: str | None = None
    kv_block_ids: list[int] = field(default_factory=list)  # PD: blocks reported to the decoder
    # edge bookkeeping (the engine never reads these)
    waiter: Any = None
    sent: int = 0

    def __post_init__(self) -> None:
        if not self.all_ids:
            self.all_ids = self.prompt_ids + self.output_ids

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + self.num_output

    @property
    def done(self) -> bool:
        return self.status >= FINISHED


@dataclass(slots=True)
class Batch:
    """One planned engine step."""

    start: float
    duration: float
    reqs: list[Request]
    num_new: list[int]
    prefill_tokens: int
    decode_seqs: int

    @property
    def end(self) -> float:
        return self.start + self.duration


class Engine:
    """The scheduler, the KV cache and the statistics of one simulated engine."""

    def __init__(
        self, cfg: EngineConfig, buckets: Buckets = VLLM_BUCKETS, *, record_events: bool = False
    ) -> None:
        self.cfg = cfg
        self.timing = cfg.timing
        self.kv = KVCacheManager(
            cfg.num_gpu_blocks,
            cfg.block_size,
            cfg.enable_prefix_caching,
            hash_algo=cfg.prefix_caching_hash_algo,
            hash_seed=cfg.hash_seed,
            record_events=record_events,
            int_block_hashes=cfg.kv_events_int_block_hashes,
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.transferring: list[Request] = []
        self.stats = EngineStats(max_model_len=cfg.max_model_len, buckets=buckets)
        # the batch whose repeats a waiting head sits out, and the tokens its lookup hits
        self._blocked: tuple[Batch, int] | None = None

    # ---------------------------------------------------------------- admission

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.transferring)

    def add(self, req: Request) -> None:
        """Queue a request (FCFS). Raises QueueFull over ``max_waiting``."""
        if self.cfg.max_waiting is not None and self.num_waiting >= self.cfg.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.cfg.max_waiting} requests)")
        if not req.output_ids:
            raise ValueError("a request must plan at least one output token")
        req.status = WAITING
        self.stats.requests_total += 1
        self.waiting.append(req)

    def abort(self, req: Request, now: float) -> None:
        """Drop a request (client went away); frees its blocks."""
        if req.done:
            return
        if req.status == WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        elif req.status == RUNNING:
            self.running.remove(req)
        elif req.status == TRANSFERRING:
            self.transferring.remove(req)
        self.kv.free(req)
        req.status = ABORTED
        req.finish_reason = "abort"
        req.finished_at = now
        self.stats.success["abort"] += 1

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.transferring)

    def next_transfer_time(self) -> float | None:
        if not self.transferring:
            return None
        return min(r.transfer_ready_at for r in self.transferring)

    # ---------------------------------------------------------------- scheduling

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed = 0
        req.status = WAITING
        req.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self, now: float) -> Batch | None:
        """Plan one step starting at ``now``; None when nothing can run yet."""
        cfg = self.cfg
        kv = self.kv
        stats = self.stats
        budget = cfg.max_num_batched_tokens
        reqs: list[Request] = []
        num_new: list[int] = []
        prefill_tokens = 0
        decode_seqs = 0

        # finished KV transfers (PD decode side) rejoin the head of the queue, oldest first
        if self.transferring:
            ready = [r for r in self.transferring if r.transfer_ready_at <= now]
            if ready:
                self.transferring = [r for r in self.transferring if r.transfer_ready_at > now]
                for r in reversed(ready):
                    r.status = WAITING
                    self.waiting.appendleft(r)

        # 1. running requests
        # (the engine's hottest loop: one pass per running request per step, attributes inlined)
        preempted = False
        running = self.running
        block_size = kv.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed
            prompt_len = len(req.prompt_ids)
            n = prompt_len + req.num_output - computed
            if n > budget:
                n = budget
            # a step that fits in the sequence's blocks allocates nothing (allocate would say so)
            if computed + n > len(req.block_ids) * block_size:
                scheduled = True
                while not kv.allocate(req, n):
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is req:
                        scheduled = False
                        break
                if not scheduled:
                    break
            reqs.append(req)
            num_new.append(n)
            budget -= n
            if computed >= prompt_len:
                decode_seqs += 1
            else:
                prefill_tokens += n
            i += 1

        # 2. waiting requests, FCFS, unless this step had to preempt
        if not preempted and self.waiting:
            skipped: list[Request] = []
            loras: set[str] | None = None
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                req = waiting[0]
                if req.lora is not None:
                    if loras is None:
                        loras = {r.lora for r in running if r.lora is not None}
                    if req.lora not in loras and len(loras) >= cfg.max_loras:
                        skipped.append(waiting.popleft())
                        continue
                if req.remote_prefill and req.first_scheduled is None:
                    if not self._start_transfer(req, now):
                        break
                    waiting.popleft()
                    continue
                if req.num_computed > 0:  # KV already here (PD transfer done)
                    hits: list[int] = []
                    n_hit = req.num_computed
                else:
                    hits = kv.lookup(req, req.num_tokens)
                    n_hit = len(hits) * cfg.block_size
                    stats.prefix_queries += req.num_tokens
                    stats.prefix_hits += n_hit
                n = req.num_tokens - n_hit
                if n > budget:
                    n = budget
                if not kv.allocate(req, n, hits):
                    break
                waiting.popleft()
                req.num_computed = n_hit
                req.status = RUNNING
                running.append(req)
                if loras is not None and req.lora is not None:
                    loras.add(req.lora)
                if req.first_scheduled is None:
                    req.first_scheduled = now
                    req.num_cached_tokens = n_hit if not req.remote_prefill else 0
                    stats.queue.observe(now - req.arrival)
                reqs.append(req)
                num_new.append(n)
                budget -= n
                prefill_tokens += n
            if skipped:
                waiting.extendleft(reversed(skipped))

        if not reqs:
            return None
        duration = self.timing.step_time(prefill_tokens, decode_seqs)
        return Batch(now, duration, reqs, num_new, prefill_tokens, decode_seqs)

    def _start_transfer(self, req: Request, now: float) -> bool:
        """PD decode side: hold blocks for the prompt and receive its KV from the prefill pod.

        Locally cached blocks are reused; the rest (all but the last prompt token, whose logits
        are computed here) is transferred, which costs the timing model's transfer time.
        """
        hits = self.kv.lookup(req, req.prompt_len)
        n_hit = len(hits) * self.cfg.block_size  # lookup leaves >= 1 prompt token: <= target
        target = req.prompt_len - 1
        self.stats.prefix_queries += req.prompt_len
        self.stats.prefix_hits += n_hit
        if not self.kv.allocate(req, target - n_hit, hits):
            return False
        req.num_computed = target
        req.num_cached_tokens = n_hit
        req.num_transferred_tokens = max(1, target - n_hit)
        req.status = TRANSFERRING
        req.first_scheduled = now
        self.stats.queue.observe(now - req.arrival)
        req.transfer_ready_at = now + self.timing.transfer_time(target - n_hit)
        self.stats.kv_transfers += 1
        self.stats.kv_transfer_tokens += target - n_hit
        self.transferring.append(req)
        return True

    # ---------------------------------------------------------------- step completion

    def finish_step(self, batch: Batch, now: float) -> list[Request]:
        """Apply a step that ended at ``now``: the requests that got a token (or finished)."""
        stats = self.stats
        kv = self.kv
        stats.steps += 1
        stats.busy_time += batch.duration
        stats.prefill_computed_tokens += batch.prefill_tokens
        out: list[Request] = []
        any_finished = False
        # kv.cache_computed and stats.itl.observe inlined (once per running request per step)
        caching = kv.caching
        block_size = kv.block_size
        itl = stats.itl
        itl_bounds, itl_counts = itl.bounds, itl.counts
        for req, n in zip(batch.reqs, batch.num_new, strict=True):
            if req.status != RUNNING:
                continue  # aborted or preempted meanwhile
            computed = req.num_computed + n
            req.num_computed = computed
            if caching and computed // block_size > req.num_cached_blocks:
                kv.cache_computed(req)
            if computed < len(req.prompt_ids) + req.num_output:
                continue  # a prefill chunk, or recomputation after preemption
            req.num_output += 1
            stats.generation_tokens += 1
            if req.first_token is None:
                req.first_token = now
                stats.ttft.observe(now - req.arrival)
                stats.prompt_tokens += req.prompt_len
            else:
                v = now - req.last_token
                itl_counts[bisect.bisect_left(itl_bounds, v)] += 1
                itl.sum += v
                itl.count += 1
            req.last_token = now
            if req.num_output >= len(req.output_ids):
                self._finish(req, now)
                any_finished = True
            out.append(req)
        if any_finished:
            self.running = [r for r in self.running if r.status == RUNNING]
        return out

    def _finish(self, req: Request, now: float) -> None:
        stats = self.stats
        req.status = FINISHED
        req.finish_reason = req.finish_reason_at_end
        req.finished_at = now
        if req.remote_decode:
            req.kv_block_ids = list(req.block_ids)
        self.kv.free(req)
        stats.success[req.finish_reason] += 1
        stats.e2e.observe(now - req.arrival)
        first_sched = req.first_scheduled if req.first_scheduled is not None else req.arrival
        first_tok = req.first_token if req.first_token is not None else now
        stats.prefill_time.observe(first_tok - first_sched)
        stats.decode_time.observe(now - first_tok)
        stats.inference_time.observe(now - first_sched)
        stats.prompt_len.observe(req.prompt_len)
        stats.gen_len.observe(req.num_output)

    # ---------------------------------------------------------------- decode fast-forward

    def decode_repeats(self, batch: Batch) -> int:
        """How many steps, counting ``batch`` itself, end without a change to the next step's plan.

        A virtual-time driver may apply those steps' ends at once (:meth:`repeat_decode`) instead
        of a ``finish_step`` and a ``schedule`` each, as long as it adds or aborts nothing
        meanwhile. That holds when ``batch`` is the whole running set decoding one token each and
        no waiting request gets in (:meth:`_blocked_repeats`): then each step's end gives every
        request a token, finishes none until the first request's last planned token, and
        schedules the same requests again (allocating the blocks their next tokens need, which
        must be free: no preemption). 0 otherwise.
        """
        reqs = batch.reqs
        n = len(reqs)
        if (
            batch.prefill_tokens
            or self.transferring
            or n != len(self.running)
            or batch.decode_seqs != n
            or batch.num_new.count(1) != n
        ):
            return 0
        # step j (1-based) gives each request its (num_output + j)-th token: no finish before
        # the smallest number of planned tokens left
        m = min([len(r.output_ids) - r.num_output for r in reqs]) - 1
        if m <= 0:
            return 0
        # after step j's end, the next step needs room for num_tokens + j tokens per request: the
        # most repeats whose blocks are free (the blocks needed grow with j: bisect)
        bs = self.kv.block_size
        free = self.kv.pool.num_free
        have = [(len(r.prompt_ids) + r.num_output, len(r.block_ids) * bs) for r in reqs]

        def need(j: int) -> int:
            """Blocks the schedules after the first ``j`` ends allocate."""
            total = 0
            for tokens, room in have:
                if tokens + j > room:
                    total += -(-(tokens + j - room) // bs)
            return total

        m = _last_true(m, lambda j: need(j) <= free)
        if m and self.waiting:
            m = self._blocked_repeats(batch, m, need)
        return m

    def _admission_head(self, batch: Batch) -> Request | None:
        """The waiting request the schedules after ``batch``'s repeats try to admit (the FCFS
        head; it fails, and with it the rest), None when they try none (no token budget or
        sequence slot left)."""
        budget = self.cfg.max_num_batched_tokens - len(batch.reqs)
        if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
            return None
        return self.waiting[0]

    def _blocked_repeats(self, batch: Batch, m: int, need: Callable[[int], int]) -> int:
        """How many of ``m`` repeats of ``batch`` leave the waiting requests waiting, with the
        same prefix-cache lookup at each of their admission attempts (the statistics count
        those). The head's attempt fails now (else 0). While the running requests only take
        free blocks, it keeps failing as long as its cached prefix stays: none of its hit blocks
        is taken from the free queue (the takes come off its head, in order) and no running
        request registers the hash that ends the prefix. Heads that a LoRA slot, a PD transfer
        or a partial KV would treat otherwise are not repeated over."""
        head = self._admission_head(batch)
        if head is None:
            return m  # nothing is tried: nothing can change
        kv = self.kv
        if head.lora is not None:
            loras = {r.lora for r in self.running if r.lora is not None}
            if head.lora not in loras and len(loras) >= self.cfg.max_loras:
                return 0  # skipped for the next waiting request
        if head.remote_prefill or head.num_computed > 0:
            return 0
        bs = kv.block_size
        hits = kv.lookup(head, head.num_tokens)
        budget = self.cfg.max_num_batched_tokens - len(batch.reqs)
        if kv.fits(head, min(head.num_tokens - len(hits) * bs, budget), hits):
            return 0
        self._blocked = (batch, len(hits) * self.cfg.block_size)
        # the prefix: the hit blocks and the one lookup leaves to compute, if cached (a decode
        # allocation taking one of them from the free queue drops its hash)
        pool = kv.pool
        hs = head.block_hashes
        h = len(hits)
        after = pool.cached.get(hs[h]) if h < len(hs) else None
        taken = need(m)
        held: Collection[int] = set(hits) if taken > 8 else hits  # (few takes: scan the list)
        for i, b in enumerate(itertools.islice(pool.free, taken)):
            if b == after or b in held:
                m = _last_true(m, lambda j: need(j) <= i)  # noqa: B023 (used at once)
                break
        # the blocks after it: a running request registering one (the same hash: the same
        # tokens up to there, so at the same position) would lengthen it
        if kv.caching and h < len(hs):
            ends_prefix = [(i, hs[i]) for i in range(h, min(h + 2, len(hs)))]
            for req in self.running:
                c0 = req.num_computed
                first, last = req.num_cached_blocks, (c0 + m) // bs
                for i, target in ends_prefix:
                    if first <= i < last and kv.block_hashes(req, i, i + 1)[0] == target:
                        m = min(m, max(1, (i + 1) * bs - c0) - 1)
        return m

    def repeat_decode(self, batch: Batch, ends: list[float]) -> None:
        """Apply the ends of ``len(ends)`` repeats of ``batch`` (ending at ``ends``, in order), each
        followed by the next step's scheduling: exactly what ``finish_step(batch, end)`` then
        ``schedule(end)`` do for each end, in the same order (block registrations, then the next
        step's allocations, request by request), minus the Batch objects. Only for ends within
        :meth:`decode_repeats` of ``batch``, with nothing added or aborted since it was planned.

        Per token only counters move, so they are applied in bulk: the ITL histogram's sum gets
        the same additions in the same order (each end's gaps, request by request), its counts
        one bisection per gap. The KV work happens only where a request's tokens cross
        a block boundary (every ``block_size`` ends); those points are visited in the per-step
        loop's order: by end, registrations before allocations, request by request.
        """
        k = len(ends)
        if not k:
            return
        stats = self.stats
        kv = self.kv
        block_size = kv.block_size
        itl = stats.itl
        itl_bounds, itl_counts = itl.bounds, itl.counts
        bisect_left = bisect.bisect_left
        reqs = batch.reqs
        n = len(reqs)
        stats.steps += k
        stats.busy_time = _sum_in_order([batch.duration] * k, stats.busy_time)
        if self.waiting:  # each end's schedule tries the head and fails, with the same lookup
            head = self._admission_head(batch)
            if head is not None:
                blocked = self._blocked
                if blocked is not None and blocked[0] is batch:
                    n_hit = blocked[1]
                else:
                    n_hit = len(kv.lookup(head, head.num_tokens)) * self.cfg.block_size
                stats.prefix_queries += k * head.num_tokens
                stats.prefix_hits += k * n_hit
        # the ITL observations in the per-step loop's order: the first end's gap from each
        # request's last token, then each later end's gap (the same for every request) n times
        first = ends[0]
        values = [first - req.last_token for req in reqs]
        for v in values:
            itl_counts[bisect_left(itl_bounds, v)] += 1
        for v in [b - a for a, b in itertools.pairwise(ends)]:
            itl_counts[bisect_left(itl_bounds, v)] += n
            values += [v] * n
        itl.sum = _sum_in_order(values, itl.sum)
        itl.count += n * k
        stats.generation_tokens += n * k
        # the ends where a request completes a block (registration, phase 0) or its next token
        # starts one (allocation, phase 1): (end, phase, request)
        points: list[tuple[int, int, int]] = []
        caching = kv.caching
        for i, req in enumerate(reqs):
            c0 = req.num_computed
            if caching:
                j = (req.num_cached_blocks + 1) * block_size - c0
                if j < 1:
                    j = 1
                while j <= k:
                    points.append((j, 0, i))
                    j = ((c0 + j) // block_size + 1) * block_size - c0
            # the step being applied fits its token in the blocks: the first end whose next
            # token starts a block is >= 1; each allocation takes one block
            j = len(req.block_ids) * block_size - c0
            while j <= k:
                points.append((j, 1, i))
                j += block_size
        start = [req.num_computed for req in reqs]
        if points:
            points.sort()
            for j, phase, i in points:
                req = reqs[i]
                req.num_computed = start[i] + j
                if phase == 0:
                    kv.cache_computed(req)
                elif not kv.allocate(req, 1):
                    raise RuntimeError("repeat_decode beyond decode_repeats: no free KV block")
        last = ends[-1]
        for req, c0 in zip(reqs, start, strict=True):
            req.num_computed = c0 + k
            req.num_output += k
            req.last_token = last

    # ---------------------------------------------------------------- views

    def kv_usage(self) -> float:
        return self.kv.pool.usage()

    def running_loras(self) -> list[str]:
        return sorted({r.lora for r in self.running if r.lora is not None})

    def waiting_loras(self) -> list[str]:
        found = {r.lora for r in self.waiting if r.lora is not None}
        found.update(r.lora for r in self.transferring if r.lora is not None)
        return sorted(found)

    def run_until_idle(self, now: float = 0.0, max_steps: int = 1_000_000) -> float:
        """Drive the engine on simulated time only (tests, what-if tools); returns the end time."""
        for _ in range(max_steps):
            if not self.has_work():
                return now
            batch = self.schedule(now)
            if batch is None:
                nxt = self.next_transfer_time()
                if nxt is None:
                    raise RuntimeError("engine stalled: requests wait but none can be scheduled")
                now = max(now, nxt)
                continue
            now = batch.end
            self.finish_step(batch, now)
        raise RuntimeError(f"engine still busy after {max_steps} steps")
