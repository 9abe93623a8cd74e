"""The Envoy side of what the extproc learns after an answer: the metadata and header names the
extproc and Envoy share, the HTTP filters that read each answer's usage, and the gRPC access log
that reports every request back to the extproc (one place; the xDS generator places them in the
listener, the extproc reads what they write: :class:`Answered`)."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# written by the usage filters: prompt, completion, events, first_token_us
METADATA_NAMESPACE = "matrixinfer"
RID_NAMESPACE = "envoy.lb"  # written by the extproc (the namespace its ext_proc filter accepts)
# envoy.lb flag on every routed request: the usage filters read its answer (the mark they match)
USAGE_KEY = "matrixinfer_usage"
RID_KEY = "matrixinfer_rid"  # envoy.lb: the id its usage report settles (policies)
STRIP_KEY = "matrixinfer_strip"  # envoy.lb flag: hide the forced usage event from the client
# envoy.lb flag: a Responses API stream (/v1/responses), whose first token is its first
# ``*.delta`` event (response.created and friends come before any token)
RESPONSES_KEY = "matrixinfer_responses"
CHARGE_KEY = "matrixinfer_charge"  # envoy.lb: the Charge, for the replica the report reaches
LOG_NAME = "matrixinfer_requests"
# the router's upstream log: one entry per attempt at a pod (retries included), for passive health
ATTEMPTS_LOG_NAME = "matrixinfer_attempts"
# headers the extproc sets on a routed request (towards the pod); the access log reports them
SERVER_HEADER = "x-gateway-model-server"  # the ModelServer
MODEL_HEADER = "x-gateway-model"  # the model name the client asked for
ROUTE_HEADER = "x-gateway-route"  # the ModelRoute
LORA_HEADER = "x-gateway-lora"  # the LoRA adapter, when the request names one
LOGGED_HEADERS = (MODEL_HEADER, ROUTE_HEADER, SERVER_HEADER, LORA_HEADER)
# ImmediateResponse details of the extproc's own answers (Envoy reports them as the
# response_code_details): the extproc counted those when it answered
GATEWAY_DETAILS_PREFIX = "matrixinfer_gateway_"
# JSON answers with a content-length of at most this many digits (< 1 MB) are read by Envoy's
# json_to_metadata filter (C++; it buffers them, far below the listener's buffer limit of the
# request body limit + 1 MiB); longer ones and chunked ones by usage.lua (the last 4 KiB)
SMALL_JSON_DIGITS = 6
_ROOT = Path(__file__).resolve().parent.parent


def lua_source() -> str:
    """``envoy/usage.lua`` from a source checkout, or from a wheel's data files
    (``<prefix>/share/matrixinfer/envoy``, as matrixinfer.resources looks them up)."""
    installed = Path(sysconfig.get_path("data")) / "share" / "matrixinfer" / "envoy" / "usage.lua"
    for candidate in (_ROOT / "envoy" / "usage.lua", installed):
        if candidate.is_file():
            return candidate.read_text()
    raise FileNotFoundError(f"envoy/usage.lua not found under {_ROOT} or {installed.parent}")


def _predicate(name: str, input_type: str, match: dict[str, Any], **fields: Any) -> Any:
    """An xDS matcher single predicate on one input (Envoy JSON shape); ``match`` is its
    ``value_match`` or ``custom_match``."""
    typed = {"@type": f"type.googleapis.com/{input_type}", **fields}
    return {"single_predicate": {"input": {"name": name, "typed_config": typed}, **match}}


def _run_only_when(inner: dict[str, Any], predicate: dict[str, Any]) -> dict[str, Any]:
    """``inner`` wrapped in Envoy's ExtensionWithMatcher: skipped unless ``predicate`` holds."""
    skip = {
        "name": "skip",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
        },
    }
    otherwise = {"predicate": {"not_matcher": predicate}, "on_match": {"action": skip}}
    return {
        "name": inner["name"],
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "xds_matcher": {"matcher_list": {"matchers": [otherwise]}},
            "extension_config": inner,
        },
    }


def _json_to_metadata() -> dict[str, Any]:
    """Envoy's json_to_metadata on JSON answers: ``usage.prompt_tokens`` / ``completion_tokens``
    (``usage.input_tokens`` / ``output_tokens`` of a Responses API answer) into
    ``matrixinfer``/``prompt`` / ``completion`` (numbers, as usage.lua writes them)."""

    def rule(field: str, key: str) -> dict[str, Any]:
        into = {"metadata_namespace": METADATA_NAMESPACE, "key": key, "type": "NUMBER"}
        return {"selectors": [{"key": "usage"}, {"key": field}], "on_present": into}

    return {
        "name": "envoy.filters.http.json_to_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
            "response_rules": {
                "rules": [
                    rule("prompt_tokens", "prompt"),
                    rule("completion_tokens", "completion"),
                    rule("input_tokens", "prompt"),  # /v1/responses
                    rule("output_tokens", "completion"),
                ],
                # application/json with or without parameters (charset=utf-8)
                "allow_content_types_regex": {"regex": r"application/json\s*(;.*)?"},
            },
        },
    }


def _lua() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": lua_source()},
        },
    }


def envoy_http_filters(small_json_digits: int | None = None) -> list[dict[str, Any]]:
    """HTTP filters to put after ext_proc and before the router (Envoy JSON shape).

    Only requests the extproc marked (``envoy.lb``/``matrixinfer_usage``: every routed request)
    are looked at, and each by one filter, chosen by Envoy's matcher on the answer's headers:

    - a content-length of at most ``small_json_digits`` digits (default
      :data:`SMALL_JSON_DIGITS`): Envoy's json_to_metadata (C++) reads the JSON answer's usage;
    - anything else (streams, chunked answers, longer answers): ``usage.lua`` (the SSE events,
      the time of the first token and the final usage event; a JSON answer's last 4 KiB).

    ``small_json_digits=0``: usage.lua alone reads every marked answer (the design measured
    before json_to_metadata, kept for ``bench.experiments.usage_filters``).
    """
    digits = SMALL_JSON_DIGITS if small_json_digits is None else small_json_digits
    marked = _predicate(
        "rid",
        "envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput",
        {
            "custom_match": {
                "name": "present",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.matching.input_matchers.metadata.v3.Metadata",
                    "value": {"present_match": True},
                },
            }
        },
        filter=RID_NAMESPACE,
        path=[{"key": USAGE_KEY}],
    )
    if digits <= 0:
        return [_run_only_when(_lua(), marked)]
    small = _predicate(
        "content-length",
        "envoy.type.matcher.v3.HttpResponseHeaderMatchInput",
        {"value_match": {"safe_regex": {"google_re2": {}, "regex": f"[0-9]{{1,{digits}}}"}}},
        header_name="content-length",
    )
    return [
        _run_only_when(_lua(), {"and_matcher": {"predicate": [marked, {"not_matcher": small}]}}),
        _run_only_when(_json_to_metadata(), {"and_matcher": {"predicate": [marked, small]}}),
    ]


def envoy_access_logs(
    extproc_cluster: str = "matrixinfer_extproc", flush_interval_ms: int = 100
) -> list[dict[str, Any]]:
    """HTTP connection manager ``access_log`` entries: every request (load balancers' health
    checks aside) reported to the extproc by gRPC, batched by Envoy off the request path — the
    status the client got, the request id, the pod, the timings, the headers of
    :data:`LOGGED_HEADERS` and, for requests marked for usage accounting, their usage."""
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "filter": {"not_health_check_filter": {}},
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": LOG_NAME,
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": extproc_cluster}},
                    "buffer_flush_interval": f"{flush_interval_ms / 1000:.3f}s",
                    "buffer_size_bytes": 16384,
                },
                "additional_request_headers_to_log": list(LOGGED_HEADERS),
            },
        }
    ]


def envoy_upstream_logs(
    extproc_cluster: str = "matrixinfer_extproc", flush_interval_ms: int = 100
) -> list[dict[str, Any]]:
    """The router's ``upstream_log`` entries: every attempt at a pod (the first and each retry)
    reported to the extproc by gRPC under :data:`ATTEMPTS_LOG_NAME`, with the ModelServer's
    header; the extproc's passive health reads the pod, the status and the response flags."""
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": ATTEMPTS_LOG_NAME,
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": extproc_cluster}},
                    "buffer_flush_interval": f"{flush_interval_ms / 1000:.3f}s",
                    "buffer_size_bytes": 16384,
                },
                "additional_request_headers_to_log": [SERVER_HEADER],
            },
        }
    ]


@dataclass(slots=True)
class Answered:
    """One request as Envoy's access log reports it, once the answer is over."""

    request_id: str
    status: int  # the status the client got (0: none, e.g. the client went away first)
    details: str  # Envoy's response_code_details (e.g. via_upstream, matrixinfer_gateway_404)
    upstream: str  # "ip:port" of the pod that answered ("" when none did)
    model: str = ""  # the routed request's headers (empty when the extproc did not route it)
    route: str = ""
    server: str = ""
    lora: str = ""
    first_byte: float = 0.0  # seconds from the request's start to the answer's first byte
    duration: float = 0.0  # seconds from the request's start to the answer's last byte
    # seconds from the request's start to the stream's first token (0.0: not a stream, or no
    # token came); usage.lua notes the time of the first event that carries one
    first_token: float = 0.0
    prompt_tokens: int | None = None  # the engine's usage, when the usage filters read it
    completion_tokens: int | None = None

    @property
    def by_gateway(self) -> bool:
        """The extproc answered this request itself (an ImmediateResponse)."""
        return self.details.startswith(GATEWAY_DETAILS_PREFIX)
