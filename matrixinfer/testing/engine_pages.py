"""Realistic engine /metrics pages for tests and benchmarks.

Rendered by prometheus_client itself (the library vLLM and SGLang use), with the engines' metric
names, label sets and histogram bucket boundaries (vLLM v1 ``vllm/v1/metrics/loggers.py`` and
SGLang's ``srt/metrics/collector.py`` as published), plus the process/python/http families a real
page carries, so size and shape are close to what a gateway scrapes: ~700 lines for vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
TTFT_BUCKETS += [7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
TPOT_BUCKETS += [7.5, 10.0, 20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0]
LATENCY_BUCKETS += [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
HTTP_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
HTTP_BUCKETS += [4.0, 4.5, 5.0, 7.5, 10.0, 30.0, 60.0]


@dataclass(slots=True)
class EngineState:
    """The values a page reports."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    tpot_sum: float = 0.0
    tpot_count: int = 0
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    max_lora: int | None = None
    lora_timestamp: float = 1_700_000_000.0
    legacy_names: bool = False  # vLLM v0 names: gpu_cache_usage_perc, time_per_output_token
    engines: int = 1  # data-parallel engines behind one port (one series each)


def _observe(h: Histogram, labels: dict[str, str], total: float, count: int) -> None:
    child = h.labels(**labels)  # engines create their labelled series at start-up
    if count <= 0:
        return
    mean = total / count
    for _ in range(count):
        child.observe(mean)


def _common(r: CollectorRegistry) -> None:
    """process_*, python_gc_* and http_* families as a FastAPI-served engine has them."""
    for name in ("virtual_memory_bytes", "resident_memory_bytes", "start_time_seconds"):
        Gauge(f"process_{name}", name.replace("_", " "), registry=r).set(1.2e9)
    Counter("process_cpu_seconds", "Total user and system CPU time", registry=r).inc(1234.5)
    Gauge("process_open_fds", "Number of open file descriptors", registry=r).set(72)
    Gauge("process_max_fds", "Maximum number of open file descriptors", registry=r).set(1048576)
    gc = Counter(
        "python_gc_objects_collected", "Objects collected during gc", ["generation"], registry=r
    )
    for g in ("0", "1", "2"):
        gc.labels(g).inc(1000)
    handlers = ["/v1/chat/completions", "/v1/completions", "/metrics", "/health"]
    reqs = Counter(
        "http_requests", "Total number of requests", ["method", "status", "handler"], registry=r
    )
    size = Histogram(
        "http_request_duration_seconds",
        "Latency with only few buckets by handler",
        ["method", "handler"],
        buckets=HTTP_BUCKETS,
        registry=r,
    )
    for h in handlers:
        reqs.labels("POST" if h.startswith("/v1") else "GET", "2xx", h).inc(100)
        size.labels("POST" if h.startswith("/v1") else "GET", h).observe(0.2)


def vllm_page(s: EngineState) -> str:
    """A vLLM v1 /metrics page reporting ``s``."""
    r = CollectorRegistry(auto_describe=True)
    _common(r)
    for e in range(s.engines):
        lab = {"model_name": MODEL, "engine": str(e)}
        _vllm_engine(r, s, lab, first=e == 0)
    return generate_latest(r).decode()


_VLLM_METRICS: dict[int, dict[str, object]] = {}


def _vllm_engine(r: CollectorRegistry, s: EngineState, lab: dict[str, str], first: bool) -> None:
    names = list(lab)
    m = _VLLM_METRICS.setdefault(id(r), {})
    if first:
        m["running"] = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            names,
            registry=r,
        )
        m["waiting"] = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            names,
            registry=r,
        )
        kv_name = "vllm:gpu_cache_usage_perc" if s.legacy_names else "vllm:kv_cache_usage_perc"
        m["kv"] = Gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.", names, registry=r)
        m["pq"] = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            names,
            registry=r,
        )
        m["ph"] = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            names,
            registry=r,
        )
        m["pre"] = Counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            names,
            registry=r,
        )
        m["prompt"] = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", names, registry=r
        )
        m["gen"] = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", names, registry=r
        )
        m["ok"] = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=r,
        )
        for key, name, doc, buckets in (
            (
                "ptok",
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                TOKEN_BUCKETS,
            ),
            (
                "gtok",
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                TOKEN_BUCKETS,
            ),
            (
                "itok",
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                TOKEN_BUCKETS,
            ),
            (
                "maxgen",
                "vllm:request_max_num_generation_tokens",
                "Max generation tokens.",
                TOKEN_BUCKETS,
            ),
            (
                "n",
                "vllm:request_params_n",
                "Histogram of the n request parameter.",
                [1, 2, 5, 10, 20],
            ),
            ("maxtok", "vllm:request_params_max_tokens", "Histogram of max_tokens.", TOKEN_BUCKETS),
            (
                "ttft",
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            ),
            (
                "itl",
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                TPOT_BUCKETS,
            ),
            (
                "tpot",
                "vllm:time_per_output_token_seconds",
                "Histogram of time per output token in seconds (deprecated).",
                TPOT_BUCKETS,
            ),
            (
                "e2e",
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                LATENCY_BUCKETS,
            ),
            (
                "queue",
                "vllm:request_queue_time_seconds",
                "Time spent in WAITING phase.",
                LATENCY_BUCKETS,
            ),
            (
                "inf",
                "vllm:request_inference_time_seconds",
                "Time spent in RUNNING phase.",
                LATENCY_BUCKETS,
            ),
            (
                "pf",
                "vllm:request_prefill_time_seconds",
                "Time spent in PREFILL phase.",
                LATENCY_BUCKETS,
            ),
            (
                "dec",
                "vllm:request_decode_time_seconds",
                "Time spent in DECODE phase.",
                LATENCY_BUCKETS,
            ),
        ):
            if s.legacy_names and key == "itl":
                continue
            m[key] = Histogram(name, doc, names, buckets=buckets, registry=r)
        if s.max_lora is not None:
            m["lora"] = Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=r,
            )
        m["cfg"] = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ["block_size", "enable_prefix_caching", "gpu_memory_utilization", "num_gpu_blocks"],
            registry=r,
        )
        m["cfg"].labels("16", "True", "0.9", "27000").set(1)  # type: ignore[attr-defined]
    g = m
    g["running"].labels(**lab).set(s.running / s.engines)  # type: ignore[attr-defined]
    g["waiting"].labels(**lab).set(s.waiting / s.engines)  # type: ignore[attr-defined]
    g["kv"].labels(**lab).set(s.kv_usage)  # type: ignore[attr-defined]
    for key in ("pq", "ph", "pre", "prompt", "gen"):
        g[key].labels(**lab).inc(1000)  # type: ignore[attr-defined]
    for reason in ("stop", "length", "abort"):
        g["ok"].labels(**lab, finished_reason=reason).inc(10)  # type: ignore[attr-defined]
    per = s.engines
    _observe(g["ttft"], lab, s.ttft_sum / per, s.ttft_count // per)  # type: ignore[arg-type]
    tpot_key = "tpot" if s.legacy_names else "itl"
    _observe(g[tpot_key], lab, s.tpot_sum / per, s.tpot_count // per)  # type: ignore[arg-type]
    if not s.legacy_names:
        _observe(g["tpot"], lab, s.tpot_sum / per, s.tpot_count // per)  # type: ignore[arg-type]
    for key in (
        "ptok",
        "gtok",
        "itok",
        "maxgen",
        "n",
        "maxtok",
        "e2e",
        "queue",
        "inf",
        "pf",
        "dec",
    ):
        g[key].labels(**lab).observe(3.0)  # type: ignore[attr-defined]
    if first and s.max_lora is not None:
        # older reads first, then the current one with the latest timestamp
        g["lora"].labels(str(s.max_lora), "", "stale-adapter").set(s.lora_timestamp - 5)  # type: ignore[attr-defined]
        g["lora"].labels(  # type: ignore[attr-defined]
            str(s.max_lora), ",".join(s.waiting_loras), ",".join(s.running_loras)
        ).set(s.lora_timestamp)


def sglang_page(s: EngineState) -> str:
    """An SGLang /metrics page reporting ``s``."""
    r = CollectorRegistry(auto_describe=True)
    _common(r)
    names = ["model_name", "tp_rank", "pp_rank", "dp_rank"]
    lab = {"model_name": MODEL, "tp_rank": "0", "pp_rank": "0", "dp_rank": "0"}
    Counter(
        "sglang:prompt_tokens", "Number of prefill tokens processed.", names, registry=r
    ).labels(**lab).inc(8128902)
    Counter(
        "sglang:generation_tokens", "Number of generation tokens processed.", names, registry=r
    ).labels(**lab).inc(7557572)
    Gauge("sglang:num_running_reqs", "The number of running requests.", names, registry=r).labels(
        **lab
    ).set(s.running)
    Gauge("sglang:num_used_tokens", "The number of used tokens.", names, registry=r).labels(
        **lab
    ).set(123)
    Gauge("sglang:token_usage", "The token usage.", names, registry=r).labels(**lab).set(s.kv_usage)
    Gauge(
        "sglang:gen_throughput", "The generation throughput (token/s).", names, registry=r
    ).labels(**lab).set(86.5)
    Gauge(
        "sglang:num_queue_reqs", "The number of requests in the waiting queue.", names, registry=r
    ).labels(**lab).set(s.waiting)
    Gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", names, registry=r).labels(
        **lab
    ).set(0.0075)
    ttft = Histogram(
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        names,
        buckets=[0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400],
        registry=r,
    )
    itl = Histogram(
        "sglang:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        names,
        buckets=[
            0.002,
            0.004,
            0.006,
            0.008,
            0.010,
            0.015,
            0.020,
            0.025,
            0.030,
            0.035,
            0.040,
            0.060,
        ],
        registry=r,
    )
    e2e = Histogram(
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        names,
        buckets=[0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 800],
        registry=r,
    )
    _observe(ttft, lab, s.ttft_sum, s.ttft_count)
    _observe(itl, lab, s.tpot_sum, s.tpot_count)
    e2e.labels(**lab).observe(3.0)
    return generate_latest(r).decode()
