"""The Python side of the API: public surface, the attribute contract other parts code against,
helpers, and errors that name the source, kind, object and field."""

from __future__ import annotations

import pytest

import crds
from crds.common import parse_duration, resolve_int_or_percent
from crds.networking import WorkloadPort

ROUTE = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata:
  name: chat
  namespace: llm
  resourceVersion: "42"
  generation: 3
  uid: 0b0e
  creationTimestamp: "2025-01-01T00:00:00Z"
  managedFields: [{manager: kubectl}]
spec:
  modelName: llama
  loraAdapters: [sql]
  parentRefs: [{name: gw}]
  rules:
    - name: gold
      match:
        headers: {x-tenant: {exact: gold}}
        uri: {prefix: /v1/}
      targets:
        - {modelServerName: a, weight: 70}
        - {modelServerName: b, weight: 30}
  rateLimit:
    inputTokensPerUnit: 100
    global: {redis: {address: "redis:6379", passwordSecretRef: {name: s}}}
  access: {tenants: [gold]}
  queue: {maxWait: 10s}
"""


def test_public_surface_is_pinned() -> None:
    assert sorted(crds.__all__) == sorted(
        [
            "KINDS",
            "Access",
            "ApiModel",
            "AutoscalingPolicy",
            "AutoscalingPolicySpec",
            "CelRule",
            "Condition",
            "InvalidObject",
            "Model",
            "ModelInfer",
            "ModelInferSpec",
            "ModelRoute",
            "ModelRouteSpec",
            "ModelServer",
            "ModelServerSpec",
            "ModelSpec",
            "ObjectMeta",
            "RateLimit",
            "Resource",
            "Role",
            "RouteRule",
            "RouteTarget",
            "SchedulerPlugin",
            "StringMatch",
            "dump_documents",
            "load_documents",
            "parse_duration",
            "parse_object",
            "resolve_int_or_percent",
            "to_dict",
        ]
    )
    for name in crds.__all__:
        assert hasattr(crds, name)
    assert issubclass(crds.InvalidObject, ValueError)


def test_model_route_contract() -> None:
    (route,) = crds.load_documents(ROUTE, "route.yaml")
    assert isinstance(route, crds.ModelRoute)
    assert route.api_version == "networking.matrixinfer.ai/v1alpha1"
    assert route.kind == "ModelRoute"
    meta = route.metadata
    assert (meta.name, meta.namespace, meta.generation) == ("chat", "llm", 3)
    assert (meta.resource_version, meta.uid) == ("42", "0b0e")
    s = route.spec
    assert s.model_name == "llama" and s.lora_adapters == ["sql"]
    assert s.parent_refs is not None and s.parent_refs[0].name == "gw"
    assert s.parent_refs[0].kind == "Gateway"
    rule = s.rules[0]
    assert rule.name == "gold" and rule.match is not None
    assert rule.match.headers is not None
    assert rule.match.headers["x-tenant"].exact == "gold"
    assert rule.match.uri is not None and rule.match.uri.prefix == "/v1/"
    assert rule.match.uri.matches("/v1/chat") and not rule.match.uri.matches("/v2")
    assert [(t.model_server_name, t.weight) for t in rule.targets] == [("a", 70), ("b", 30)]
    rl = s.rate_limit
    assert rl is not None
    assert (rl.input_tokens_per_unit, rl.output_tokens_per_unit, rl.requests_per_unit) == (
        100,
        None,
        None,
    )
    assert (rl.unit, rl.scope) == ("minute", "route")
    assert rl.global_ is not None and rl.global_.redis.address == "redis:6379"
    assert rl.global_.redis.password_secret_ref is not None
    assert rl.global_.redis.password_secret_ref.key == "password"
    assert s.access is not None and s.access.tenants == ["gold"]
    assert s.queue is not None
    assert (s.queue.max_queued, s.queue.max_wait, s.queue.priority_header) == (1000, "10s", None)
    out = crds.to_dict(route)
    assert out["spec"]["rateLimit"]["global"]["redis"]["address"] == "redis:6379"
    assert out["metadata"]["managedFields"] == [{"manager": "kubectl"}]


def test_model_server_and_model_infer_contract() -> None:
    server = crds.ModelServer.model_validate(
        {
            "metadata": {"name": "pd"},
            "spec": {
                "inferenceEngine": "SGLang",
                "workloadSelector": {
                    "matchLabels": {"app": "x"},
                    "pdGroup": {
                        "groupKey": "g",
                        "prefillLabels": {"r": "p"},
                        "decodeLabels": {"r": "d"},
                    },
                },
                "workloadPort": {"port": 30000},
                "trafficPolicy": {"timeout": "30s", "retry": {"attempts": 2}},
                "kvConnector": {"type": "sglang"},
                "scheduler": {"scorers": [{"name": "prefix-cache", "args": {"k": 1}}]},
            },
        }
    )
    s = server.spec
    assert s.inference_engine == "SGLang" and s.model is None
    assert s.workload_selector.match_labels == {"app": "x"}
    assert s.workload_selector.pd_group is not None
    assert s.workload_selector.pd_group.group_key == "g"
    assert (s.workload_port.port, s.workload_port.protocol) == (30000, "http")
    assert s.traffic_policy is not None and s.traffic_policy.retry is not None
    assert s.traffic_policy.retry.retry_on == ["connect-failure", "refused-stream"]
    assert s.kv_connector is not None and s.kv_connector.type == "sglang"
    assert s.scheduler is not None and s.scheduler.scorers is not None
    assert (s.scheduler.scorers[0].weight, s.scheduler.scorers[0].args) == (None, {"k": 1})

    pod = {"spec": {"containers": [{"name": "engine", "image": "x"}]}}
    infer = crds.ModelInfer(
        metadata=crds.ObjectMeta(name="m"),
        spec=crds.ModelInferSpec.model_validate(
            {"template": {"roles": [{"name": "decode", "entryTemplate": pod}]}}
        ),
    )
    spec = infer.spec
    assert spec.replicas == 1 and spec.recovery_policy == "RoleRecreate"
    role = spec.template.roles[0]
    assert (role.name, role.replicas, role.worker_replicas, role.worker_template) == (
        "decode",
        1,
        0,
        None,
    )
    assert role.entry_template == pod
    assert spec.template.restart_grace_period_seconds is None
    assert spec.template.gang_policy is None
    ro = spec.rollout_strategy
    assert (ro.type, ro.max_unavailable, ro.partition) == ("GroupRollingUpdate", 1, 0)
    assert crds.to_dict(infer)["apiVersion"] == "workload.matrixinfer.ai/v1alpha1"


def test_construct_by_attribute_name_or_alias() -> None:
    a = crds.RouteTarget(model_server_name="a", weight=5)
    b = crds.RouteTarget.model_validate({"modelServerName": "a", "weight": 5})
    assert a == b


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert crds.parse_duration is parse_duration


@pytest.mark.parametrize("text", ["", "30", "5 m", "1d", "-1s", "s", "1h 30m", "1.s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "total", "up", "want"),
    [
        (3, 10, True, 3),
        ("25%", 10, True, 3),
        ("25%", 10, False, 2),
        ("100%", 7, False, 7),
        ("0%", 9, True, 0),
        ("50%", 0, True, 0),
    ],
)
def test_resolve_int_or_percent(value: int | str, total: int, up: bool, want: int) -> None:
    assert resolve_int_or_percent(value, total, round_up=up) == want


def test_resolve_int_or_percent_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        resolve_int_or_percent("abc", 10, round_up=True)


def test_invalid_object_message_names_source_kind_name_and_field() -> None:
    bad = ROUTE.replace("weight: 30", "weight: 30, port: 1").replace("maxWait: 10s", "maxWait: 1d")
    with pytest.raises(crds.InvalidObject) as info:
        crds.load_documents(bad, "examples/x.yaml")
    exc = info.value
    assert (exc.source, exc.kind, exc.name) == ("examples/x.yaml", "ModelRoute", "chat")
    assert str(exc).startswith('examples/x.yaml: ModelRoute "chat": ')
    assert ("spec.rules[0].targets[1].port", "unknown field") in exc.errors
    assert any(p == "spec.queue.maxWait" and "'1d'" in m for p, m in exc.errors)


def test_rule_error_has_the_api_server_message() -> None:
    bad = ROUTE.replace(", weight: 30", "")
    with pytest.raises(crds.InvalidObject) as info:
        crds.load_documents(bad, "examples/x.yaml")
    assert str(info.value) == (
        'examples/x.yaml: ModelRoute "chat": spec.rules[0].targets: '
        "weights must be set on all targets or on none"
    )


def test_unknown_kind_and_bad_documents() -> None:
    with pytest.raises(crds.InvalidObject, match=r"unknown apiVersion/kind v1/Pod"):
        crds.parse_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
    with pytest.raises(crds.InvalidObject, match=r"unknown apiVersion/kind"):
        crds.parse_object(
            {"apiVersion": "networking.matrixinfer.ai/v2", "kind": "ModelRoute", "spec": {}}
        )
    with pytest.raises(crds.InvalidObject, match=r"f.yaml: object: a document must be a mapping"):
        crds.load_documents("- 1\n- 2\n", "f.yaml")
    with pytest.raises(crds.InvalidObject, match=r"f.yaml: object: invalid YAML"):
        crds.load_documents("a: [1\n", "f.yaml")
    with pytest.raises(crds.InvalidObject, match=r'ModelRoute "chat": spec: required field'):
        crds.parse_object(
            {
                "apiVersion": "networking.matrixinfer.ai/v1alpha1",
                "kind": "ModelRoute",
                "metadata": {"name": "chat"},
            }
        )


def test_load_documents_skips_empty_documents() -> None:
    objs = crds.load_documents(f"---\n{ROUTE}\n---\n---\n", "f.yaml")
    assert len(objs) == 1


def test_kinds_table() -> None:
    assert set(crds.KINDS) == {
        "ModelRoute",
        "ModelServer",
        "ModelInfer",
        "Model",
        "AutoscalingPolicy",
    }
    for kind, cls in crds.KINDS.items():
        assert cls.model_fields["kind"].default == kind


@pytest.mark.parametrize("grpc_port", [0, 65536, "eight"])
def test_workload_port_grpc_port_is_a_port_number(grpc_port: object) -> None:
    with pytest.raises(ValueError, match="grpcPort"):
        WorkloadPort.model_validate({"port": 8000, "grpcPort": grpc_port})
    ok = WorkloadPort.model_validate({"port": 8000, "grpcPort": 8001})
    assert (ok.port, ok.grpc_port) == (8000, 8001)
    assert WorkloadPort.model_validate({"port": 8000}).grpc_port is None
