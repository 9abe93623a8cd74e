"""Prometheus exposition of the engine's statistics under vLLM's or SGLang's metric names.

A custom collector reads the engine at scrape time (no per-token metric calls on the hot path)
and is registered in the server's own CollectorRegistry. Names, types, labels and bucket
boundaries follow what the real engines expose: vLLM counters appear as ``vllm:<name>_total``
(as prometheus_client renders vLLM's counters), histograms with vLLM's boundaries, label
``model_name`` plus ``engine="0"``; SGLang metrics carry only ``model_name``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sim.engine import FINISH_REASONS, Engine, Histogram

__all__ = ["SglangCollector", "VllmCollector", "make_registry", "render"]


@dataclass(slots=True)
class LoraView:
    """What the LoRA info gauge needs from the server."""

    max_loras: int
    last_change: float = 0.0


def _hist(
    name: str, doc: str, h: Histogram, labels: list[str], values: list[str]
) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    acc = 0
    buckets: list[tuple[str, float]] = []
    for bound, c in zip(h.bounds, h.counts, strict=False):
        acc += c
        buckets.append((_fmt_bound(bound), float(acc)))
    buckets.append(("+Inf", float(h.count)))
    fam.add_metric(values, buckets, h.sum)
    return fam


def _fmt_bound(v: float) -> str:
    return repr(float(v))


class VllmCollector(Collector):
    """vLLM's metric names (v1 engine, with the deprecated aliases still exported)."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        lora: LoraView,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.model = model_name
        self.lora = lora
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        s = e.stats
        ln = ["model_name", "engine"]
        lv = [self.model, "0"]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=ln)
            g.add_metric(lv, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=ln)
            c.add_metric(lv, v)
            return c

        usage = e.kv_usage()
        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.",
            len(e.running),
        )  # fmt: skip
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
            e.num_waiting,
        )  # fmt: skip
        yield gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage."
            "DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
            usage,
        )
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield counter(
            "vllm:gpu_prefix_cache_queries",
            "GPU prefix cache queries, in terms of number of queried tokens."
            "DEPRECATED: Use vllm:prefix_cache_queries instead.",
            s.prefix_queries,
        )
        yield counter(
            "vllm:gpu_prefix_cache_hits",
            "GPU prefix cache hits, in terms of number of cached tokens."
            "DEPRECATED: Use vllm:prefix_cache_hits instead.",
            s.prefix_hits,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.prefix_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.prefix_hits,
        )
        yield counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
            s.preemptions,
        )  # fmt: skip
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield counter(
            "vllm:generation_tokens", "Number of generation tokens processed.",
            s.generation_tokens,
        )  # fmt: skip
        ok = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*ln, "finished_reason"],
        )
        for reason in FINISH_REASONS:
            ok.add_metric([*lv, reason], s.success[reason])
        yield ok
        yield _hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", s.prompt_len,
            ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", s.gen_len,
            ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            s.ttft, ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            s.itl, ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds."
            "DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
            s.itl, ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            s.e2e, ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            s.queue, ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            s.inference_time, ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            s.prefill_time, ln, lv,
        )  # fmt: skip
        yield _hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            s.decode_time, ln, lv,
        )  # fmt: skip
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        info.add_metric(
            [str(self.lora.max_loras), ",".join(e.waiting_loras()), ",".join(e.running_loras())],
            self.clock(),
        )
        yield info
        cfg = e.cfg
        cache = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "cache_dtype", "enable_prefix_caching", "engine",
                    "num_gpu_blocks"],
        )  # fmt: skip
        cache.add_metric(
            [str(cfg.block_size), "auto", str(cfg.enable_prefix_caching), "0",
             str(cfg.num_gpu_blocks)],
            1.0,
        )  # fmt: skip
        yield cache


class SglangCollector(Collector):
    """SGLang's metric names (scheduler and tokenizer-manager collectors)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model = model_name
        self.labels = ["model_name"]

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        s = e.stats
        ln, lv = self.labels, [self.model]

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=ln)
            g.add_metric(lv, v)
            return g

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=ln)
            c.add_metric(lv, v)
            return c

        pool = e.kv.pool
        total_tokens = pool.num_blocks * e.cfg.block_size
        used_tokens = (pool.num_blocks - pool.num_free) * e.cfg.block_size
        yield gauge("sglang:num_running_reqs", "The number of running requests.", len(e.running))
        yield gauge(
            "sglang:num_queue_reqs", "The number of requests in the waiting queue.", e.num_waiting
        )
        yield gauge("sglang:num_used_tokens", "The number of used tokens.", used_tokens)
        yield gauge("sglang:token_usage", "The token usage.", used_tokens / total_tokens)
        yield gauge(
            "sglang:max_total_num_tokens",
            "Maximum total number of tokens in the KV cache pool.",
            total_tokens,
        )
        yield gauge(
            "sglang:cache_hit_rate",
            "The prefix cache hit rate.",
            s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
        )
        yield counter(
            "sglang:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens
        )
        yield counter(
            "sglang:generation_tokens", "Number of generation tokens processed.",
            s.generation_tokens,
        )  # fmt: skip
        yield counter("sglang:cached_tokens", "Number of cached prompt tokens.", s.prefix_hits)
        yield counter("sglang:num_requests", "Number of requests processed.", s.requests_total)
        yield counter(
            "sglang:num_retracted_requests", "Number of retracted requests.", s.preemptions
        )
        yield _hist(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            s.ttft, ln, lv,
        )  # fmt: skip
        yield _hist(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            s.itl, ln, lv,
        )  # fmt: skip
        yield _hist(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            s.e2e, ln, lv,
        )  # fmt: skip


def make_registry(collector: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
