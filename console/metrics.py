"""A deployment's serving figures (pure): requests by status, time to first token (the gateway's,
of streamed requests) and output tokens per second — from the gateway's Prometheus text
(:func:`model_metrics`) or from a Prometheus server's instant queries over every gateway
replica it scrapes (:func:`prometheus_queries`, :func:`metrics_from_prometheus`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from console.base import ApiType

__all__ = [
    "ModelMetrics",
    "PrometheusAnswerError",
    "metrics_from_prometheus",
    "model_metrics",
    "prometheus_queries",
    "query_value",
]

REQUESTS = "matrixinfer_gateway_requests_total"
OUTPUT_TOKENS = "matrixinfer_gateway_output_tokens_total"
TTFT = "matrixinfer_gateway_time_to_first_token_seconds"
TOKENS_PER_SECOND = "matrixinfer_gateway_output_tokens_per_second"


class ModelMetrics(ApiType):
    model: str
    requests: float
    errors: float
    ttft_seconds_mean: float | None
    output_tokens: float
    output_tokens_per_second_mean: float | None


def model_metrics(text: str, model: str) -> ModelMetrics:
    """The figures of requests whose ``model`` label is ``model`` (or one of its adapters
    named ``model``)."""
    sums: dict[str, float] = {}
    requests = errors = tokens = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == REQUESTS:
                requests += s.value
                code = s.labels.get("code", "0")
                if not code.isdigit() or int(code) >= 400 or code == "0":
                    errors += s.value
            elif s.name == OUTPUT_TOKENS:
                tokens += s.value
            elif s.name.endswith(("_sum", "_count")):
                sums[s.name] = sums.get(s.name, 0.0) + s.value

    def mean(base: str) -> float | None:
        count = sums.get(f"{base}_count", 0.0)
        return sums.get(f"{base}_sum", 0.0) / count if count else None

    return ModelMetrics(
        model=model,
        requests=requests,
        errors=errors,
        ttft_seconds_mean=mean(TTFT),
        output_tokens=tokens,
        output_tokens_per_second_mean=mean(TOKENS_PER_SECOND),
    )


class PrometheusAnswerError(ValueError):
    """A Prometheus answer that is not a successful instant query: what was wrong with it."""


def prometheus_queries(model: str) -> dict[str, str]:
    """The PromQL instant query of each :class:`ModelMetrics` figure of ``model``, summed over
    every gateway replica Prometheus scrapes (the same figures :func:`model_metrics` reads from
    one gateway's text; an error is a code that is not 1xx-3xx, as there)."""
    m = model.replace("\\", "\\\\").replace('"', '\\"')
    sel = f'{{model="{m}"}}'

    def mean(base: str) -> str:
        return f"sum({base}_sum{sel}) / sum({base}_count{sel})"

    return {
        "requests": f"sum({REQUESTS}{sel})",
        "errors": f'sum({REQUESTS}{{model="{m}",code!~"[1-3][0-9][0-9]"}})',
        "ttft_seconds_mean": mean(TTFT),
        "output_tokens": f"sum({OUTPUT_TOKENS}{sel})",
        "output_tokens_per_second_mean": mean(TOKENS_PER_SECOND),
    }


def query_value(answer: Any) -> float | None:
    """The value of an instant query's answer (``/api/v1/query``'s JSON): the scalar, or the
    single sample of a vector; None for an empty vector or NaN (a mean of nothing)."""
    if not isinstance(answer, Mapping) or answer.get("status") != "success":
        error = answer.get("error") if isinstance(answer, Mapping) else None
        raise PrometheusAnswerError(f"the query failed: {error or repr(answer)[:200]}")
    data = answer.get("data")
    if not isinstance(data, Mapping):
        raise PrometheusAnswerError("the answer has no data")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        pair = result
    elif kind == "vector" and isinstance(result, list):
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusAnswerError(f"a vector of {len(result)} samples, expected one")
        pair = result[0].get("value") if isinstance(result[0], Mapping) else None
    else:
        raise PrometheusAnswerError(f"resultType {kind!r}, expected vector or scalar")
    try:
        value = float(pair[1])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        raise PrometheusAnswerError(f"not a [time, value] sample: {pair!r:.100}") from None
    return None if math.isnan(value) else value


def metrics_from_prometheus(model: str, values: Mapping[str, float | None]) -> ModelMetrics:
    """The figures from the values of :func:`prometheus_queries` (a counter with no sample
    yet is 0, a mean of no request None)."""
    return ModelMetrics(
        model=model,
        requests=values.get("requests") or 0.0,
        errors=values.get("errors") or 0.0,
        ttft_seconds_mean=values.get("ttft_seconds_mean"),
        output_tokens=values.get("output_tokens") or 0.0,
        output_tokens_per_second_mean=values.get("output_tokens_per_second_mean"),
    )
