"""Where the autoscaler's metric values come from (the edge: HTTP reads, then pure parsing).

Every source answers a :class:`Reading`: metric name → value summed over what it read, plus the
problems it met. A source that could not read everything it should (a pod not answering, one
gateway replica down) reports its metrics as *missing* rather than a partial sum, so the planner
never scales down on half the data.

- **pods** (:class:`PodSource`): each target pod's ``/metrics``. The engine names of running and
  waiting requests and KV-cache use (vLLM and SGLang, with their fallbacks) are read through
  :func:`fleet.engine_metrics.parse_metrics`, so ``vllm:num_requests_waiting`` and
  ``sglang:num_queue_reqs`` mean the same on either engine. Any other name is read as it is:
  a gauge is summed over its series, a counter becomes a rate per second between two scrapes.
- **gateway** (:class:`GatewaySource`): every extproc replica's ``/metrics``, the
  ``matrixinfer_gateway_server_waiting_requests`` / ``..._in_flight_requests`` series of one
  ModelServer, summed over the replicas (aliases ``gateway_queue_length``,
  ``gateway_in_flight_requests``).
- **prometheus** (:class:`PrometheusSource`): an instant query; the values of the result vector
  are summed and reported under the policy's metric names that occur in the query text (or the
  policy's only metric).

:func:`merge` joins the readings: a metric read by several sources takes the largest value.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from fleet.engine_metrics import LatencyState, parse_metrics

__all__ = [
    "GATEWAY_IN_FLIGHT",
    "GATEWAY_WAITING",
    "GatewaySource",
    "PodSource",
    "PodTarget",
    "PrometheusSource",
    "Reading",
    "engine_of",
    "gateway_values",
    "is_gateway_metric",
    "merge",
    "page_values",
    "prometheus_value",
]

GATEWAY_WAITING = "matrixinfer_gateway_server_waiting_requests"
GATEWAY_IN_FLIGHT = "matrixinfer_gateway_server_in_flight_requests"
_GATEWAY_ALIASES = {
    GATEWAY_WAITING: GATEWAY_WAITING,
    "gateway_queue_length": GATEWAY_WAITING,
    GATEWAY_IN_FLIGHT: GATEWAY_IN_FLIGHT,
    "gateway_in_flight_requests": GATEWAY_IN_FLIGHT,
}


def is_gateway_metric(name: str) -> bool:
    """Whether a policy metric is one the gateway publishes (read by a gateway source)."""
    return name in _GATEWAY_ALIASES


# engine names read through fleet.engine_metrics: name -> PodMetrics field
_ENGINE_FIELDS: dict[str, str] = {
    "vllm:num_requests_waiting": "waiting",
    "sglang:num_queue_reqs": "waiting",
    "vllm:num_requests_running": "running",
    "sglang:num_running_reqs": "running",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "sglang:token_usage": "kv_cache_usage",
}


@dataclass(slots=True)
class Reading:
    """Values a source read (summed over what it read) and the problems it met."""

    values: dict[str, float] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def merge(
    names: Iterable[str], readings: Iterable[Reading]
) -> tuple[dict[str, float | None], list[str]]:
    """The planner's input: every policy metric's value (None: missing) and all problems."""
    values: dict[str, float | None] = {}
    problems: list[str] = []
    got: dict[str, float] = {}
    missing: set[str] = set()
    for r in readings:
        problems.extend(r.problems)
        missing |= r.missing
        for k, v in r.values.items():
            got[k] = max(v, got.get(k, -math.inf))
    for name in names:
        values[name] = None if name in missing or name not in got else got[name]
        if name not in got and name not in missing:
            problems.append(f"metric {name!r}: no source reports it")
    return values, problems


# ----------------------------------------------------------------------------------------------
# pure parsing


def engine_of(page: str) -> str:
    """The engine that wrote a /metrics page (SGLang when its prefix occurs, else vLLM)."""
    return "SGLang" if "sglang:" in page else "vLLM"


@dataclass(slots=True)
class _PodState:
    latency: LatencyState | None = None
    counters: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (t, total)


def page_values(
    page: str, names: Sequence[str], state: _PodState, now: float
) -> tuple[dict[str, float], set[str]]:
    """One pod's values of `names` from its page, and the names it lacks. A counter's first
    scrape has no rate yet: missing."""
    out: dict[str, float] = {}
    lacking: set[str] = set()
    engine_names = [n for n in names if n in _ENGINE_FIELDS]
    if engine_names:
        metrics, state.latency = parse_metrics(page, engine_of(page), state.latency, now)
        for n in engine_names:
            v = getattr(metrics, _ENGINE_FIELDS[n])
            if v is None:
                lacking.add(n)
            else:
                out[n] = float(v)
    other = [n for n in names if n not in _ENGINE_FIELDS]
    if not other:
        return out, lacking
    wanted = set(other)
    gauges: dict[str, float] = {}
    counters: dict[str, float] = {}
    for fam in text_string_to_metric_families(page):
        # a counter family "x" has samples "x_total"; a policy may name either
        if fam.type == "counter":
            key = next((n for n in (fam.name, fam.name + "_total") if n in wanted), None)
            if key is not None:
                total = sum(x.value for x in fam.samples if x.name == fam.name + "_total")
                counters[key] = counters.get(key, 0.0) + total
        elif fam.type in ("gauge", "untyped") and fam.name in wanted:
            total = sum(x.value for x in fam.samples if x.name == fam.name)
            gauges[fam.name] = gauges.get(fam.name, 0.0) + total
    for n in other:
        if n in gauges:
            out[n] = gauges[n]
        elif n in counters:
            total = counters[n]
            prev = state.counters.get(n)
            state.counters[n] = (now, total)
            if prev is None or now <= prev[0] or total < prev[1]:
                lacking.add(n)  # first scrape or a counter reset: no rate yet
            else:
                out[n] = (total - prev[1]) / (now - prev[0])
        else:
            lacking.add(n)
    return out, lacking


_GATEWAY_LINE = re.compile(
    r"^(" + GATEWAY_WAITING + "|" + GATEWAY_IN_FLIGHT + r")\{([^}]*)\}\s+(\S+)", re.M
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def gateway_values(page: str, namespace: str, server: str) -> dict[str, float]:
    """One extproc replica's waiting and in-flight counts of ModelServer namespace/server
    (absent: that replica does not know the ModelServer)."""
    out: dict[str, float] = {}
    for name, labels, raw in _GATEWAY_LINE.findall(page):
        lab = dict(_LABEL.findall(labels))
        if lab.get("namespace") == namespace and lab.get("server") == server:
            out[name] = out.get(name, 0.0) + float(raw)
    return out


def prometheus_value(doc: object) -> float:
    """The sum of an instant query's result (vector or scalar); ValueError names what is wrong."""
    if not isinstance(doc, dict) or doc.get("status") != "success":
        err = doc.get("error") if isinstance(doc, dict) else None
        raise ValueError(f"query failed: {err or doc!r}"[:300])
    data = doc.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        return float(result[1])
    if kind == "vector" and isinstance(result, list):
        if not result:
            raise ValueError("query returned no series")
        return sum(float(s["value"][1]) for s in result)
    raise ValueError(f"query returned a {kind!r}, expected a vector or a scalar")


# ----------------------------------------------------------------------------------------------
# the sources (HTTP)


async def _get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        return await resp.text()


@dataclass(frozen=True, slots=True)
class PodTarget:
    name: str
    url: str  # http://ip:port/path


class PodSource:
    """Scrapes the target's pods; keeps per-pod state for counter rates and latency means."""

    def __init__(self, session: aiohttp.ClientSession, names: Sequence[str]) -> None:
        self.session = session
        self.names = [n for n in names if n not in _GATEWAY_ALIASES]
        self._state: dict[str, _PodState] = {}

    async def read(self, pods: Sequence[PodTarget], replicas: int, now: float) -> Reading:
        """`pods`: the target's ready pods; `replicas`: how many the target has now. At zero
        replicas the engines' demand is 0 (waking up is the gateway's signal); with replicas but
        no ready pod yet it is missing."""
        reading = Reading()
        if not self.names:
            return reading
        if not pods:
            if replicas > 0:
                reading.missing |= set(self.names)
                reading.problems.append("pods: no ready pod to scrape")
            else:
                reading.values = dict.fromkeys(self.names, 0.0)
            return reading
        pages = await asyncio.gather(
            *(_get_text(self.session, p.url) for p in pods), return_exceptions=True
        )
        for name in list(self._state):
            if name not in {p.name for p in pods}:
                del self._state[name]
        totals = dict.fromkeys(self.names, 0.0)
        for pod, page in zip(pods, pages, strict=True):
            if isinstance(page, BaseException):
                reading.problems.append(f"pod {pod.name}: {pod.url}: {page or type(page).__name__}")
                reading.missing |= set(self.names)
                continue
            state = self._state.setdefault(pod.name, _PodState())
            vals, lacking = page_values(page, self.names, state, now)
            for n in lacking:
                reading.problems.append(f"pod {pod.name}: no value of {n!r}")
            reading.missing |= lacking
            for n, v in vals.items():
                totals[n] += v
        reading.values = {n: v for n, v in totals.items() if n not in reading.missing}
        return reading


class GatewaySource:
    """Reads one ModelServer's waiting and in-flight counts from every extproc replica."""

    def __init__(
        self, session: aiohttp.ClientSession, urls: Sequence[str], names: Sequence[str]
    ) -> None:
        self.session = session
        self.urls = list(urls)
        self.names = [n for n in names if n in _GATEWAY_ALIASES]

    async def read(self, namespace: str, server: str) -> Reading:
        reading = Reading()
        if not self.names:
            return reading
        if not self.urls:
            reading.missing |= set(self.names)
            reading.problems.append("gateway: no extproc metrics URL configured")
            return reading
        pages = await asyncio.gather(
            *(_get_text(self.session, u) for u in self.urls), return_exceptions=True
        )
        sums: dict[str, float] = {}
        for url, page in zip(self.urls, pages, strict=True):
            if isinstance(page, BaseException):
                reading.problems.append(f"gateway {url}: {page or type(page).__name__}")
                reading.missing |= set(self.names)
                continue
            for k, v in gateway_values(page, namespace, server).items():
                sums[k] = sums.get(k, 0.0) + v
        for n in self.names:
            if n not in reading.missing:
                reading.values[n] = sums.get(_GATEWAY_ALIASES[n], 0.0)
        return reading


class PrometheusSource:
    """An instant query over Prometheus' HTTP API."""

    def __init__(
        self, session: aiohttp.ClientSession, server_url: str, query: str, names: Sequence[str]
    ) -> None:
        self.session = session
        self.url = server_url.rstrip("/") + "/api/v1/query"
        self.query = query
        named = [n for n in names if re.search(rf"(?<![\w:]){re.escape(n)}(?![\w:])", query)]
        self.names = named or (list(names) if len(names) == 1 else [])
        self.problem = (
            None
            if self.names
            else f"prometheus query {query!r} names none of the policy's metrics"
            f" ({', '.join(names)})"
        )

    async def read(self) -> Reading:
        reading = Reading()
        if self.problem is not None:
            reading.problems.append(self.problem)
            return reading
        try:
            async with self.session.get(self.url, params={"query": self.query}) as resp:
                doc = await resp.json(content_type=None)
            value = prometheus_value(doc)
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            reading.problems.append(f"prometheus {self.url}: {exc or type(exc).__name__}")
            reading.missing |= set(self.names)
            return reading
        if not math.isfinite(value):
            reading.problems.append(f"prometheus {self.url}: value {value}")
            reading.missing |= set(self.names)
            return reading
        reading.values = dict.fromkeys(self.names, value)
        return reading
