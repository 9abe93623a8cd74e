"""The xDS generator: a pure function from resources (+ gateway settings) to Envoy resources.

``generate(settings, inputs)`` returns every resource Envoy needs, grouped by xDS type URL, each
resource in its protobuf-JSON form (the same shape Envoy's YAML takes, ``@type`` on ``Any``s). No
gRPC, protobuf, Kopf or Kubernetes here: the ADS server (:mod:`controllers.xds.server`) packs the
dicts into protobuf ``Any``s; the sources (:mod:`controllers.xds.sources`) produce the inputs.

What is generated (one listener, one route configuration, three clusters):

- listener ``openai``: HTTP connection manager → ext_proc filter (the MatrixInfer extproc decides
  the pod) → any policy filters (``extra_http_filters``, from ``extproc.usage`` when it exists) →
  router; route configuration over RDS; OpenAI-style local replies; fail-closed by default.
- route configuration ``openai``: one route per ModelServer attached to this gateway (matched on the
  ``x-gateway-model-server`` header the extproc sets; the route cache is cleared after the extproc's
  reply so the match sees it) carrying its ``trafficPolicy`` (retries, per-try idle timeout, stream
  idle timeout), then a catch-all route with the gateway defaults (requests without a decision).
- cluster ``matrixinfer_pods``: EDS over ADS with the ``override_host`` LB policy reading
  ``envoy.lb`` / ``x-gateway-destination-endpoint`` ("primary,fallback1,…"), round robin without
  a decision; its ClusterLoadAssignment lists every pod the extproc may choose.
- cluster ``matrixinfer_pods_grpc``: the same for the pods that serve the Open Inference Protocol's
  gRPC service (ModelServer ``workloadPort.grpcPort``), at that port, over HTTP/2; the first route
  (gRPC requests to ``/inference.GRPCInferenceService/``) goes there. The listener's codec is AUTO,
  so gRPC clients reach it over h2c.
- cluster ``matrixinfer_extproc``: the extproc Service's endpoints, HTTP/2, LEAST_REQUEST, gRPC
  health checked.
- with ``tracing_collector`` set: the listener's OpenTelemetry tracer
  (``envoy.tracers.opentelemetry``, W3C ``traceparent``): a span per request, one per ext_proc
  stream, one per attempt at a pod (its context reaches the engine), exported by OTLP/gRPC to
  cluster ``matrixinfer_otel_collector``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from crds.networking import RetryPolicy
from fleet.retry import envoy_retry
from fleet.usage_envoy import envoy_access_logs, envoy_upstream_logs

__all__ = [
    "ACCESS_LOG_JSON_FIELDS",
    "CLUSTER",
    "DEFAULT_ACCESS_LOG_FORMAT",
    "ENDPOINT_TYPE",
    "EXTPROC_CLUSTER",
    "GRPC_PODS_CLUSTER",
    "LISTENER",
    "LISTENER_TYPE",
    "OTEL_CLUSTER",
    "PODS_CLUSTER",
    "QUEUE_TIMEOUT_MARGIN_MS",
    "ROUTE_CONFIG",
    "ROUTE_TYPE",
    "TYPE_ORDER",
    "GatewaySettings",
    "XdsInputs",
    "attached_routes",
    "content_hash",
    "generate",
    "max_message_timeout_ms",
    "route_attached",
    "static_bootstrap",
]

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# the order Envoy needs on a push: clusters (and their endpoints) before the listeners that use them
TYPE_ORDER = (CLUSTER, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)

LISTENER = "openai"
ROUTE_CONFIG = "openai"
PODS_CLUSTER = "matrixinfer_pods"
GRPC_PODS_CLUSTER = "matrixinfer_pods_grpc"  # the pods' gRPC ports (fleet.pods.grpc_address)
GRPC_SERVICE_PREFIX = "/inference.GRPCInferenceService/"
EXTPROC_CLUSTER = "matrixinfer_extproc"
OTEL_CLUSTER = "matrixinfer_otel_collector"  # the OTLP/gRPC collector Envoy sends its spans to
SERVER_HEADER = "x-gateway-model-server"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
DEFAULT_ACCESS_LOG_FORMAT = (
    "[access] %START_TIME% %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% "
    "request_id=%REQ(X-REQUEST-ID)% model=%REQ(X-GATEWAY-MODEL)% "
    "server=%REQ(X-GATEWAY-MODEL-SERVER)% upstream=%UPSTREAM_HOST% flags=%RESPONSE_FLAGS% "
    "details=%RESPONSE_CODE_DETAILS% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% %DURATION%ms\n"
)

# the JSON access line (access_log_format "json"): one object per request, field -> Envoy command
# operator; numbers stay numbers, a missing value is null (docs/gateway.md "Access log")
ACCESS_LOG_JSON_FIELDS: dict[str, str] = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "model": "%REQ(X-GATEWAY-MODEL)%",
    "route": "%REQ(X-GATEWAY-ROUTE)%",
    "model_server": "%REQ(X-GATEWAY-MODEL-SERVER)%",
    "lora": "%REQ(X-GATEWAY-LORA)%",
    "pod": "%UPSTREAM_HOST%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "first_byte_ms": "%RESPONSE_DURATION%",
    "duration_ms": "%DURATION%",
    "prompt_tokens": "%DYNAMIC_METADATA(matrixinfer:prompt)%",
    "completion_tokens": "%DYNAMIC_METADATA(matrixinfer:completion)%",
    "user_agent": "%REQ(USER-AGENT)%",
}

_ADS: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}

# A queued request's message timeout is extended by the extproc to the route's queue.maxWait plus
# its own margin (extproc.policies.QUEUE_TIMEOUT_MARGIN, 2 s); Envoy ignores an extension above
# max_message_timeout, so the ceiling derived here keeps a larger margin than the extproc's.
QUEUE_TIMEOUT_MARGIN_MS = 5000
# ModelRoute.spec.queue.maxWait when a route has no queue section (crds QueuePolicy default;
# extproc.policies applies the same)
DEFAULT_MAX_WAIT_S = 60.0


@dataclass(slots=True, frozen=True)
class GatewaySettings:
    """Gateway-wide knobs (the local stack's flags, or the controllers' gateway settings)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    gateway_name: str = "matrixinfer-gateway"  # ModelRoute.parentRefs[].name that attaches here
    gateway_namespace: str | None = None  # None: parentRefs in any namespace
    body_mode: str = "BUFFERED"  # or FULL_DUPLEX_STREAMED (must match the extproc)
    body_limit: int = 10 * 1024 * 1024
    # Envoy's wait for each ext_proc reply outside the queue (docs/gateway.md "Timeouts"): a
    # decision takes milliseconds, but Redis-backed limits on 2 loaded cores once took > 200 ms;
    # 1 s also bounds how long a stuck extproc holds a request before the fail-closed 503
    message_timeout_ms: int = 1000
    # ceiling of the per-request extension for queued requests (max_message_timeout); the
    # generator derives it from the longest queue.maxWait and never goes above this cap
    max_message_timeout_cap_ms: int = 600_000
    fail_open: bool = False
    retries: int = 2
    connect_timeout_ms: int = 1000
    route_timeout_s: int = 0  # 0: no limit on the whole exchange (answers stream)
    # longest silence on a request once it is routed (a ModelServer's streamIdleTimeout instead
    # when it sets one): long enough for an engine's silent prefill and unstreamed answers
    stream_idle_timeout_s: float = 300
    # slow clients (docs/gateway.md "Timeouts for slow clients"): the request's headers must
    # arrive within this (else the connection is closed) ...
    request_headers_timeout_s: float = 10
    # ... and its body may not stall longer than this before the extproc routes it (408); a
    # routed request's answer is under stream_idle_timeout_s instead, so streams are not cut
    request_body_idle_timeout_s: float = 30
    access_log: bool = False  # Envoy's own access line on stdout
    access_log_format: str = "text"  # text (DEFAULT_ACCESS_LOG_FORMAT) | json (one object a line)
    # every request reported to the extproc by gRPC (fleet.usage_envoy.envoy_access_logs): the
    # status the client got, timings and usage, for its metrics, logs and usage accounting
    request_log: bool = True
    # answered by Envoy itself (load balancers' probes): 200 while an extproc is healthy
    health_path: str = "/healthz"
    extproc_health_interval_ms: int = 2000
    # tracing (docs/gateway.md "Tracing"): "host:port" of an OTLP/gRPC collector; "" = off
    tracing_collector: str = ""
    tracing_service_name: str = "matrixinfer-gateway"  # Envoy's spans' service.name
    # percent of the requests Envoy traces (HCM random_sampling); it decides for every request,
    # a client's traceparent included (its trace id is kept, its sampled flag does not count)
    tracing_sampling: float = 100.0
    extra_http_filters: tuple[Mapping[str, Any], ...] = ()  # before the router (policy filters)
    extra_access_logs: tuple[Mapping[str, Any], ...] = ()


@dataclass(slots=True, frozen=True)
class XdsInputs:
    """What the sources deliver: validated objects and resolved addresses."""

    routes: Sequence[Any] = ()  # crds.ModelRoute
    servers: Sequence[Any] = ()  # crds.ModelServer
    pod_addresses: Sequence[str] = ()  # "ip:port" of every pod the extproc may choose
    grpc_pod_addresses: Sequence[str] = ()  # "ip:port" of those pods' gRPC service
    extproc_endpoints: Sequence[str] = ()  # "host:port" of every extproc replica
    extras: Mapping[str, Any] = field(default_factory=dict)


Resources = dict[str, dict[str, dict[str, Any]]]


def _seconds(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _socket(address: str) -> dict[str, Any]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _duration_seconds(text: str | None) -> float | None:
    if not text:
        return None
    from crds.common import parse_duration

    return parse_duration(text)


def route_attached(route: Any, settings: GatewaySettings) -> bool:
    """``parentRefs`` honoured: no refs attaches everywhere; otherwise one ref must name this
    gateway (kind Gateway, namespace matching when the gateway has one)."""
    refs = getattr(route.spec, "parent_refs", None)
    if not refs:
        return True
    for ref in refs:
        if getattr(ref, "kind", "Gateway") != "Gateway" or ref.name != settings.gateway_name:
            continue
        ns = ref.namespace or getattr(route.metadata, "namespace", None)
        if settings.gateway_namespace is None or ns == settings.gateway_namespace:
            return True
    return False


def attached_routes(routes: Sequence[Any], settings: GatewaySettings) -> list[Any]:
    return [r for r in routes if route_attached(r, settings)]


def _ns(obj: Any) -> str:
    return getattr(obj.metadata, "namespace", None) or "default"


def _retry_policy(
    retry: RetryPolicy | None, default_retries: int, per_try_idle: float | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"per_try_timeout": "0s"}
    if retry is None:
        out.update(retry_on=DEFAULT_RETRY_ON, num_retries=default_retries)
    else:
        envoy = envoy_retry(retry)
        out.update(retry_on=envoy.retry_on, num_retries=envoy.attempts)
        if envoy.status_codes:
            out["retriable_status_codes"] = list(envoy.status_codes)
    if per_try_idle is not None:
        out["per_try_idle_timeout"] = _seconds(per_try_idle)
    return out


def _server_route(server: Any, settings: GatewaySettings) -> dict[str, Any]:
    policy = getattr(server.spec, "traffic_policy", None)
    timeout = _duration_seconds(getattr(policy, "timeout", None))
    idle = _duration_seconds(getattr(policy, "stream_idle_timeout", None))
    longest = _duration_seconds(getattr(policy, "max_duration", None))
    action: dict[str, Any] = {
        "cluster": PODS_CLUSTER,
        "timeout": _seconds(settings.route_timeout_s),
        # no retry policy: no retries (the extproc's x-envoy-max-retries says the same)
        "retry_policy": _retry_policy(getattr(policy, "retry", None), 0, timeout),
        # once routed here, the answer's silences are bounded by this, not the body's idle limit
        "idle_timeout": _seconds(idle if idle is not None else settings.stream_idle_timeout_s),
    }
    if longest is not None:
        action["max_stream_duration"] = {"max_stream_duration": _seconds(longest)}
    return {
        "name": f"modelserver/{_ns(server)}/{server.metadata.name}",
        "match": {
            "prefix": "/",
            "headers": [{"name": SERVER_HEADER, "string_match": {"exact": server.metadata.name}}],
        },
        "route": action,
    }


def _unrouted_idle_timeout(settings: GatewaySettings, routes: Sequence[Any]) -> float:
    """The catch-all route's ``idle_timeout``: the request body idle limit (a request is on that
    route until the extproc routes it), but never shorter than the extproc may hold a request in
    silence (``max_message_timeout``: the fair queue, or a ModelServer with no ready pod yet);
    with fail-open, requests may stay on it while their answer streams: the stream idle timeout."""
    if settings.fail_open:
        return settings.stream_idle_timeout_s
    return max(
        settings.request_body_idle_timeout_s, max_message_timeout_ms(settings, routes) / 1000
    )


def _route_config(settings: GatewaySettings, inputs: XdsInputs) -> dict[str, Any]:
    routes = attached_routes(inputs.routes, settings)
    wanted: set[tuple[str, str]] = set()
    for route in routes:
        for rule in route.spec.rules:
            for target in rule.targets:
                wanted.add((_ns(route), target.model_server_name))
    entries: list[dict[str, Any]] = [
        {  # gRPC calls (the extproc routed them to a pod's gRPC port) go over HTTP/2
            "name": "grpc",
            "match": {"prefix": GRPC_SERVICE_PREFIX, "grpc": {}},
            "route": {
                "cluster": GRPC_PODS_CLUSTER,
                "timeout": _seconds(settings.route_timeout_s),
                "retry_policy": _retry_policy(None, settings.retries, None),
                "idle_timeout": _seconds(settings.stream_idle_timeout_s),
            },
        }
    ]
    seen_names: set[str] = set()
    for server in sorted(inputs.servers, key=lambda s: (_ns(s), s.metadata.name)):
        key = (_ns(server), server.metadata.name)
        if key not in wanted or server.metadata.name in seen_names:
            continue
        seen_names.add(server.metadata.name)  # the header carries the name only
        entries.append(_server_route(server, settings))
    entries.append(
        {
            "name": "default",
            "match": {"prefix": "/"},
            "route": {
                "cluster": PODS_CLUSTER,
                "timeout": _seconds(settings.route_timeout_s),
                "retry_policy": _retry_policy(None, settings.retries, None),
                # a request's route until the extproc has routed it: its body may not stall
                # longer than the body idle timeout; fail-open (requests may stay here while
                # their answer streams): the stream idle timeout
                "idle_timeout": _seconds(_unrouted_idle_timeout(settings, inputs.routes)),
            },
        }
    )
    return {
        "@type": ROUTE_TYPE,
        "name": ROUTE_CONFIG,
        "virtual_hosts": [{"name": "openai", "domains": ["*"], "routes": entries}],
    }


def _error_json(message: str, type_: str, code: str) -> dict[str, Any]:
    return {
        "json_format": {"error": {"message": message, "type": type_, "param": None, "code": code}},
        "content_type": "application/json",
    }


def _cel_filter(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                "ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _local_reply_config() -> dict[str, Any]:
    """Replies Envoy makes itself get an OpenAI-style JSON body; the extproc's own replies
    (details ``matrixinfer_gateway_<code>``) already carry one and are left alone."""
    return {
        "mappers": [
            {
                "filter": _cel_filter("response.code_details.startsWith('ext_proc_error')"),
                "status_code": 503,
                "body_format_override": _error_json(
                    "the MatrixInfer gateway cannot route this request: its request processor "
                    "(extproc) is unreachable or failed [%RESPONSE_CODE_DETAILS%]",
                    "gateway_unavailable",
                    "extproc_unavailable",
                ),
            },
            {
                "filter": _cel_filter("!response.code_details.startsWith('matrixinfer_gateway')"),
                "body_format_override": _error_json(
                    "%LOCAL_REPLY_BODY% [%RESPONSE_CODE_DETAILS%]",
                    "gateway_error",
                    "%RESPONSE_CODE%",
                ),
            },
        ]
    }


def max_message_timeout_ms(settings: GatewaySettings, routes: Sequence[Any]) -> int:
    """Envoy's ``max_message_timeout``: the longest ``queue.maxWait`` among the ModelRoutes
    attached to this gateway plus :data:`QUEUE_TIMEOUT_MARGIN_MS`, at most
    ``max_message_timeout_cap_ms`` and never below the base ``message_timeout_ms``. The extproc
    extends a queued request's timeout up to this value (``override_message_timeout``)."""
    longest = 0.0
    for route in attached_routes(routes, settings):
        queue = getattr(route.spec, "queue", None)
        wait = _duration_seconds(queue.max_wait) if queue is not None else DEFAULT_MAX_WAIT_S
        longest = max(longest, wait or 0.0)
    if longest <= 0:
        return settings.message_timeout_ms
    wanted = round(longest * 1000) + QUEUE_TIMEOUT_MARGIN_MS
    return max(settings.message_timeout_ms, min(wanted, settings.max_message_timeout_cap_ms))


def _ext_proc_filter(settings: GatewaySettings, routes: Sequence[Any]) -> dict[str, Any]:
    timeout = _seconds(settings.message_timeout_ms / 1000)
    streamed = settings.body_mode == "FULL_DUPLEX_STREAMED"
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
            "ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": timeout},
            # the decision needs the body: headers SEND (Envoy holds them until the body reply)
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": settings.body_mode,
                "response_body_mode": "NONE",
                "request_trailer_mode": "SEND" if streamed else "SKIP",
                "response_trailer_mode": "SKIP",
            },
            # base wait per reply; a queued request is extended by the extproc (a reply carrying
            # only override_message_timeout) up to max_message_timeout (see GatewaySettings)
            "message_timeout": timeout,
            "max_message_timeout": _seconds(max_message_timeout_ms(settings, routes) / 1000),
            # fail-closed by default: 503 with the local reply above
            "failure_mode_allow": settings.fail_open,
            "status_on_error": {"code": 503},
            # the extproc sets the x-envoy-* retry headers of the ModelServer's trafficPolicy
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
            # accept the decision in dynamic metadata (read by override_host); without this Envoy
            # drops the metadata silently
            "metadata_options": {"receiving_namespaces": {"untyped": ["envoy.lb"]}},
            # re-match the route after the extproc set x-gateway-model-server (per-server routes)
            "route_cache_action": "CLEAR",
        },
    }


def _access_logs(settings: GatewaySettings) -> list[dict[str, Any]]:
    logs: list[dict[str, Any]] = []
    if settings.access_log:
        if settings.access_log_format == "json":
            log_format: dict[str, Any] = {"json_format": dict(ACCESS_LOG_JSON_FIELDS)}
        elif settings.access_log_format == "text":
            log_format = {"text_format_source": {"inline_string": DEFAULT_ACCESS_LOG_FORMAT}}
        else:
            raise ValueError(
                f"access_log_format {settings.access_log_format!r}: expected text or json"
            )
        logs.append(
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3."
                    "StdoutAccessLog",
                    "log_format": log_format,
                },
            }
        )
    if settings.request_log:
        logs.extend(envoy_access_logs(EXTPROC_CLUSTER))
    logs.extend(dict(x) for x in settings.extra_access_logs)
    return logs


def _health_check_filter(settings: GatewaySettings) -> dict[str, Any]:
    """``GET <health_path>`` answered by Envoy: 200 while at least one extproc replica passes its
    health check, 503 otherwise (and while Envoy drains)."""
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3."
            "HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": settings.health_path}}],
            "cluster_min_healthy_percentages": {EXTPROC_CLUSTER: {"value": 1}},
        },
    }


def _router(settings: GatewaySettings) -> dict[str, Any]:
    router: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "suppress_envoy_headers": True,
    }
    if settings.request_log:
        # every attempt at a pod (retries included) to the extproc: its passive health
        router["upstream_log"] = envoy_upstream_logs(EXTPROC_CLUSTER)
    return {"name": "envoy.filters.http.router", "typed_config": router}


def _tracing(settings: GatewaySettings) -> dict[str, Any]:
    """The HCM's OpenTelemetry tracer: a span per request (its context follows a client's W3C
    ``traceparent``), a child span per ext_proc stream (its context goes to the extproc in the
    stream's gRPC metadata) and per attempt at a pod (``spawn_upstream_span``; its context goes
    to the engine as ``traceparent``)."""
    if not 0 <= settings.tracing_sampling <= 100:
        raise ValueError(
            f"tracing_sampling must be a percentage in [0, 100], not {settings.tracing_sampling}"
        )
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"},
                "service_name": settings.tracing_service_name,
            },
        },
        "random_sampling": {"value": settings.tracing_sampling},
        "spawn_upstream_span": True,
    }


def _otel_cluster(settings: GatewaySettings) -> dict[str, Any]:
    """The OTLP/gRPC collector (a DNS name, e.g. a collector Service, or an address)."""
    return {
        "@type": CLUSTER,
        "name": OTEL_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": OTEL_CLUSTER,
            "endpoints": _lb_endpoints([settings.tracing_collector]),
        },
    }


def _listener(settings: GatewaySettings, routes: Sequence[Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager",
        "stat_prefix": "openai",
        "stream_idle_timeout": _seconds(settings.stream_idle_timeout_s),
        "request_headers_timeout": _seconds(settings.request_headers_timeout_s),
        # every request has an id: the client's x-request-id is kept, else Envoy makes one; the
        # extproc logs it and answers it, and every answer carries it back
        "generate_request_id": True,
        "preserve_external_request_id": True,
        "always_set_request_id_in_response": True,
        "rds": {"route_config_name": ROUTE_CONFIG, "config_source": _ADS},
        "local_reply_config": _local_reply_config(),
        "http_filters": [
            *([_health_check_filter(settings)] if settings.health_path else []),
            _ext_proc_filter(settings, routes),
            *(dict(f) for f in settings.extra_http_filters),
            _router(settings),
        ],
    }
    logs = _access_logs(settings)
    if logs:
        hcm["access_log"] = logs
    if settings.tracing_collector:
        hcm["tracing"] = _tracing(settings)
    return {
        "@type": LISTENER_TYPE,
        "name": LISTENER,
        "address": _socket(f"{settings.listen_host}:{settings.listen_port}"),
        # large enough for a whole request body (BUFFERED): the extproc answers 413 above its limit
        "per_connection_buffer_limit_bytes": settings.body_limit + 1024 * 1024,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _lb_endpoints(addresses: Sequence[str]) -> list[dict[str, Any]]:
    eps = [{"endpoint": {"address": _socket(a)}} for a in sorted(set(addresses))]
    return [{"lb_endpoints": eps}] if eps else []


def _grpc_pods_cluster(settings: GatewaySettings) -> dict[str, Any]:
    """The pods cluster's twin for the pods' gRPC ports: HTTP/2 towards the pods."""
    cluster = _pods_cluster(settings)
    cluster["name"] = GRPC_PODS_CLUSTER
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return cluster


def _pods_cluster(settings: GatewaySettings) -> dict[str, Any]:
    round_robin = {
        "typed_extension_config": {
            "name": "envoy.load_balancing_policies.round_robin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                "round_robin.v3.RoundRobin"
            },
        }
    }
    return {
        "@type": CLUSTER,
        "name": PODS_CLUSTER,
        "type": "EDS",
        "connect_timeout": _seconds(settings.connect_timeout_ms / 1000),
        "eds_cluster_config": {"eds_config": _ADS},
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                            "override_host.v3.OverrideHost",
                            "override_host_sources": [
                                {
                                    "metadata": {
                                        "key": "envoy.lb",
                                        "path": [{"key": DESTINATION_HEADER}],
                                    }
                                }
                            ],
                            # no decision (fail-open, or an unknown pod): plain round robin
                            "fallback_policy": {"policies": [round_robin]},
                        },
                    }
                }
            ]
        },
    }


def _extproc_cluster(settings: GatewaySettings, endpoints: Sequence[str]) -> dict[str, Any]:
    interval = _seconds(settings.extproc_health_interval_ms / 1000)
    return {
        "@type": CLUSTER,
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        # several extproc replicas: LEAST_REQUEST spreads the (long) streams evenly
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": interval,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": EXT_PROC_SERVICE},
            }
        ],
        # all replicas failing their health check: Envoy's panic mode still tries them
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": _lb_endpoints(endpoints),
        },
    }


def generate(settings: GatewaySettings, inputs: XdsInputs) -> Resources:
    """Every resource for one gateway, by type URL then name (protobuf-JSON dicts)."""
    clusters = {
        EXTPROC_CLUSTER: _extproc_cluster(settings, inputs.extproc_endpoints),
        PODS_CLUSTER: _pods_cluster(settings),
        GRPC_PODS_CLUSTER: _grpc_pods_cluster(settings),
    }
    if settings.tracing_collector:
        clusters[OTEL_CLUSTER] = _otel_cluster(settings)
    return {
        CLUSTER: clusters,
        ENDPOINT_TYPE: {
            PODS_CLUSTER: {
                "@type": ENDPOINT_TYPE,
                "cluster_name": PODS_CLUSTER,
                "endpoints": _lb_endpoints(inputs.pod_addresses),
            },
            GRPC_PODS_CLUSTER: {
                "@type": ENDPOINT_TYPE,
                "cluster_name": GRPC_PODS_CLUSTER,
                "endpoints": _lb_endpoints(inputs.grpc_pod_addresses),
            },
        },
        LISTENER_TYPE: {LISTENER: _listener(settings, inputs.routes)},
        ROUTE_TYPE: {ROUTE_CONFIG: _route_config(settings, inputs)},
    }


def content_hash(resources: Mapping[str, Mapping[str, Any]]) -> str:
    """A stable digest of one type's resources (the version changes only when this changes)."""
    data = orjson.dumps(resources, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:16]


def static_bootstrap(
    settings: GatewaySettings,
    inputs: XdsInputs,
    *,
    admin_port: int,
    eds_path: str,
    node_id: str = "matrixinfer-gateway",
) -> dict[str, Any]:
    """The same resources as a static Envoy bootstrap (no ADS): the route configuration inline in
    the listener, the pods' endpoints from a watched ``ClusterLoadAssignment`` file. For the
    benchmarks that run Envoy without the xDS server; the generated resources stay the one
    definition of the gateway's Envoy config."""
    res = generate(settings, inputs)

    def bare(resource: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if k != "@type"}

    listener = bare(res[LISTENER_TYPE][LISTENER])
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    hcm["route_config"] = bare(res[ROUTE_TYPE][ROUTE_CONFIG])
    pods = bare(res[CLUSTER][PODS_CLUSTER])
    directory = eds_path.rsplit("/", 1)[0] or "/"
    pods["eds_cluster_config"] = {
        "eds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": eds_path, "watched_directory": {"path": directory}},
        }
    }
    grpc_pods = bare(res[CLUSTER][GRPC_PODS_CLUSTER])  # static: its endpoints inline
    del grpc_pods["eds_cluster_config"]
    grpc_pods["type"] = "STATIC"
    grpc_pods["load_assignment"] = bare(res[ENDPOINT_TYPE][GRPC_PODS_CLUSTER])
    return {
        "node": {"id": node_id, "cluster": "matrixinfer-gateway"},
        "admin": {"address": _socket(f"127.0.0.1:{admin_port}")},
        "static_resources": {
            "listeners": [listener],
            "clusters": [
                bare(res[CLUSTER][EXTPROC_CLUSTER]),
                pods,
                grpc_pods,
                *(bare(c) for name, c in res[CLUSTER].items() if name == OTEL_CLUSTER),
            ],
        },
    }
