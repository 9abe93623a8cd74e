"""The pure generator: resources + settings -> xDS resources (no Envoy, no gRPC)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import crds
from controllers.xds.generate import (
    ACCESS_LOG_JSON_FIELDS,
    CLUSTER,
    ENDPOINT_TYPE,
    EXTPROC_CLUSTER,
    LISTENER_TYPE,
    QUEUE_TIMEOUT_MARGIN_MS,
    ROUTE_TYPE,
    GatewaySettings,
    XdsInputs,
    content_hash,
    generate,
    max_message_timeout_ms,
)
from controllers.xds.protos import ResourceError, to_any
from controllers.xds.sources import inputs_from_config, with_policy_filters
from extproc.policies.enforce import QUEUE_TIMEOUT_MARGIN
from fleet.config import GatewayConfig, StaticEndpoint

DOCS = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: a, namespace: ns}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: a}}
  workloadPort: {port: 8000}
  trafficPolicy:
    timeout: 1500ms
    retry: {attempts: 2, retryOn: [connect-failure, "503"]}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: b, namespace: ns}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: b}}
  workloadPort: {port: 8001}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: ra, namespace: ns}
spec:
  modelName: ma
  rules: [{targets: [{modelServerName: a}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: rb, namespace: ns}
spec:
  modelName: mb
  parentRefs: [{name: other-gateway}]
  rules: [{targets: [{modelServerName: b}]}]
"""


def objects() -> list[Any]:
    return list(crds.load_documents(DOCS, "test.yaml"))


def inputs(**kw: Any) -> XdsInputs:
    objs = objects()
    return XdsInputs(
        routes=[o for o in objs if o.kind == "ModelRoute"],
        servers=[o for o in objs if o.kind == "ModelServer"],
        pod_addresses=kw.get("pods", ["10.0.0.2:8000", "10.0.0.1:8000"]),
        extproc_endpoints=kw.get("extproc", ["10.1.0.1:9002", "10.1.0.2:9002"]),
    )


def ext_proc(res: dict[str, Any]) -> dict[str, Any]:
    hcm = res[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    assert filters[0]["name"] == "envoy.filters.http.health_check"  # the health path
    assert filters[1]["name"] == "envoy.filters.http.ext_proc"
    assert filters[-1]["name"] == "envoy.filters.http.router"
    return dict(filters[1]["typed_config"])


def test_every_resource_fits_envoys_schema() -> None:
    res = generate(GatewaySettings(access_log=True), inputs())
    assert set(res) == {CLUSTER, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE}
    for items in res.values():
        for item in items.values():
            assert to_any(item).value  # parsed into the real protobuf message


def test_ext_proc_filter_settings_that_make_the_data_path_work() -> None:
    f = ext_proc(generate(GatewaySettings(), inputs()))
    assert f["metadata_options"] == {"receiving_namespaces": {"untyped": ["envoy.lb"]}}
    assert f["mutation_rules"]["allow_envoy"] is True
    assert f["failure_mode_allow"] is False and f["status_on_error"] == {"code": 503}
    assert f["processing_mode"]["request_header_mode"] == "SEND"
    assert f["message_timeout"] == "1s"  # the deliberate base (GatewaySettings, docs/gateway.md)
    assert ext_proc(generate(GatewaySettings(fail_open=True), inputs()))["failure_mode_allow"]


def _route(name: str, max_wait: str | None, parent: str | None = None) -> Any:
    queue = f"queue: {{maxWait: {max_wait}}}" if max_wait is not None else ""
    refs = f"parentRefs: [{{name: {parent}}}]" if parent else ""
    text = f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: {name}, namespace: ns}}
spec:
  modelName: {name}
  {queue}
  {refs}
  rules: [{{targets: [{{modelServerName: a}}]}}]
"""
    return next(iter(crds.load_documents(text, "route.yaml")))


def test_max_message_timeout_derived_from_the_longest_attached_max_wait() -> None:
    s = GatewaySettings()
    margin = QUEUE_TIMEOUT_MARGIN_MS
    # the longest maxWait wins; a route on another gateway does not count
    routes = [_route("r1", "8s"), _route("r2", "300ms"), _route("r3", "90s", "other-gateway")]
    assert max_message_timeout_ms(s, routes) == 8000 + margin
    f = ext_proc(generate(s, XdsInputs(routes=routes)))
    assert f["max_message_timeout"] == "13s" and f["message_timeout"] == "1s"
    # a route without a queue section queues up to the API default (60 s)
    assert max_message_timeout_ms(s, [_route("r4", None)]) == 60_000 + margin
    # the gateway-wide cap; never below the base timeout; no routes: the base timeout
    assert (
        max_message_timeout_ms(
            GatewaySettings(max_message_timeout_cap_ms=30_000), [*routes[:1], _route("r5", "1h")]
        )
        == 30_000
    )
    assert max_message_timeout_ms(GatewaySettings(message_timeout_ms=20_000), routes) == 20_000
    assert max_message_timeout_ms(s, []) == s.message_timeout_ms
    # the extproc's extension (maxWait + its margin) stays inside the ceiling Envoy enforces
    assert margin > QUEUE_TIMEOUT_MARGIN * 1000


def test_pods_cluster_override_host_and_endpoints() -> None:
    res = generate(GatewaySettings(), inputs())
    pods = res[CLUSTER]["matrixinfer_pods"]
    policy = pods["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["name"] == "envoy.load_balancing_policies.override_host"
    source = policy["typed_config"]["override_host_sources"][0]["metadata"]
    assert source == {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}
    assert pods["eds_cluster_config"]["eds_config"]["ads"] == {}
    eps = res[ENDPOINT_TYPE]["matrixinfer_pods"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in eps] == [
        "10.0.0.1",
        "10.0.0.2",
    ]
    ext = res[CLUSTER]["matrixinfer_extproc"]
    assert ext["lb_policy"] == "LEAST_REQUEST"
    assert ext["health_checks"][0]["grpc_health_check"]["service_name"].endswith(
        "ExternalProcessor"
    )
    assert len(ext["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_routes_carry_traffic_policy_and_honour_parent_refs() -> None:
    res = generate(GatewaySettings(), inputs())
    routes = res[ROUTE_TYPE]["openai"]["virtual_hosts"][0]["routes"]
    # rb is attached to another gateway: its server b gets no route here
    assert [r["name"] for r in routes] == ["grpc", "modelserver/ns/a", "default"]
    a = routes[1]
    assert a["match"]["headers"][0] == {
        "name": "x-gateway-model-server",
        "string_match": {"exact": "a"},
    }
    assert a["route"]["retry_policy"]["per_try_idle_timeout"] == "1.5s"
    assert a["route"]["retry_policy"]["retriable_status_codes"] == [503]
    assert "retriable-status-codes" in a["route"]["retry_policy"]["retry_on"]
    res2 = generate(GatewaySettings(gateway_name="other-gateway"), inputs())
    names = [r["name"] for r in res2[ROUTE_TYPE]["openai"]["virtual_hosts"][0]["routes"]]
    assert names == ["grpc", "modelserver/ns/a", "modelserver/ns/b", "default"]
    b = res2[ROUTE_TYPE]["openai"]["virtual_hosts"][0]["routes"][2]
    assert b["route"]["retry_policy"]["num_retries"] == 0  # no retry policy: no retries


def test_policy_filters_go_before_the_router() -> None:
    extra = {"name": "envoy.filters.http.lua", "typed_config": {"@type": "x"}}
    res = generate(GatewaySettings(extra_http_filters=(extra,)), inputs())
    hcm = res[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.health_check",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.lua",
        "envoy.filters.http.router",
    ]


def test_versions_follow_content_only() -> None:
    a = generate(GatewaySettings(), inputs())
    b = generate(GatewaySettings(), inputs(pods=["10.0.0.1:8000", "10.0.0.2:8000"]))
    c = generate(GatewaySettings(), inputs(pods=["10.0.0.3:8000"]))
    for t in a:
        assert content_hash(a[t]) == content_hash(b[t])
    assert content_hash(a[ENDPOINT_TYPE]) != content_hash(c[ENDPOINT_TYPE])
    assert content_hash(a[LISTENER_TYPE]) == content_hash(c[LISTENER_TYPE])


def test_bad_resource_names_the_field() -> None:
    with pytest.raises(ResourceError, match="no_such_field"):
        to_any({"@type": CLUSTER, "name": "x", "no_such_field": 1})
    with pytest.raises(ValueError, match="not host:port"):
        generate(GatewaySettings(), inputs(extproc=["nohost"]))


def test_inputs_from_a_gateway_config_resolve_pods_like_the_extproc() -> None:
    objs = objects()
    config = GatewayConfig(
        routes=[o for o in objs if o.kind == "ModelRoute"],
        servers=[o for o in objs if o.kind == "ModelServer"],
        endpoints=[
            StaticEndpoint("p1", "10.0.0.1", {"app": "a"}),
            StaticEndpoint("p2", "10.0.0.2:9000", {"app": "b"}),
            StaticEndpoint("p3", "10.0.0.3", {"app": "none"}),
        ],
    )
    got = inputs_from_config(config, ["127.0.0.1:9002"])
    assert list(got.pod_addresses) == ["10.0.0.1:8000", "10.0.0.2:9000"]


def test_usage_filters_come_from_fleet_usage_envoy() -> None:
    from fleet import usage_envoy as usage

    settings = with_policy_filters(GatewaySettings())
    res = generate(settings, inputs())
    hcm = res[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    expected = [f["name"] for f in usage.envoy_http_filters()]
    assert names == [
        "envoy.filters.http.health_check",
        "envoy.filters.http.ext_proc",
        *expected,
        "envoy.filters.http.router",
    ]
    assert [a["name"] for a in hcm["access_log"]] == [a["name"] for a in usage.envoy_access_logs()]
    assert to_any(res[LISTENER_TYPE]["openai"]).value  # Envoy's schema accepts them


def test_static_bootstrap_from_the_same_resources_is_valid_for_envoy(tmp_path: Path) -> None:
    from controllers.xds.generate import GatewaySettings
    from fleet.envoy_eds import write_eds
    from matrixinfer.envoy_config import EnvoySettings, render_bootstrap
    from matrixinfer.process import find_envoy

    eds = tmp_path / "eds" / "pods.json"
    write_eds(eds, "matrixinfer_pods", ["127.0.0.1:8000"])
    for policy_filters in (False, True):
        text = render_bootstrap(
            EnvoySettings(
                9901,
                9002,
                eds,
                GatewaySettings(listen_port=8080, access_log=True),
                policy_filters=policy_filters,
            )
        )
        doc = json.loads(text)
        listener = doc["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["route_config"]["name"] == "openai" and "rds" not in hcm
        pods = doc["static_resources"]["clusters"][1]
        assert pods["eds_cluster_config"]["eds_config"]["path_config_source"]["path"] == str(eds)
        path = tmp_path / f"envoy-{policy_filters}.yaml"
        path.write_text(text)
        out = subprocess.run(
            [find_envoy(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_request_is_reported_to_the_extproc_and_has_an_id() -> None:
    from fleet import usage_envoy as usage

    res = generate(GatewaySettings(), inputs())
    hcm = res[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    # one gRPC access log, to the extproc, for every request but health checks
    assert hcm["access_log"] == usage.envoy_access_logs(EXTPROC_CLUSTER)
    (als,) = hcm["access_log"]
    assert als["filter"] == {"not_health_check_filter": {}}
    assert als["typed_config"]["additional_request_headers_to_log"] == list(usage.LOGGED_HEADERS)
    assert hcm["preserve_external_request_id"] is True
    assert hcm["always_set_request_id_in_response"] is True
    off = generate(GatewaySettings(request_log=False, health_path=""), inputs())
    hcm = off[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "access_log" not in hcm
    assert hcm["http_filters"][0]["name"] == "envoy.filters.http.ext_proc"


def test_every_attempt_at_a_pod_is_reported_for_passive_health() -> None:
    from fleet import usage_envoy as usage

    res = generate(GatewaySettings(), inputs())
    hcm = res[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    router = hcm["http_filters"][-1]
    assert router["name"] == "envoy.filters.http.router"
    (log,) = router["typed_config"]["upstream_log"]
    assert log["typed_config"]["common_config"]["log_name"] == usage.ATTEMPTS_LOG_NAME
    assert log["typed_config"]["additional_request_headers_to_log"] == [usage.SERVER_HEADER]
    off = generate(GatewaySettings(request_log=False), inputs())
    hcm = off[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "upstream_log" not in hcm["http_filters"][-1]["typed_config"]


def test_slow_client_timeouts_and_max_duration() -> None:
    docs = DOCS.replace("    timeout: 1500ms\n", "    timeout: 1500ms\n    maxDuration: 90s\n", 1)
    objs = list(crds.load_documents(docs, "test.yaml"))
    given = XdsInputs(
        routes=[o for o in objs if o.kind == "ModelRoute"],
        servers=[o for o in objs if o.kind == "ModelServer"],
    )
    settings = GatewaySettings(request_headers_timeout_s=3, request_body_idle_timeout_s=70)
    res = generate(settings, given)
    hcm = res[LISTENER_TYPE]["openai"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["request_headers_timeout"] == "3s"
    assert hcm["stream_idle_timeout"] == "300s"
    routes = res[ROUTE_TYPE]["openai"]["virtual_hosts"][0]["routes"]
    by_name = {r["name"]: r["route"] for r in routes}
    # before the extproc routes a request it is on the default route: the body idle limit
    assert by_name["default"]["idle_timeout"] == "70s"
    # once routed, the answer's silences get the stream idle timeout (streams are not cut)
    server = by_name["modelserver/ns/a"]
    assert server["idle_timeout"] == "300s"
    assert server["max_stream_duration"] == {"max_stream_duration": "90s"}
    # a request waits in silence (fair queue, or a ModelServer with no ready pod) up to
    # max_message_timeout (the longest queue.maxWait, 60 s by default, + 5 s): the body idle
    # limit never undercuts it, policies or not
    held = generate(replace(settings, request_body_idle_timeout_s=7), given)
    routes = held[ROUTE_TYPE]["openai"]["virtual_hosts"][0]["routes"]
    assert routes[-1]["route"]["idle_timeout"] == "65s"
    # fail-open: requests may stay on the default route while their answer streams
    open_ = generate(GatewaySettings(fail_open=True), given)
    routes = open_[ROUTE_TYPE]["openai"]["virtual_hosts"][0]["routes"]
    assert routes[-1]["route"]["idle_timeout"] == "300s"


def test_json_access_line_fits_envoys_schema_and_bad_formats_are_named() -> None:
    res = generate(GatewaySettings(access_log=True, access_log_format="json"), inputs())
    listener = res[LISTENER_TYPE]["openai"]
    assert to_any(listener).value  # Envoy's own protobuf schema accepts it
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    stdout = next(x for x in hcm["access_log"] if x["name"] == "envoy.access_loggers.stdout")
    assert stdout["typed_config"]["log_format"] == {"json_format": ACCESS_LOG_JSON_FIELDS}
    with pytest.raises(ValueError, match="access_log_format 'xml': expected text or json"):
        generate(GatewaySettings(access_log=True, access_log_format="xml"), inputs())


def test_grpc_calls_go_to_the_pods_grpc_ports_over_http2() -> None:
    res = generate(
        GatewaySettings(),
        XdsInputs(pod_addresses=["10.0.0.1:8000"], grpc_pod_addresses=["10.0.0.1:8001"]),
    )
    grpc_route = res[ROUTE_TYPE]["openai"]["virtual_hosts"][0]["routes"][0]
    assert grpc_route["match"] == {"prefix": "/inference.GRPCInferenceService/", "grpc": {}}
    assert grpc_route["route"]["cluster"] == "matrixinfer_pods_grpc"
    cluster = res[CLUSTER]["matrixinfer_pods_grpc"]
    options = cluster["typed_extension_protocol_options"]
    assert options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"
    ] == {"http2_protocol_options": {}}
    assert "typed_extension_protocol_options" not in res[CLUSTER]["matrixinfer_pods"]
    eds = res[ENDPOINT_TYPE]["matrixinfer_pods_grpc"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eds] == [8001]
