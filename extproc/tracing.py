"""OpenTelemetry spans of the request pipeline (docs/operations.md "Tracing").

Off by default: then no request carries a :class:`RequestTrace` (``RequestState.trace`` is None),
the gateway's stages enter one shared no-op context, and the OpenTelemetry SDK is never imported.

On (``matrixinfer-extproc --tracing``), :func:`setup` builds the SDK's tracer provider from the
standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and its argument, ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``) with an OTLP/gRPC
exporter behind a batch processor.

Each request's parent is the W3C trace context Envoy's OpenTelemetry tracer puts in the ext_proc
stream's gRPC metadata: the context of Envoy's span for that stream, a child of its span for the
request. Without one (Envoy not tracing), it is a ``traceparent`` the client sent in the request
headers. Each stage (authenticate, parse, route, admit, wake, queue, schedule) is one span, a
child of that parent, named ``matrixinfer.<stage>``, carrying the request id and, once known, the
model, ModelRoute, ModelServer and pod; a stage that refused the request (or handed it on: every
pod saturated, to the queue) ends with status ERROR and the reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "NO_SPAN",
    "STAGES",
    "TRACE_HEADERS",
    "RequestTrace",
    "Tracing",
    "TracingError",
    "setup",
    "span_name",
]

# the W3C trace-context carriers (gRPC metadata of the ext_proc stream, or request headers)
TRACE_HEADERS = ("traceparent", "tracestate")
STAGES = ("authenticate", "parse", "route", "admit", "wake", "queue", "schedule")
DEFAULT_SERVICE_NAME = "matrixinfer-extproc"
NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def span_name(stage: str) -> str:
    return f"matrixinfer.{stage}"


class TracingError(ValueError):
    """Tracing cannot start as configured (names the variable and value)."""


class Tracing:
    """The tracer of the extproc's pipeline and the propagator that reads parents."""

    __slots__ = ("_extract", "provider", "tracer")

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        from opentelemetry import propagate

        self.tracer = tracer
        self.provider = provider
        self._extract = propagate.extract  # honours OTEL_PROPAGATORS (default: tracecontext)

    def request(
        self, request_id: str, metadata: Iterable[tuple[str, Any]], headers: Mapping[str, str]
    ) -> RequestTrace:
        """The trace of one request: its parent from the ext_proc stream's gRPC ``metadata``
        (Envoy's span), else from the request ``headers`` (the client's)."""
        carrier = {k: v for k, v in metadata if k in TRACE_HEADERS and isinstance(v, str)}
        if "traceparent" not in carrier:
            carrier = {k: headers[k] for k in TRACE_HEADERS if k in headers}
        return RequestTrace(self.tracer, self._extract(carrier), request_id)

    def shutdown(self) -> None:
        """Send the spans still batched and stop the exporter."""
        if self.provider is not None:
            self.provider.shutdown()


class RequestTrace:
    """One request's stage spans, children of its parent context."""

    __slots__ = ("parent", "request_id", "tracer")

    def __init__(self, tracer: Tracer, parent: Context, request_id: str) -> None:
        self.tracer = tracer
        self.parent = parent
        self.request_id = request_id

    def stage(self, stage: str, labels: Any) -> StageSpan:
        """A span for ``stage`` (a context manager); ``labels`` (the request's state: model,
        route, server, pod_name) is read when the stage ends."""
        return StageSpan(self, stage, labels)


class StageSpan:
    __slots__ = ("_labels", "_span", "_stage", "_trace")

    def __init__(self, trace: RequestTrace, stage: str, labels: Any) -> None:
        self._trace = trace
        self._stage = stage
        self._labels = labels
        self._span: Span | None = None

    def __enter__(self) -> None:
        trace = self._trace
        self._span = trace.tracer.start_span(
            span_name(self._stage),
            context=trace.parent,
            attributes={"matrixinfer.request_id": trace.request_id},
        )

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if span is None:
            return
        labels = self._labels
        for key, value in (
            ("matrixinfer.model", labels.model),
            ("matrixinfer.model_route", labels.route),
            ("matrixinfer.model_server", labels.server),
            ("matrixinfer.pod", labels.pod_name),
        ):
            if value:
                span.set_attribute(key, value)
        if exc is not None:
            from opentelemetry.trace import Status, StatusCode

            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            span.set_status(Status(StatusCode.ERROR, str(reason)))
            span.set_attribute("matrixinfer.error", type(exc).__name__)
            status = getattr(exc, "status", None)
            if isinstance(status, int):
                span.set_attribute("http.response.status_code", status)
        span.end()


def setup() -> Tracing:
    """The SDK's tracer provider from the ``OTEL_*`` variables, exporting OTLP over gRPC."""
    env = os.environ
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol != "grpc":
        raise TracingError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: the extproc exports OTLP over gRPC only "
            "(set it to grpc, or leave it unset)"
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))  # + OTEL_SERVICE_NAME etc.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider.get_tracer("matrixinfer.extproc"), provider)
