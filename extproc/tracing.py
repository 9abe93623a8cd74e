"""OpenTelemetry spans of the request pipeline (docs/gateway.md "Tracing").

Off by default: then no request carries a :class:`RequestTrace` (``RequestState.trace`` is None),
each stage costs the gateway one ``is not None`` test, and the OpenTelemetry SDK is never
imported.

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
model, ModelRoute, ModelServer and pod; a stage that refused the request ends with status ERROR
and the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
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


def span_name(stage: str) -> str:
    return f"matrixinfer.{stage}"


class TracingError(ValueError):
    """Tracing cannot start as configured (names the variable and value)."""


class Tracing:
    """The tracer of the extproc's pipeline and the propagator that reads parents."""

    __slots__ = ("_extract", "_span_of", "follows_parent", "provider", "tracer")

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        from opentelemetry import propagate
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
        from opentelemetry.trace import get_current_span

        self.tracer = tracer
        self.provider = provider
        self._extract = propagate.extract  # honours OTEL_PROPAGATORS (default: tracecontext)
        self._span_of = get_current_span
        # the parent-based samplers OTEL_TRACES_SAMPLER names (parentbased_*, the default) drop a
        # request whose remote parent is not sampled: such a request gets no RequestTrace at all
        # (its spans would record nothing, at ~55 us a request)
        sampler = getattr(provider, "sampler", None)
        self.follows_parent = (
            isinstance(sampler, ParentBased)
            and getattr(sampler, "_remote_parent_not_sampled", None) is ALWAYS_OFF
        )

    def request(self, state: Any, metadata: Iterable[tuple[str, Any]]) -> RequestTrace | None:
        """The trace of one request (``state``: its ``extproc.gateway.RequestState``): its parent
        from the ext_proc stream's gRPC ``metadata`` (Envoy's span), else from the request
        headers (the client's). None when the parent is not sampled and the sampler follows it."""
        carrier = {k: v for k, v in metadata if k in TRACE_HEADERS and isinstance(v, str)}
        if "traceparent" not in carrier:
            headers: Mapping[str, str] = state.headers
            carrier = {k: headers[k] for k in TRACE_HEADERS if k in headers}
        if self.follows_parent:  # W3C "00-<trace>-<span>-<flags>": bit 0 of flags is "sampled"
            traceparent = carrier.get("traceparent", "")
            if len(traceparent) == 55 and traceparent[-1] in "02468aceACE":
                return None  # (cheaper than the propagator; a malformed one goes on to it)
        parent = self._extract(carrier)
        if self.follows_parent:
            context = self._span_of(parent).get_span_context()
            if context.is_valid and not context.trace_flags.sampled:
                return None
        return RequestTrace(self.tracer, parent, state)

    def shutdown(self) -> None:
        """Send the spans still batched and stop the exporter."""
        if self.provider is not None:
            self.provider.shutdown()


class RequestTrace:
    """One request's stage spans, children of its parent context, one open at a time:
    :meth:`enter` ends the open span and starts the next stage's, :meth:`close` ends the open one
    (with the exception that ended the stage, if one did)."""

    __slots__ = ("parent", "span", "state", "tracer")

    def __init__(self, tracer: Tracer, parent: Context, state: Any) -> None:
        self.tracer = tracer
        self.parent = parent
        self.state = state  # read when a span ends: request id, model, route, server, pod
        self.span: Span | None = None

    def enter(self, stage: str) -> None:
        self.close()
        self.span = self.tracer.start_span(span_name(stage), context=self.parent)

    def close(self, error: BaseException | None = None) -> None:
        span = self.span
        if span is None:
            return
        self.span = None
        state = self.state
        attributes = {"matrixinfer.request_id": state.request_id}  # one call: one lock, ~3x less
        for key, value in (
            ("matrixinfer.model", state.model),
            ("matrixinfer.model_route", state.route),
            ("matrixinfer.model_server", state.server),
            ("matrixinfer.pod", state.pod_name),
        ):
            if value:
                attributes[key] = value
        span.set_attributes(attributes)
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            reason = getattr(error, "message", None) or str(error) or type(error).__name__
            span.set_status(Status(StatusCode.ERROR, str(reason)))
            span.set_attribute("matrixinfer.error", type(error).__name__)
            status = getattr(error, "status", None)
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
