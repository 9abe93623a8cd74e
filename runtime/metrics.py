"""The engine's Prometheus page under one set of names (pure).

The sidecar re-exposes what vLLM and SGLang report under ``matrixinfer_engine_*`` names, so the
gateway's scraper and the autoscaler read one dialect whatever the engine (``fleet.engine_metrics``
reads it as engine ``MatrixInfer``). Labels and values are kept as the engine gives them. For
each name the first engine metric present wins (a fallback covers older engine versions):

| MatrixInfer name | type | vLLM | SGLang |
|---|---|---|---|
| ``matrixinfer_engine_requests_waiting`` | gauge | ``vllm:num_requests_waiting`` | ``sglang:num_queue_reqs`` |
| ``matrixinfer_engine_requests_running`` | gauge | ``vllm:num_requests_running`` | ``sglang:num_running_reqs`` |
| ``matrixinfer_engine_kv_cache_usage_ratio`` | gauge | ``vllm:kv_cache_usage_perc``, else ``vllm:gpu_cache_usage_perc`` | ``sglang:token_usage`` |
| ``matrixinfer_engine_time_to_first_token_seconds`` | histogram | ``vllm:time_to_first_token_seconds`` | ``sglang:time_to_first_token_seconds`` |
| ``matrixinfer_engine_inter_token_latency_seconds`` | histogram | ``vllm:inter_token_latency_seconds``, else ``vllm:time_per_output_token_seconds`` | ``sglang:inter_token_latency_seconds``, else ``sglang:time_per_output_token_seconds`` |
| ``matrixinfer_engine_e2e_request_latency_seconds`` | histogram | ``vllm:e2e_request_latency_seconds`` | ``sglang:e2e_request_latency_seconds`` |
| ``matrixinfer_engine_prompt_tokens_total`` | counter | ``vllm:prompt_tokens_total`` | ``sglang:prompt_tokens_total`` |
| ``matrixinfer_engine_generation_tokens_total`` | counter | ``vllm:generation_tokens_total`` | ``sglang:generation_tokens_total`` |
| ``matrixinfer_engine_lora_requests_info`` | gauge | ``vllm:lora_requests_info`` | (not reported) |
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["ENGINE_KINDS", "UNIFIED", "UnifiedName", "unify"]

ENGINE_KINDS = ("vllm", "sglang")


@dataclass(frozen=True, slots=True)
class UnifiedName:
    """One MatrixInfer metric and the engine metric families it comes from (first present wins;
    family names as the Prometheus parser gives them: counters without ``_total``)."""

    name: str
    type: str
    help: str
    vllm: tuple[str, ...]
    sglang: tuple[str, ...]


UNIFIED: tuple[UnifiedName, ...] = (
    UnifiedName("matrixinfer_engine_requests_waiting", "gauge", "Requests waiting to be scheduled.",
                ("vllm:num_requests_waiting",), ("sglang:num_queue_reqs",)),
    UnifiedName("matrixinfer_engine_requests_running", "gauge", "Requests in the running batch.",
                ("vllm:num_requests_running",), ("sglang:num_running_reqs",)),
    UnifiedName("matrixinfer_engine_kv_cache_usage_ratio", "gauge",
                "Share of the KV cache in use (0-1).",
                ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), ("sglang:token_usage",)),
    UnifiedName("matrixinfer_engine_time_to_first_token_seconds", "histogram",
                "Time to the first output token.",
                ("vllm:time_to_first_token_seconds",), ("sglang:time_to_first_token_seconds",)),
    UnifiedName("matrixinfer_engine_inter_token_latency_seconds", "histogram",
                "Time between output tokens.",
                ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
                ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds")),
    UnifiedName("matrixinfer_engine_e2e_request_latency_seconds", "histogram",
                "Request latency from arrival to the last token.",
                ("vllm:e2e_request_latency_seconds",), ("sglang:e2e_request_latency_seconds",)),
    UnifiedName("matrixinfer_engine_prompt_tokens", "counter", "Prompt tokens processed.",
                ("vllm:prompt_tokens",), ("sglang:prompt_tokens",)),
    UnifiedName("matrixinfer_engine_generation_tokens", "counter", "Output tokens generated.",
                ("vllm:generation_tokens",), ("sglang:generation_tokens",)),
    UnifiedName("matrixinfer_engine_lora_requests_info", "gauge",
                "Running and waiting LoRA adapters (labels); the value is when they changed.",
                ("vllm:lora_requests_info",), ()),
)  # fmt: skip
"""The mapping; ``docs/artefacts.md`` shows it as a table."""


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def unify(text: str, engine: str) -> bytes:
    """Rename the engine's page (``engine``: ``vllm`` or ``sglang``) into the MatrixInfer names;
    families without a mapping are dropped. ValueError for an unknown engine or a bad page."""
    if engine not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINE_KINDS)})")
    by_name = {f.name: f for f in text_string_to_metric_families(text)}
    out: list[Metric] = []
    for u in UNIFIED:
        sources = u.vllm if engine == "vllm" else u.sglang
        src = next((by_name[n] for n in sources if n in by_name), None)
        if src is None:
            continue
        m = Metric(u.name, u.help, u.type)
        for s in src.samples:
            if not s.name.startswith(src.name):
                continue
            m.add_sample(u.name + s.name[len(src.name) :], s.labels, s.value, s.timestamp)
        out.append(m)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(out))
    return generate_latest(registry)
