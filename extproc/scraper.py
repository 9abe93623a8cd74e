"""Pod metrics scraper: reads every pod's ``/metrics`` on a fixed interval, off the request path.

It runs as its own asyncio task and scrapes every target once per interval (default 200 ms),
spread over the interval; each pod has at most one scrape in flight and each scrape its own
timeout, so a slow or dead pod never delays the others. A finished scrape is parsed by
:func:`parse_metrics` (pure) into a fresh :class:`PodMetrics` object handed to
``publish(pod_name, metrics)``: consumers replace their reference atomically, nothing is mutated in
place. A pod without a successful scrape for ``stale_after`` seconds is published once more with
``stale=True`` (plugins treat it as unknown). A scrape whose connection is *refused* (nothing
listens on the port: the pod was killed or its engine exited) publishes the pod stale at once,
without waiting for that bound, so the pod leaves the rotation within one scrape interval; timeouts
and HTTP errors (a slow or overloaded pod) keep the bound. A good scrape clears staleness.

Which engine metric names map to which :class:`PodMetrics` field, and how gauges and histograms
are combined: :mod:`fleet.engine_metrics`.

Loaded LoRA adapters: a vLLM pod's ``/v1/models`` lists every adapter it has loaded as an entry
whose ``parent`` is the base model (:func:`parse_loaded_loras`). The scraper reads it per pod on its
own slower interval (``loras_interval``, default 2 s), at once when a pod appears, when its metrics
come back after a failure (an engine restart forgets adapters loaded at run time), when the metrics
show a running or waiting adapter the list lacks (one was loaded since), and when
:meth:`MetricsScraper.refresh_loras` asks (e.g. after an engine answered 404 for an adapter). The
list rides on every published :class:`PodMetrics` as ``loaded_loras`` (with ``loras_read_at``, when
its read started: the datastore ignores a list read before the pod turned ready); every read is
published at once. A failed read keeps the last list (staleness is the metrics' business); a pod
whose engine does not list adapters (SGLang) keeps ``loaded_loras=None``: unknown.

Gauges are summed over series (several engines / data-parallel ranks behind one port), except the KV
cache usage, which is averaged. Histograms give the mean over the last interval:
(sum now - sum before) / (count now - count before); an interval without new observations keeps
the previous mean for ``latency_window`` seconds, then it becomes unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleet.engine_metrics import LatencyState, parse_metrics
from fleet.pods import PodMetrics

__all__ = [
    "LISTS_LORAS",
    "MetricsScraper",
    "ScrapeTarget",
    "is_connection_refused",
    "parse_loaded_loras",
]

log = logging.getLogger("matrixinfer.extproc.scraper")


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    pod_name: str
    url: str  # "http://ip:port/metrics"
    engine: str  # "vLLM" | "SGLang"

    @property
    def models_url(self) -> str:
        """The engine's model list beside its metrics page: ``http://ip:port/v1/models``."""
        base = self.url.removesuffix("/metrics").rstrip("/")
        return f"{base}/v1/models"


LISTS_LORAS = frozenset({"vLLM"})
"""Engines whose ``/v1/models`` lists the loaded LoRA adapters (entries with a ``parent``)."""


def parse_loaded_loras(body: bytes | str) -> frozenset[str]:
    """The LoRA adapters an engine's ``/v1/models`` answer lists: the ids of entries whose
    ``parent`` names a base model (vLLM lists base models with ``parent: null``).

    Raises ValueError naming what is wrong when the body is not an OpenAI model list.
    """
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"/v1/models answer is not JSON: {exc}") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ValueError("/v1/models answer has no 'data' list")
    loras: set[str] = set()
    for entry in data:
        if not isinstance(entry, dict):
            raise ValueError(f"/v1/models 'data' holds a {type(entry).__name__}, not an object")
        mid, parent = entry.get("id"), entry.get("parent")
        if isinstance(mid, str) and mid and isinstance(parent, str) and parent:
            loras.add(mid)
    return frozenset(loras)


# ------------------------------------------------------------------------------------- scraper


class ScrapeError(Exception):
    """A scrape failed (HTTP status, timeout, connection error, unreadable page)."""


def is_connection_refused(exc: BaseException) -> bool:
    """True when ``exc`` means nothing listens on the pod's port (connection refused).

    That is a plain :class:`ConnectionRefusedError` or an :class:`aiohttp.ClientConnectorError`
    wrapping one; timeouts, resets and HTTP errors are not.
    """
    if isinstance(exc, aiohttp.ClientConnectorError):
        return isinstance(exc.os_error, ConnectionRefusedError)
    return isinstance(exc, ConnectionRefusedError)


@dataclass(slots=True)
class _PodState:
    target: ScrapeTarget
    first_seen: float
    due: float  # when the next scrape should start
    latency: LatencyState | None = None
    last_metrics: PodMetrics | None = None
    last_success: float | None = None
    stale_published: bool = False
    failing: bool = False
    task: asyncio.Task[None] | None = None
    # the loaded LoRA adapters (engines in LISTS_LORAS only), read on their own interval
    loras: frozenset[str] | None = None
    loras_read_at: float | None = None  # when the read that gave ``loras`` started
    loras_due: float = float("inf")  # when the next /v1/models read should start
    loras_failing: bool = False
    loras_task: asyncio.Task[None] | None = None


_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _phase(name: str) -> float:
    """A stable 0..1 offset per pod, so scrapes spread over the interval instead of bursting."""
    return (zlib.crc32(name.encode()) & 0xFFFF) / 65536.0


class MetricsScraper:
    """Scrapes ``targets()`` every ``interval`` seconds and ``publish``-es each pod's metrics.

    Scrapes are spread over the interval (a stable per-pod phase) rather than fired in one burst,
    so the event loop the request path shares is never blocked by hundreds of parses at once.
    ``max_scrapes_per_second`` caps the CPU the scraper may take: with more than
    ``interval x max_scrapes_per_second`` pods the effective interval grows to
    ``pods / max_scrapes_per_second`` (and the staleness bound to at least 2.5 effective
    intervals). ``timeout`` bounds one scrape (connect + read); ``stale_after`` is how long the last
    good read stays trusted. A refused connection (see :func:`is_connection_refused`) does not wait
    for it: the pod's last metrics (or an empty :class:`PodMetrics`) are published with
    ``stale=True`` right after that one failed scrape. ``targets()`` is called once per interval.

    With a ``registry`` it exports ``matrixinfer_gateway_scrape_errors_total{pod}``,
    ``matrixinfer_gateway_scrape_age_seconds{pod}`` (a gauge: seconds since the pod's last good
    scrape, or since it became a target when none succeeded yet; refreshed once per interval) and
    ``matrixinfer_gateway_scrape_duration_seconds`` (histogram of successful and failed scrapes).
    """

    def __init__(
        self,
        targets: Callable[[], Sequence[ScrapeTarget]],
        publish: Callable[[str, PodMetrics], None],
        *,
        interval: float = 0.2,
        timeout: float = 0.5,
        stale_after: float = 1.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_scrapes_per_second: float = 500.0,
        max_connections: int = 100,
        latency_window: float = 10.0,
        loras_interval: float = 2.0,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if stale_after <= 0:
            raise ValueError(f"stale_after must be > 0, got {stale_after}")
        if max_scrapes_per_second <= 0:
            raise ValueError(f"max_scrapes_per_second must be > 0, got {max_scrapes_per_second}")
        if loras_interval <= 0:
            raise ValueError(f"loras_interval must be > 0, got {loras_interval}")
        self._targets = targets
        self._publish = publish
        self.interval = interval
        self.timeout = timeout
        self.stale_after = stale_after
        self.max_scrapes_per_second = max_scrapes_per_second
        self.latency_window = latency_window
        self.loras_interval = loras_interval
        self.max_connections = max_connections
        self._clock = clock
        self._pods: dict[str, _PodState] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._errors: Counter | None = None
        self._age: Gauge | None = None
        self._duration: Histogram | None = None
        self.scrapes = 0  # successful scrapes (for /debug and benchmarks)
        self.failures = 0
        self.lora_reads = 0  # successful /v1/models reads
        if registry is not None:
            self._errors = Counter(
                "matrixinfer_gateway_scrape_errors",
                "Failed /metrics scrapes (HTTP status, timeout, connection, bad page), by pod.",
                ["pod"],
                registry=registry,
            )
            self._age = Gauge(
                "matrixinfer_gateway_scrape_age_seconds",
                "Seconds since the pod's last successful /metrics scrape (since it became a "
                "target when none succeeded yet).",
                ["pod"],
                registry=registry,
            )
            self._duration = Histogram(
                "matrixinfer_gateway_scrape_duration_seconds",
                "Duration of one /metrics scrape (request, read and parse), successful or not.",
                buckets=_DURATION_BUCKETS,
                registry=registry,
            )

    @property
    def effective_interval(self) -> float:
        """The interval actually used: ``interval``, stretched by the scrape-rate cap."""
        return max(self.interval, len(self._pods) / self.max_scrapes_per_second)

    @property
    def effective_stale_after(self) -> float:
        return max(self.stale_after, 2.5 * self.effective_interval)

    # -- lifecycle

    async def start(self) -> None:
        """Start the scrape loop as a background task (idempotent)."""
        if self._loop_task is not None and not self._loop_task.done():
            return
        self._ensure_session()
        self._loop_task = asyncio.create_task(self._run(), name="matrixinfer-metrics-scraper")

    async def stop(self) -> None:
        """Stop the loop, cancel scrapes in progress and close the HTTP session."""
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pending = [
            t
            for s in self._pods.values()
            for t in (s.task, s.loras_task)
            if t is not None and not t.done()
        ]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def scrape_once(self) -> None:
        """Scrape every current target now, and read the adapter list of those that list them
        (joining reads already in progress), and wait."""
        self._ensure_session()
        now = self._clock()
        self._refresh(now)
        for state in self._pods.values():
            if state.task is None or state.task.done():
                self._launch(state)
            if state.target.engine in LISTS_LORAS and (
                state.loras_task is None or state.loras_task.done()
            ):
                self._launch_loras(state, now)
        tasks = [t for s in self._pods.values() for t in (s.task, s.loras_task) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._check_stale(self._clock())

    def refresh_loras(self, pod_name: str) -> None:
        """Read the pod's loaded adapters again soon (next tick), e.g. after its engine answered
        404 for an adapter the last list named. Unknown pods are ignored."""
        state = self._pods.get(pod_name)
        if state is not None and state.target.engine in LISTS_LORAS:
            state.loras_due = min(state.loras_due, self._clock())

    # -- internals

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=2)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept-Encoding": "identity", "Accept": "text/plain"},
                auto_decompress=False,
            )
        return self._session

    async def _run(self) -> None:
        next_refresh = self._clock()
        while True:
            now = self._clock()
            try:
                if now >= next_refresh:
                    self._refresh(now)
                    self._check_stale(now)
                    next_refresh = now + self.interval
                self._start_due(now)
            except Exception:  # a bad target list must not kill the loop
                log.exception("metrics scraper tick failed")
            # several ticks per interval spread the scrapes; never busier than every 10 ms
            await asyncio.sleep(max(0.01, min(0.05, self.interval / 8)))

    def _refresh(self, now: float) -> None:
        """Take the current target list: add new pods, drop gone ones, follow changed URLs."""
        current = {t.pod_name: t for t in self._targets()}
        for name in [n for n in self._pods if n not in current]:
            self._drop(name)
        every = max(self.interval, len(current) / self.max_scrapes_per_second)
        for name, target in current.items():
            state = self._pods.get(name)
            lists = target.engine in LISTS_LORAS
            if state is None:
                state = _PodState(target, now, due=now + _phase(name) * every)
                state.loras_due = now if lists else float("inf")  # read at once
                self._pods[name] = state
            elif state.target != target:
                state.target = target
                state.latency = None
                state.loras = state.loras_read_at = None
                state.loras_due = now if lists else float("inf")

    def _start_due(self, now: float) -> None:
        every = self.effective_interval
        for state in self._pods.values():
            if state.due <= now and (state.task is None or state.task.done()):
                self._launch(state)
                # keep the pod's phase; if it fell behind (slow pod), start counting from now
                state.due += every
                if state.due <= now:
                    state.due = now + every
            if state.loras_due <= now and (state.loras_task is None or state.loras_task.done()):
                self._launch_loras(state, now)

    def _launch(self, state: _PodState) -> None:
        state.task = asyncio.create_task(self._scrape(state))

    def _launch_loras(self, state: _PodState, now: float) -> None:
        state.loras_due = now + self.loras_interval
        state.loras_task = asyncio.create_task(self._read_loras(state))

    def _drop(self, name: str) -> None:
        state = self._pods.pop(name)
        for task in (state.task, state.loras_task):
            if task is not None and not task.done():
                task.cancel()
        for metric in (self._errors, self._age):
            if metric is not None:
                with contextlib.suppress(KeyError):
                    metric.remove(name)

    def _check_stale(self, now: float) -> None:
        stale_after = self.effective_stale_after
        for name, state in self._pods.items():
            last = state.last_success
            if self._age is not None:
                self._age.labels(name).set(now - (last if last is not None else state.first_seen))
            if (
                last is not None
                and not state.stale_published
                and now - last > stale_after
                and state.last_metrics is not None
            ):
                state.stale_published = True
                self._safe_publish(name, replace(state.last_metrics, stale=True))

    async def _scrape(self, state: _PodState) -> None:
        target = state.target
        session = self._ensure_session()
        started = time.perf_counter()
        try:
            async with session.get(target.url) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                body = await resp.read()
            now = self._clock()
            metrics, state.latency = parse_metrics(
                body.decode("utf-8", "replace"),
                target.engine,
                state.latency,
                now,
                latency_window=self.latency_window,
            )
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ScrapeError, ValueError) as exc:
            self.failures += 1
            if self._errors is not None:
                self._errors.labels(target.pod_name).inc()
            if not state.failing:
                state.failing = True
                log.warning(
                    "scraping %s (%s) failed: %s",
                    target.pod_name,
                    target.url,
                    str(exc) or type(exc).__name__,
                )
            if (
                is_connection_refused(exc)
                and not state.stale_published
                and self._pods.get(target.pod_name) is state
            ):
                # nothing listens: the pod is gone or its engine exited; don't wait for the bound
                state.stale_published = True
                last = state.last_metrics
                self._safe_publish(
                    target.pod_name,
                    replace(last, stale=True, unreachable=True)
                    if last is not None
                    else PodMetrics(stale=True, unreachable=True),
                )
            return
        finally:
            if self._duration is not None:
                self._duration.observe(time.perf_counter() - started)
        if self._pods.get(target.pod_name) is not state:
            return  # dropped while in flight
        lists = target.engine in LISTS_LORAS
        if state.failing:
            state.failing = False
            log.info("scraping %s (%s) works again", target.pod_name, target.url)
            if lists:  # a restarted engine has forgotten adapters loaded at run time
                state.loras_due = now
        loras = state.loras
        if (
            lists
            and loras is not None
            and not (metrics.running_loras <= loras and metrics.waiting_loras <= loras)
        ):
            state.loras_due = now  # an adapter was loaded since the last read
        metrics.loaded_loras = loras
        metrics.loras_read_at = state.loras_read_at
        self.scrapes += 1
        state.last_metrics = metrics
        state.last_success = metrics.scraped_at
        state.stale_published = False
        self._safe_publish(target.pod_name, metrics)

    async def _read_loras(self, state: _PodState) -> None:
        """One read of the pod's ``/v1/models``; a changed adapter list is published at once."""
        target = state.target
        session = self._ensure_session()
        started = self._clock()
        try:
            async with session.get(
                target.models_url, headers={"Accept": "application/json"}
            ) as resp:
                if resp.status != 200:
                    raise ScrapeError(f"HTTP {resp.status}")
                body = await resp.read()
            loras = parse_loaded_loras(body)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ScrapeError, ValueError) as exc:
            if not state.loras_failing:
                state.loras_failing = True
                log.warning(
                    "reading the LoRA adapters of %s (%s) failed: %s",
                    target.pod_name,
                    target.models_url,
                    str(exc) or type(exc).__name__,
                )
            return
        if state.loras_failing:
            state.loras_failing = False
            log.info("reading the LoRA adapters of %s works again", target.pod_name)
        if self._pods.get(target.pod_name) is not state:
            return  # dropped while in flight
        self.lora_reads += 1
        if loras != state.loras:
            names = ", ".join(sorted(loras)) or "none"
            log.info("pod %s has LoRA adapters loaded: %s", target.pod_name, names)
        state.loras, state.loras_read_at = loras, started
        last = state.last_metrics
        if last is not None:
            # published even when unchanged: a list read since the pod turned ready is known
            state.last_metrics = replace(last, loaded_loras=loras, loras_read_at=started)
            if not state.stale_published:
                self._safe_publish(target.pod_name, state.last_metrics)

    def _safe_publish(self, pod_name: str, metrics: PodMetrics) -> None:
        try:
            self._publish(pod_name, metrics)
        except Exception:  # the consumer's bug must not stop scraping
            log.exception("publishing metrics of pod %s failed", pod_name)
