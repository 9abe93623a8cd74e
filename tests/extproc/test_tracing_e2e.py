"""OpenTelemetry tracing end to end (docs/gateway.md "Tracing"): one request through real
Envoy with its OpenTelemetry tracer on, the extproc with ``--tracing``, and a simulator behind a
recording proxy (what the engine saw). An OTLP/gRPC receiver started here (the
``opentelemetry-proto`` TraceService) collects the spans of both processes.

Checked: Envoy's spans and the extproc's share the trace id of the client's ``traceparent``;
Envoy's request span is a child of the client's span; every extproc stage span is a child of an
Envoy span (the one of its ext_proc stream, whose context reaches the extproc in the stream's
gRPC metadata); the engine got a ``traceparent`` of the same trace whose parent is an Envoy span
(the attempt at the pod)."""

from __future__ import annotations

import http.server
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from openai import OpenAI
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from matrixinfer.process import free_port, wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from sim.fleet import Fleet
from tests.conftest import E2E_MESSAGE_TIMEOUT_MS

pytestmark = pytest.mark.timeout(120)

CONFIG = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: traced}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: traced}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: traced}
spec:
  modelName: traced-model
  rules: [{targets: [{modelServerName: traced}]}]
"""
EXTPROC_STAGES = {"authenticate", "parse", "route", "admit", "schedule"}


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


@dataclass(slots=True)
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {
                        a.key: a.value.string_value or a.value.int_value for a in span.attributes
                    }
                    got.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            attributes,
                        )
                    )
        with self.lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def start_receiver(port: int) -> tuple[grpc.Server, Receiver]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise OSError(f"the OTLP receiver cannot listen on 127.0.0.1:{port}")
    server.start()
    return server, servicer


class _Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.target = target
        self.seen: list[dict[str, str]] = []  # headers of every inference request


class _Forward(http.server.BaseHTTPRequestHandler):
    """Forwards to the simulator and keeps the headers of what it forwards (the engine's view)."""

    server: _Recorder
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        if self.command == "POST":
            self.server.seen.append({k.lower(): v for k, v in self.headers.items()})
        request = urllib.request.Request(
            self.server.target + self.path,
            data=body,
            method=self.command,
            headers={"content-type": self.headers.get("content-type", "application/json")},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                status, data, ctype = resp.status, resp.read(), resp.headers["content-type"]
        except urllib.error.HTTPError as exc:
            status, data, ctype = exc.code, exc.read(), exc.headers["content-type"]
        self.send_response(status)
        self.send_header("content-type", ctype or "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def engine(fleet: Fleet) -> Iterator[_Recorder]:
    recorder = _Recorder(fleet.pods[0].url)
    thread = threading.Thread(target=recorder.serve_forever, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        recorder.shutdown()
        recorder.server_close()


@pytest.fixture(scope="module", params=["grpc", "h2"])
def traced(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, engine: _Recorder
) -> Iterator[tuple[GatewayStack, Receiver]]:
    """The stack with tracing on (each ext_proc transport), then the OTLP receiver (a gRPC
    server in this process: started after the stack's children are forked, as gRPC's threads do
    not survive a fork)."""
    config = tmp_path_factory.mktemp("tracing-config")
    address = f"127.0.0.1:{engine.server_address[1]}"
    (config / "model.yaml").write_text(CONFIG)
    (config / "engine.yaml").write_text(
        "apiVersion: gateway.matrixinfer.ai/v1alpha1\nkind: Endpoints\n"
        "metadata: {name: engine}\nspec:\n"
        f"  endpoints: [{{name: engine-0, address: '{address}', labels: {{app: traced}}}}]\n"
    )
    collector = free_port()
    options = StackOptions(
        scrape_interval=0.1,
        config_poll=0.1,
        envoy_concurrency=1,
        message_timeout_ms=E2E_MESSAGE_TIMEOUT_MS,
        tracing_collector=f"127.0.0.1:{collector}",
        transport=request.param,
    )
    run_dir = tmp_path_factory.mktemp("tracing-run")
    with pytest.MonkeyPatch.context() as env:  # the extproc sends its spans within 100 ms
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        stack = GatewayStack(config, run_dir, options).start()
    server: grpc.Server | None = None
    try:
        server, receiver = start_receiver(collector)
        wait_until(
            lambda: stack.extproc_ready() and address in stack.envoy_hosts(),
            60,
            "gateway config applied and the engine known to Envoy",
        )
        yield stack, receiver
    finally:
        stack.stop()
        if server is not None:
            server.stop(0)


def _by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def test_one_trace_across_envoy_extproc_and_engine(
    traced: tuple[GatewayStack, Receiver], engine: _Recorder
) -> None:
    traced_stack, spans_of = traced
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    client = OpenAI(base_url=traced_stack.url, api_key="unused", max_retries=0, timeout=20)
    answer = client.chat.completions.create(
        model="traced-model",
        messages=[{"role": "user", "content": "follow me"}],
        max_tokens=3,
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    assert answer.choices

    def complete() -> bool:
        spans = spans_of.of_trace(trace_id)
        extproc = {s.name for s in spans if s.service == "matrixinfer-extproc"}
        envoy = [s for s in spans if s.service == "matrixinfer-gateway"]
        return {f"matrixinfer.{x}" for x in EXTPROC_STAGES} <= extproc and len(envoy) >= 3

    wait_until(complete, 30, f"Envoy's and the extproc's spans of trace {trace_id}")
    spans = spans_of.of_trace(trace_id)
    by_id = _by_id(spans)
    envoy = {s.span_id: s for s in spans if s.service == "matrixinfer-gateway"}
    # Envoy's request span continues the client's trace
    roots = [s for s in envoy.values() if s.parent_span_id == client_span]
    assert len(roots) == 1, [(s.name, s.parent_span_id) for s in envoy.values()]
    root = roots[0]
    # each extproc stage is a child of one Envoy span (its ext_proc stream), itself under the root
    stages = [s for s in spans if s.service == "matrixinfer-extproc"]
    parents = {s.parent_span_id for s in stages}
    assert len(parents) == 1, [(s.name, s.parent_span_id) for s in stages]
    (parent,) = parents
    assert parent in envoy, f"the extproc's parent {parent} is not an Envoy span: {spans}"
    assert by_id[parent].parent_span_id == root.span_id
    schedule = next(s for s in stages if s.name == "matrixinfer.schedule")
    assert schedule.attributes["matrixinfer.model_server"] == "traced"
    assert schedule.attributes["matrixinfer.pod"] == "engine-0"
    # the engine saw the same trace, its parent an Envoy span (the attempt at the pod)
    seen = [h.get("traceparent", "") for h in engine.seen]
    assert seen, "the engine got no request"
    version, engine_trace, engine_parent, _ = seen[-1].split("-")
    assert (version, engine_trace) == ("00", trace_id), seen[-1]
    assert engine_parent in envoy and engine_parent != parent


def test_without_a_client_traceparent_envoy_starts_the_trace(
    traced: tuple[GatewayStack, Receiver], engine: _Recorder
) -> None:
    """The extproc's spans join Envoy's trace even when the client sent none: the context comes
    from the ext_proc stream's gRPC metadata, not from the request headers."""
    traced_stack, receiver = traced
    client = OpenAI(base_url=traced_stack.url, api_key="unused", max_retries=0, timeout=20)
    before = len(engine.seen)
    client.chat.completions.create(
        model="traced-model", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert len(engine.seen) == before + 1
    trace_id = engine.seen[-1]["traceparent"].split("-")[1]

    def joined() -> bool:
        spans = receiver.of_trace(trace_id)
        return any(s.service == "matrixinfer-extproc" for s in spans) and any(
            s.service == "matrixinfer-gateway" for s in spans
        )

    wait_until(joined, 30, f"Envoy's and the extproc's spans in Envoy's trace {trace_id}")
    spans = receiver.of_trace(trace_id)
    envoy = {s.span_id for s in spans if s.service == "matrixinfer-gateway"}
    assert all(s.parent_span_id in envoy for s in spans if s.service == "matrixinfer-extproc")
