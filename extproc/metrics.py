"""The gateway's own Prometheus metrics, in their own registry (one registry per component)."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GatewayMetrics", "RequestHistogram"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
_RATE_BUCKETS = (1.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
_SCHEDULING_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1)


class RequestHistogram(Histogram):
    """prometheus_client's Histogram with a cheaper ``observe`` for the request path (three
    observations per request): the bucket is found by bisection instead of a loop over the
    bounds, and an observable child is not checked again. The samples are the stock class's
    (``test_request_histogram_exposes_what_the_stock_histogram_does``); exemplars, NaN and a
    labelled parent take the stock path."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or amount != amount or (self._labelnames and not self._labelvalues):
            super().observe(amount, exemplar)
            return
        self._sum.inc(amount)
        # the first bound >= amount, as the stock loop's ``amount <= bound`` (the last is +Inf)
        self._buckets[bisect_left(self._upper_bounds, amount)].inc(1)


class LabelCache:
    """Caches labelled metric children: on the request path the ``labels()`` lookup costs more
    than the update itself."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (the lookup costs more than the update)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class GatewayMetrics(LabelCache):
    """All ``matrixinfer_gateway_*`` series; the scraper registers its own in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "matrixinfer_gateway_requests",
            "Requests by model, ModelRoute, ModelServer and the HTTP status the client got "
            "(code 0: no status, the client went away first). The gateway's own answers count "
            "when it makes them; the others when Envoy's access log reports them.",
            ["model", "route", "server", "code"],
            registry=r,
        )
        self.first_byte = Histogram(
            "matrixinfer_gateway_time_to_first_byte_seconds",
            "Seconds from a routed request reaching Envoy to the first byte of the pod's answer "
            "leaving Envoy, by model (for a stream: its response headers, which engines send "
            "before the first token).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "matrixinfer_gateway_time_to_first_token_seconds",
            "Seconds from a streamed request reaching Envoy to its first token passing Envoy "
            "(the first SSE event; a /v1/responses stream's first delta event), by model. "
            "Streamed requests only: a non-streamed answer's first token is not observable.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "matrixinfer_gateway_inter_token_latency_seconds",
            "Seconds per output token after the first of each streamed request: (its last "
            "byte - its first token) / (completion tokens - 1), by model; streams of at least "
            "two tokens that reported their usage.",
            ["model"],
            buckets=_INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            "matrixinfer_gateway_input_tokens",
            "Input (prompt) tokens of routed requests, by model, as the engine reported them "
            "(usage.prompt_tokens; usage.input_tokens of /v1/responses).",
            ["model"],
            registry=r,
        )
        self.output_tokens = Counter(
            "matrixinfer_gateway_output_tokens",
            "Output (completion) tokens of routed requests, by model, as the engine reported "
            "them (usage.completion_tokens; usage.output_tokens of /v1/responses).",
            ["model"],
            registry=r,
        )
        self.output_token_rate = Histogram(
            "matrixinfer_gateway_output_tokens_per_second",
            "Output tokens per second of each routed request that reported its usage: its "
            "completion tokens over its whole duration (prefill included), by model.",
            ["model"],
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.request_duration = RequestHistogram(
            "matrixinfer_gateway_request_duration_seconds",
            "Seconds from the request headers reaching the gateway to the end of the request "
            "(the ext_proc stream's lifetime), by model and ModelServer.",
            ["model", "server"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decision_duration = RequestHistogram(
            "matrixinfer_gateway_decision_duration_seconds",
            "Time the gateway spent deciding a request once its body arrived "
            "(parse, route, schedule).",
            buckets=_SCHEDULING_BUCKETS,
            registry=r,
        )
        self.scheduling_duration = RequestHistogram(
            "matrixinfer_gateway_scheduling_duration_seconds",
            "Time spent in the scheduler (filters and scorers) for one request, by ModelServer.",
            ["server"],
            buckets=_SCHEDULING_BUCKETS,
            registry=r,
        )
        self.pod_picks = Counter(
            "matrixinfer_gateway_pod_picks",
            "Requests sent to each pod as the primary endpoint, by ModelServer and pod.",
            ["server", "pod"],
            registry=r,
        )
        self.in_flight = Gauge(
            "matrixinfer_gateway_in_flight_requests",
            "Requests the gateway has routed that have not finished yet.",
            registry=r,
        )
        # the gateway counts them in a plain int (two gauge updates per request cost ~1 µs);
        # the gauge reads it when collected
        self.in_flight_requests = 0
        self.in_flight.set_function(lambda: self.in_flight_requests)
        self.datastore_objects = Gauge(
            "matrixinfer_gateway_datastore_objects",
            "Objects in the gateway's datastore, by kind (ModelRoute, ModelServer, Pod).",
            ["kind"],
            registry=r,
        )
        self.room_waits = Counter(
            "matrixinfer_gateway_room_waits",
            "Requests that waited for room on a ModelServer's saturated pods without a fair "
            "queue, by ModelServer (namespace, server) and how the wait ended (outcome: served "
            "| timed_out, answered 503 | left, the client went away | failed, a scheduling "
            "failure other than saturation or no ready pod, answered 503).",
            ["namespace", "server", "outcome"],
            registry=r,
        )
        self.config_reloads = Counter(
            "matrixinfer_gateway_config_reloads",
            "Configuration loads, by result (applied | rejected).",
            ["result"],
            registry=r,
        )
