"""Streaming-aware load generator for OpenAI-compatible chat endpoints (loopback only).

One asyncio process (uvloop when available), one aiohttp session. A workload is a list of
:class:`Conversation` objects (see ``bench.workloads``): each has an arrival offset, a model name
(base model or LoRA adapter), a fixed message prefix and one or more user turns. Turn *k+1* of a
conversation is sent after turn *k* finished (plus ``think_time``) and carries the whole history,
including the answers received, so multi-turn chat grows its prompt as in real life.

Two arrival modes:

- **open loop** (:func:`run_open_loop`): conversations start at their ``arrival`` offsets (the
  workload draws them, e.g. Poisson at a target QPS), whether or not earlier ones finished;
- **closed loop** (:func:`run_closed_loop`): ``concurrency`` workers each run one conversation at a
  time, back to back.

Per request it records: send time, TTFT (first chunk with content), inter-token gaps (between
content chunks), end-to-end latency, output/prompt/cached tokens (from the forced
``stream_options.include_usage`` chunk; the content-chunk count otherwise), the serving pod
(``x-inference-pod``) and the error, if any. Runs are bounded by ``duration`` (no new
conversation starts after it), ``max_requests`` and ``drain_timeout`` (requests still open then
are cancelled and counted as errors).

Per-chunk work is kept small: one ``readline``, a prefix check, one ``orjson.loads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

__all__ = [
    "Conversation",
    "LoadResult",
    "RequestRecord",
    "Summary",
    "check_loopback",
    "percentile",
    "run_closed_loop",
    "run_open_loop",
    "summarize",
]


@dataclass(slots=True, frozen=True)
class Conversation:
    """One client session: ``prefix`` messages, then ``turns`` user messages sent one by one."""

    arrival: float  # seconds after the run starts (open loop); ignored in closed loop
    model: str
    prefix: tuple[
        tuple[str, str], ...
    ]  # (role, content) sent before the turns, e.g. a system prompt
    turns: tuple[str, ...]  # user messages
    max_tokens: int
    tag: str = ""  # group / session / adapter label, for per-tag breakdowns
    think_time: float = 0.0  # seconds between an answer and the next turn


@dataclass(slots=True)
class RequestRecord:
    tag: str
    turn: int
    scheduled: float  # offset the request was due (s after start)
    sent: float  # offset it was sent
    ttft: float | None = None  # s from send to the first content chunk
    e2e: float | None = None  # s from send to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between content chunks (s)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    pod: str = ""
    status: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(slots=True)
class LoadResult:
    records: list[RequestRecord]
    wall: float  # s from the first send to the last completion (or the drain deadline)
    max_send_lag: float  # worst delay of an open-loop send behind its schedule (loadgen health)
    mode: str
    target: float  # QPS (open loop) or concurrency (closed loop)


@dataclass(slots=True)
class Summary:
    requests: int
    ok: int
    errors: int
    req_per_s: float
    output_tok_per_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    ttft_mean: float
    itl_p50: float
    itl_p90: float
    itl_p99: float
    e2e_p50: float
    e2e_p90: float
    cached_fraction: float  # cached prompt tokens / prompt tokens (prefix-cache hit rate)
    max_send_lag: float
    wall: float
    error_kinds: dict[str, int]
    pods: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(result: LoadResult) -> Summary:
    recs = result.records
    ok = [r for r in recs if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    itls = [gap for r in ok for gap in r.itl]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    kinds: dict[str, int] = {}
    for r in recs:
        if r.error:
            kind = r.error.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    pods: dict[str, int] = {}
    for r in ok:
        pods[r.pod] = pods.get(r.pod, 0) + 1
    wall = result.wall if result.wall > 0 else math.nan
    return Summary(
        requests=len(recs),
        ok=len(ok),
        errors=len(recs) - len(ok),
        req_per_s=len(ok) / wall,
        output_tok_per_s=out_tokens / wall,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        ttft_mean=sum(ttfts) / len(ttfts) if ttfts else math.nan,
        itl_p50=percentile(itls, 50),
        itl_p90=percentile(itls, 90),
        itl_p99=percentile(itls, 99),
        e2e_p50=percentile(e2es, 50),
        e2e_p90=percentile(e2es, 90),
        cached_fraction=cached / prompt if prompt else math.nan,
        max_send_lag=result.max_send_lag,
        wall=result.wall,
        error_kinds=kinds,
        pods=dict(sorted(pods.items())),
    )


# ------------------------------------------------------------------------------------ the client


def check_loopback(base_url: str) -> None:
    """Refuse a target that is not on loopback: the benchmarks never leave the machine."""
    host = urllib.parse.urlsplit(base_url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"load generator target {base_url!r}: host {host!r} is not a loopback address "
            "(127.0.0.0/8, ::1 or localhost)"
        )


class _Client:
    def __init__(self, base_url: str, request_timeout: float) -> None:
        check_loopback(base_url)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.request_timeout = request_timeout
        self.session: aiohttp.ClientSession | None = None
        self.t0 = 0.0
        self.records: list[RequestRecord] = []
        self.last_end = 0.0

    async def __aenter__(self) -> _Client:
        connector = aiohttp.TCPConnector(limit=0, force_close=False, ttl_dns_cache=None)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=self.request_timeout),
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def conversation(self, conv: Conversation, scheduled: float) -> None:
        messages: list[dict[str, str]] = [{"role": r, "content": c} for r, c in conv.prefix]
        due = scheduled
        for turn, text in enumerate(conv.turns):
            messages.append({"role": "user", "content": text})
            rec = RequestRecord(conv.tag, turn, due, time.perf_counter() - self.t0)
            self.records.append(rec)
            answer = await self.one(conv, messages, rec)
            if answer is None:
                return  # a failed turn ends the session (its history is broken)
            messages.append({"role": "assistant", "content": answer})
            if conv.think_time > 0 and turn + 1 < len(conv.turns):
                await asyncio.sleep(conv.think_time)
            due = time.perf_counter() - self.t0

    async def one(
        self, conv: Conversation, messages: list[dict[str, str]], rec: RequestRecord
    ) -> str | None:
        assert self.session is not None
        body = orjson.dumps(
            {
                "model": conv.model,
                "messages": messages,
                "max_tokens": conv.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        clock = time.perf_counter
        start = clock()
        rec.sent = start - self.t0
        parts: list[str] = []
        chunks = 0
        last = 0.0
        try:
            async with self.session.post(
                self.url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                rec.status = resp.status
                rec.pod = resp.headers.get("x-inference-pod", "")
                if resp.status != 200:
                    text = (await resp.read())[:200].decode(errors="replace")
                    rec.error = f"http {resp.status}: {text}"
                    return None
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        break
                    data = orjson.loads(payload)
                    choices = data.get("choices")
                    if choices:
                        content = choices[0].get("delta", {}).get("content")
                        if content:
                            now = clock()
                            if chunks == 0:
                                rec.ttft = now - start
                            else:
                                rec.itl.append(now - last)
                            last = now
                            chunks += 1
                            parts.append(content)
                    usage = data.get("usage")
                    if usage:
                        rec.output_tokens = int(usage.get("completion_tokens") or 0)
                        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        rec.cached_tokens = int(details.get("cached_tokens") or 0)
        except asyncio.CancelledError:
            rec.error = "cancelled: still open at the drain deadline"
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
            return None
        end = clock()
        rec.e2e = end - start
        if rec.output_tokens == 0:
            rec.output_tokens = chunks
        if chunks == 0:
            rec.error = "empty: no content chunk"
            return None
        self.last_end = max(self.last_end, end - self.t0)
        return "".join(parts)


async def _drain(tasks: set[asyncio.Task[None]], limit: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=limit)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_open_loop(
    base_url: str,
    conversations: Sequence[Conversation],
    *,
    duration: float,
    max_requests: int | None = None,
    drain_timeout: float = 30.0,
    request_timeout: float = 60.0,
    qps: float = math.nan,
) -> LoadResult:
    """Start each conversation at its ``arrival`` offset (those after ``duration`` are skipped)."""
    async with _Client(base_url, request_timeout) as client:
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        client.t0 = time.perf_counter()
        lag = 0.0
        started = 0
        for conv in sorted(conversations, key=lambda c: c.arrival):
            if conv.arrival > duration or (max_requests is not None and started >= max_requests):
                break
            delay = conv.arrival - (time.perf_counter() - client.t0)
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            task = loop.create_task(client.conversation(conv, conv.arrival))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            started += len(conv.turns)
        await _drain(set(tasks), drain_timeout)
        wall = max(client.last_end, 1e-9)
        return LoadResult(client.records, wall, lag, "open", qps)


async def run_closed_loop(
    base_url: str,
    conversations: Sequence[Conversation],
    *,
    concurrency: int,
    duration: float,
    max_requests: int | None = None,
    drain_timeout: float = 30.0,
    request_timeout: float = 60.0,
) -> LoadResult:
    """``concurrency`` workers run the conversations in order, back to back, until ``duration``."""
    async with _Client(base_url, request_timeout) as client:
        client.t0 = time.perf_counter()
        queue = list(reversed(conversations))

        async def worker() -> None:
            while queue and time.perf_counter() - client.t0 < duration:
                if max_requests is not None and len(client.records) >= max_requests:
                    return
                conv = queue.pop()
                await client.conversation(conv, time.perf_counter() - client.t0)

        tasks = {asyncio.get_running_loop().create_task(worker()) for _ in range(concurrency)}
        await _drain(tasks, duration + drain_timeout)
        wall = max(client.last_end, 1e-9)
        return LoadResult(client.records, wall, 0.0, "closed", float(concurrency))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (cheaper per chunk), else the default loop."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


def run(coro: Any) -> Any:
    """Run ``coro`` to completion on a fresh (uv)loop."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
