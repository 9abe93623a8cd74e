"""A deployment's serving figures from the gateway's Prometheus text (pure): requests by status,
time to first token (the gateway's, of streamed requests) and output tokens per second."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from console.base import ApiType

__all__ = ["ModelMetrics", "model_metrics"]


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
            if s.name == "matrixinfer_gateway_requests_total":
                requests += s.value
                code = s.labels.get("code", "0")
                if not code.isdigit() or int(code) >= 400 or code == "0":
                    errors += s.value
            elif s.name == "matrixinfer_gateway_output_tokens_total":
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
        ttft_seconds_mean=mean("matrixinfer_gateway_time_to_first_token_seconds"),
        output_tokens=tokens,
        output_tokens_per_second_mean=mean("matrixinfer_gateway_output_tokens_per_second"),
    )
