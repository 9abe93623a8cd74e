"""The engines' Prometheus pages read into :class:`fleet.pods.PodMetrics` (pure).

Engine name maps (the first name present wins; histograms are read from their _sum/_count):

- waiting: ``vllm:num_requests_waiting`` | ``sglang:num_queue_reqs``
- running: ``vllm:num_requests_running`` | ``sglang:num_running_reqs``
- kv_cache_usage: ``vllm:kv_cache_usage_perc``, else ``vllm:gpu_cache_usage_perc`` |
  ``sglang:token_usage``
- ttft_seconds: ``vllm:time_to_first_token_seconds`` | ``sglang:time_to_first_token_seconds``
- tpot_seconds: ``vllm:inter_token_latency_seconds``, else ``vllm:time_per_output_token_seconds`` |
  ``sglang:inter_token_latency_seconds``, else ``sglang:time_per_output_token_seconds``
- LoRA: ``vllm:lora_requests_info`` labels ``running_lora_adapters``, ``waiting_lora_adapters``,
  ``max_lora`` of the sample with the latest value (a timestamp) | not reported by SGLang
- ``MatrixInfer``: the runtime sidecar's ``matrixinfer_engine_*`` names (``runtime/metrics.py``)

Gauges are summed over series (several engines / data-parallel ranks behind one port), except the KV
cache usage, which is averaged. Histograms give the mean over the last interval:
(sum now - sum before) / (count now - count before); an interval without new observations keeps
the previous mean for ``latency_window`` seconds, then it becomes unknown.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from fleet.pods import PodMetrics

__all__ = ["ENGINES", "LatencyState", "parse_metrics", "pod_metrics"]


# slots in the per-page accumulator
_WAITING, _RUNNING, _KV, _KV_FALLBACK, _TTFT_SUM, _TTFT_COUNT = 0, 1, 2, 3, 4, 5
_TPOT_SUM, _TPOT_COUNT, _TPOT_SUM_FB, _TPOT_COUNT_FB, _LORA = 6, 7, 8, 9, 10
_NSLOTS = 11


@dataclass(frozen=True, slots=True)
class _EngineNames:
    prefix: str  # every interesting name starts with it
    slots: dict[str, int]  # full metric name -> accumulator slot
    pattern: re.Pattern[str]  # one sample line of an interesting metric: name, labels, value


def _names(
    prefix: str,
    waiting: str,
    running: str,
    kv: str,
    kv_fallback: str | None,
    ttft: str,
    tpot: str,
    tpot_fallback: str | None,
    lora: str | None,
) -> _EngineNames:
    slots = {
        waiting: _WAITING,
        running: _RUNNING,
        kv: _KV,
        f"{ttft}_sum": _TTFT_SUM,
        f"{ttft}_count": _TTFT_COUNT,
        f"{tpot}_sum": _TPOT_SUM,
        f"{tpot}_count": _TPOT_COUNT,
    }
    if kv_fallback:
        slots[kv_fallback] = _KV_FALLBACK
    if tpot_fallback:
        slots[f"{tpot_fallback}_sum"] = _TPOT_SUM_FB
        slots[f"{tpot_fallback}_count"] = _TPOT_COUNT_FB
    if lora:
        slots[lora] = _LORA
    # "\n<prefix>" is a literal the regex engine scans for in C; only lines starting with an
    # interesting name match; the name must be followed by "{" or " " (no partial names).
    alternatives = "|".join(
        re.escape(n[len(prefix) :]) for n in sorted(slots, key=len, reverse=True)
    )
    pattern = re.compile(
        "\n" + re.escape(prefix) + "(" + alternatives + r")(?:\{([^\n]*)\})?[ \t]+([^ \t\n]+)"
    )
    return _EngineNames(prefix, slots, pattern)


ENGINES: dict[str, _EngineNames] = {
    "vLLM": _names(
        "vllm:",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:lora_requests_info",
    ),
    "SGLang": _names(
        "sglang:",
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        None,
        "sglang:time_to_first_token_seconds",
        "sglang:inter_token_latency_seconds",
        "sglang:time_per_output_token_seconds",
        None,
    ),
    "MatrixInfer": _names(  # the runtime sidecar's /metrics (runtime/metrics.py), either engine
        "matrixinfer_engine_",
        "matrixinfer_engine_requests_waiting",
        "matrixinfer_engine_requests_running",
        "matrixinfer_engine_kv_cache_usage_ratio",
        None,
        "matrixinfer_engine_time_to_first_token_seconds",
        "matrixinfer_engine_inter_token_latency_seconds",
        None,
        "matrixinfer_engine_lora_requests_info",
    ),
}
"""Metric name maps by ``ModelServer.spec.inferenceEngine`` (and ``MatrixInfer`` for pages the
runtime sidecar serves)."""

_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class LatencyState:
    """Histogram totals from the previous scrape of one pod, for interval means."""

    ttft_sum: float | None = None
    ttft_count: float | None = None
    tpot_sum: float | None = None
    tpot_count: float | None = None
    ttft_mean: float | None = None
    ttft_at: float = 0.0
    tpot_mean: float | None = None
    tpot_at: float = 0.0


def _interval_mean(
    s: float | None,
    c: float | None,
    prev_s: float | None,
    prev_c: float | None,
    prev_mean: float | None,
    prev_at: float,
    now: float,
    window: float,
) -> tuple[float | None, float]:
    """(mean over the interval, when it was observed) from histogram totals."""
    if s is not None and c is not None and prev_s is not None and prev_c is not None:
        dc = c - prev_c
        if dc > 0:
            ds = s - prev_s
            if ds >= 0:
                return ds / dc, now
        # dc == 0: no new observation; dc < 0: counter reset (engine restart) -> start over
    if (
        prev_mean is not None
        and now - prev_at <= window
        and (c is None or prev_c is None or c >= prev_c)
    ):
        return prev_mean, prev_at
    return None, 0.0


def _split_adapters(value: str) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(a.strip() for a in value.split(",") if a.strip())


def parse_metrics(
    text: str,
    engine: str,
    previous: LatencyState | None,
    now: float,
    *,
    latency_window: float = 10.0,
) -> tuple[PodMetrics, LatencyState]:
    """Map one Prometheus text page to :class:`PodMetrics` (pure).

    ``previous`` is the state returned by the pod's previous call (None for the first one); the
    returned state goes into the next call. Raises ValueError for an unknown engine.
    """
    names = ENGINES.get(engine)
    if names is None:
        raise ValueError(f"unknown inference engine {engine!r} (known: {', '.join(ENGINES)})")
    prefix = names.prefix
    slots = names.slots
    acc: list[float | None] = [None] * _NSLOTS
    kv_n = [0, 0]  # samples behind _KV and _KV_FALLBACK (averaged)
    lora_best = -1.0
    lora_labels = ""
    samples = names.pattern.findall(text)
    if text.startswith(prefix):  # the pattern anchors on a newline; the first line has none
        end = text.find("\n")
        first_line = text if end < 0 else text[:end]
        samples[:0] = names.pattern.findall("\n" + first_line)
    for short, labels, raw in samples:
        slot = slots[prefix + short]
        try:
            value = float(raw)
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        if slot == _LORA:
            if value > lora_best:
                lora_best = value
                lora_labels = labels
            continue
        if slot == _KV:
            kv_n[0] += 1
        elif slot == _KV_FALLBACK:
            kv_n[1] += 1
        old = acc[slot]
        acc[slot] = value if old is None else old + value

    kv = acc[_KV]
    if kv is not None:
        kv /= kv_n[0]
    elif acc[_KV_FALLBACK] is not None:
        kv = acc[_KV_FALLBACK] / kv_n[1]  # type: ignore[operator]
    tpot_sum, tpot_count = acc[_TPOT_SUM], acc[_TPOT_COUNT]
    if tpot_count is None:
        tpot_sum, tpot_count = acc[_TPOT_SUM_FB], acc[_TPOT_COUNT_FB]

    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int | None = None
    if lora_best >= 0:
        labels = dict(_LABEL.findall(lora_labels))
        running_loras = _split_adapters(labels.get("running_lora_adapters", ""))
        waiting_loras = _split_adapters(labels.get("waiting_lora_adapters", ""))
        with contextlib.suppress(ValueError):
            max_loras = int(float(labels.get("max_lora", "")))

    return pod_metrics(
        acc[_WAITING],
        acc[_RUNNING],
        kv,
        acc[_TTFT_SUM],
        acc[_TTFT_COUNT],
        tpot_sum,
        tpot_count,
        running_loras,
        waiting_loras,
        max_loras,
        previous,
        now,
        latency_window=latency_window,
    )


def pod_metrics(
    waiting: float | None,
    running: float | None,
    kv_cache_usage: float | None,
    ttft_sum: float | None,
    ttft_count: float | None,
    tpot_sum: float | None,
    tpot_count: float | None,
    running_loras: frozenset[str],
    waiting_loras: frozenset[str],
    max_loras: int | None,
    previous: LatencyState | None,
    now: float,
    *,
    latency_window: float = 10.0,
) -> tuple[PodMetrics, LatencyState]:
    """:class:`PodMetrics` from the values of one page (what :func:`parse_metrics` reads from
    it: gauges, histogram totals, LoRA labels), for a reader that has them without a page (the
    fleet simulator reads its engines so). ``previous`` and the state returned: as for
    :func:`parse_metrics`."""
    prev = previous if previous is not None else LatencyState()
    ttft_mean, ttft_at = _interval_mean(
        ttft_sum,
        ttft_count,
        prev.ttft_sum,
        prev.ttft_count,
        prev.ttft_mean,
        prev.ttft_at,
        now,
        latency_window,
    )
    tpot_mean, tpot_at = _interval_mean(
        tpot_sum,
        tpot_count,
        prev.tpot_sum,
        prev.tpot_count,
        prev.tpot_mean,
        prev.tpot_at,
        now,
        latency_window,
    )
    state = LatencyState(
        ttft_sum, ttft_count, tpot_sum, tpot_count, ttft_mean, ttft_at, tpot_mean, tpot_at
    )
    metrics = PodMetrics(
        waiting=waiting,
        running=running,
        kv_cache_usage=kv_cache_usage,
        ttft_seconds=ttft_mean,
        tpot_seconds=tpot_mean,
        running_loras=running_loras,
        waiting_loras=waiting_loras,
        max_loras=max_loras,
        scraped_at=now,
        stale=False,
    )
    return metrics, state
