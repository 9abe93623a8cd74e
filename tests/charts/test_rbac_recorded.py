"""RBAC covers what the components call: the real operator (with the ADS server in its process,
as the chart runs it) and the extproc's Kubernetes source with policies run against the emulated
API server (kmock); every API request they make is checked against the chart's Roles and
ClusterRoles (rendered for one namespace, the mode the operator runs in here), the way the API
server authorises it (verb from method and URL; a list/watch with a ``metadata.name`` field
selector is authorised against ``resourceNames``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import kmock
import pytest

from fleet.kube import KubeSource
from matrixinfer.process import free_port
from matrixinfer.testing.kube import VERBS, Api, Emulator, Kubelet, declare, eventually, operator
from tests.controllers.fakecluster import make_object
from tests.policies.test_kube_secrets import (
    create_route,
    declare_secrets,
    global_limit,
    key_entry,
    put_secret,
)
from tests.xds.kube import NS, create_pod, create_server, create_service, declare_gateway_kinds

from .chart import objects

pytestmark = pytest.mark.timeout(180)

TEST_CLIENT = "matrixinfer-test-client"  # the test's own requests (kubectl's part) carry this


@dataclass(frozen=True, slots=True)
class Call:
    group: str
    resource: str  # plural[/subresource]
    verb: str
    namespace: str | None
    name: str | None

    def __str__(self) -> str:
        where = f"{self.namespace or '-'}/{self.name or '*'}"
        return f"{self.verb} {self.group or 'core'}/{self.resource} {where}"


def call_of(request: Any) -> Call | None:
    """RBAC attributes of one recorded request; None for discovery (non-resource URLs)."""
    res = request.resource
    if res is None or not res.plural:
        return None
    params = dict(request.params or {})
    name = request.name
    field = params.get("fieldSelector", "")
    if name is None and field.startswith("metadata.name="):
        name = field.removeprefix("metadata.name=")
    method = str(request.method.value if hasattr(request.method, "value") else request.method)
    if method == "GET":
        watch = params.get("watch") in ("true", "1")
        verb = "watch" if watch else "get" if request.name else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "")
        if method == "DELETE":
            verb = "delete" if request.name else "deletecollection"
    plural = res.plural + (f"/{request.subresource}" if request.subresource else "")
    return Call(res.group or "", plural, verb, request.namespace, name)


def allowed(call: Call, roles: list[dict[str, Any]]) -> bool:
    for role in roles:
        ns = role["metadata"].get("namespace")
        if role["kind"] == "Role" and call.namespace != ns:
            continue
        for rule in role["rules"]:
            names = rule.get("resourceNames")
            if (
                call.group in rule["apiGroups"]
                and call.resource in rule["resources"]
                and call.verb in rule["verbs"]
                and (not names or call.name in names)
            ):
                return True
    return False


def chart_roles(component: str) -> list[dict[str, Any]]:
    values = {
        "watchNamespace": NS,
        "extproc": {
            "policies": {
                "enabled": True,
                "apiKeysSecret": "api-keys",
                "routeSecrets": [{"namespace": NS, "name": "redis-auth"}],
            }
        },
    }
    return [
        o
        for o in objects(values, namespace=NS)
        if o["kind"] in ("Role", "ClusterRole") and f"-{component}" in o["metadata"]["name"]
    ]


def granted(roles: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for role in roles
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


_GET = "get beside list/watch: single reads; list already returns the same objects"
# Grants the recorded operator run does not use, each with its reason (the chart says the same).
UNUSED_CONTROLLERS: dict[tuple[str, str, str], str] = {
    **{
        (g, r, "get"): _GET
        for g, r in [
            ("", "pods"),
            ("", "services"),
            ("apps", "controllerrevisions"),
            ("networking.matrixinfer.ai", "modelroutes"),
            ("networking.matrixinfer.ai", "modelservers"),
            ("workload.matrixinfer.ai", "modelinfers"),
            ("kopf.dev", "kopfpeerings"),
            ("scheduling.volcano.sh", "podgroups"),
            ("registry.matrixinfer.ai", "autoscalingpolicies"),
            ("registry.matrixinfer.ai", "models"),
            ("", "configmaps"),
        ]
    },
    **{
        (g, r, v): "the Model controller's children (this run applies no Model: "
        "tests/controllers/test_model_operator.py does)"
        for g, r, v in [
            ("registry.matrixinfer.ai", "models", "patch"),
            ("registry.matrixinfer.ai", "models/status", "patch"),
            ("workload.matrixinfer.ai", "modelinfers", "create"),
            ("workload.matrixinfer.ai", "modelinfers", "delete"),
            ("networking.matrixinfer.ai", "modelroutes", "create"),
            ("networking.matrixinfer.ai", "modelroutes", "patch"),
            ("networking.matrixinfer.ai", "modelroutes", "delete"),
            ("networking.matrixinfer.ai", "modelservers", "create"),
            ("networking.matrixinfer.ai", "modelservers", "patch"),
            ("networking.matrixinfer.ai", "modelservers", "delete"),
            ("registry.matrixinfer.ai", "autoscalingpolicies", "create"),
            ("registry.matrixinfer.ai", "autoscalingpolicies", "delete"),
            ("", "configmaps", "create"),  # the LoRA adapters ConfigMap
            ("", "configmaps", "patch"),
            ("", "configmaps", "delete"),
        ]
    },
    ("registry.matrixinfer.ai", "autoscalingpolicies", "patch"): "Kopf's annotations on a "
    "policy (this run creates none: tests/controllers/test_autoscaling_operator.py does)",
    ("registry.matrixinfer.ai", "autoscalingpolicies/status", "patch"): "the autoscaler's "
    "status (this run creates no policy)",
    ("", "pods", "patch"): "relabel_pods on some rollouts (reconciler.py), not this one",
    ("scheduling.volcano.sh", "podgroups", "patch"): "a changed gangPolicy (patch_podgroups)",
    **{
        ("workload.matrixinfer.ai", "modelinfers/scale", v): "the autoscaler sets replicas"
        for v in ("get", "patch", "update")
    },
}
EXTPROC_READS = [
    ("", "pods"),
    ("", "services"),
    ("", "secrets"),
    ("networking.matrixinfer.ai", "modelroutes"),
    ("networking.matrixinfer.ai", "modelservers"),
]


@contextlib.asynccontextmanager
async def recording_api() -> AsyncIterator[Api]:
    """The emulator with the test's own client marked (its requests are not the components'),
    Volcano's PodGroups and Kopf's peering objects served."""
    async with Emulator() as k, kmock.Server(k) as srv:
        declare(k, volcano=True)
        k.resources["kopf.dev/v1/kopfpeerings"] = kmock.ResourceInfo(
            kind="KopfPeering", namespaced=True, verbs=VERBS
        )
        async with aiohttp.ClientSession(headers={"User-Agent": TEST_CLIENT}) as session:
            api = Api(k, str(srv.url).rstrip("/"), session)
            declare_gateway_kinds(api)
            declare_secrets(api)
            yield api


def component_calls(api: Api, since: int = 0) -> list[Call]:
    calls = []
    for request in list(api.k._requests)[since:]:
        if (request.headers or {}).get("User-Agent") == TEST_CLIENT:
            continue
        call = call_of(request)
        if call is not None:
            calls.append(call)
    return calls


def gang_model_infer(image: str = "x") -> dict[str, Any]:
    tmpl = {"spec": {"schedulerName": "volcano", "containers": [{"name": "e", "image": image}]}}
    roles = [
        {
            "name": "prefill",
            "replicas": 1,
            "workerReplicas": 1,
            "entryTemplate": tmpl,
            "workerTemplate": tmpl,
        },
        {"name": "decode", "replicas": 1, "entryTemplate": tmpl},
    ]
    return make_object(replicas=1, roles=roles, gangPolicy={"minRoleReplicas": {"decode": 1}})


async def test_operator_and_xds_requests_are_granted() -> None:
    """The operator with leader election (Kopf peering, as the chart runs it), gang scheduling,
    scaling, a rollout and deletion; the ADS server in its process."""
    async with recording_api() as api:
        kubelet = Kubelet(api)
        task = asyncio.create_task(kubelet.run())
        try:
            await api.request(
                "POST",
                f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings",
                {
                    "apiVersion": "kopf.dev/v1",
                    "kind": "KopfPeering",
                    "metadata": {"name": "matrixinfer", "namespace": NS,
                                 "resourceVersion": api.next_rv()},
                },
            )  # fmt: skip
            await create_server(api, "pool", {"app": "sim"}, 8000)
            await create_route(api, "r", "m1", None)
            await create_service(api, "mi-matrixinfer-extproc", {"app": "extproc"}, 9002)
            async with operator(
                api,
                xds_port=free_port(),
                xds_args=["--http-port", "0"],
                peering="matrixinfer",
                priority=5,
            ):
                await api.create_modelinfer(gang_model_infer())
                await eventually(lambda: len(api.pods()) == 3, what="one group's pods")
                await api.patch_modelinfer("llama", {"replicas": 2})
                await eventually(lambda: len(api.pods()) == 6, what="two groups' pods")
                new = gang_model_infer(image="y")["spec"]["template"]
                await api.patch_modelinfer("llama", {"template": new})
                await eventually(
                    lambda: (
                        all(p["spec"]["containers"][0]["image"] == "y" for p in api.pods().values())
                        and len(api.pods()) == 6
                    ),
                    what="rolled to the new template",
                )
                await api.delete_modelinfer("llama")
                await eventually(lambda: not api.pods(), what="pods deleted")
                await eventually(lambda: api.modelinfer("llama") is None, what="finalized")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        calls = component_calls(api)
    used = {(c.group, c.resource, c.verb) for c in calls}
    # it did the work the grants are for (peering keep-alives, PodGroups, pods, status)
    for expected in [
        ("kopf.dev", "kopfpeerings", "patch"),
        ("scheduling.volcano.sh", "podgroups", "create"),
        ("", "pods", "create"),
        ("", "pods", "delete"),
        ("workload.matrixinfer.ai", "modelinfers/status", "patch"),
    ]:
        assert expected in used, (expected, sorted(used))
    roles = chart_roles("controllers")
    denied = sorted({str(c) for c in calls if not allowed(c, roles)})
    assert not denied, f"the chart's controllers RBAC denies: {denied}"
    unused = granted(roles) - used
    assert unused == set(UNUSED_CONTROLLERS), (
        "grants nothing here uses (add the reason to UNUSED_CONTROLLERS and the chart's comment, "
        f"or drop the grant): {sorted(unused - set(UNUSED_CONTROLLERS))}; "
        f"listed but used now: {sorted(set(UNUSED_CONTROLLERS) - unused)}"
    )


async def test_extproc_requests_are_granted_and_secrets_only_by_name() -> None:
    async with recording_api() as api:
        await create_pod(api, "sim-0", "127.0.0.1", {"app": "sim"})
        await create_server(api, "pool", {"app": "sim"}, 8000)
        await create_route(api, "limited", "m1", global_limit("127.0.0.1:6379", "redis-auth"))
        await put_secret(api, "api-keys", {"a": key_entry("k1", "t", "u")}, create=True)
        await put_secret(api, "redis-auth", {"password": "pw"}, create=True)
        source = KubeSource(
            api.url,
            lambda config: None,
            namespace=NS,
            debounce=0.01,
            backoff=0.05,
            secrets=[(NS, "api-keys")],
            route_secrets=True,
        )
        source.start()
        try:
            await eventually(lambda: source.status.applied > 0, what="configuration applied")
            await eventually(lambda: (NS, "redis-auth") in source.secrets, what="route Secret")
        finally:
            await source.stop()
        calls = component_calls(api)
    secret_calls = [c for c in calls if c.resource == "secrets"]
    assert {c.name for c in secret_calls} == {"api-keys", "redis-auth"}, secret_calls
    roles = chart_roles("extproc")
    denied = sorted({str(c) for c in calls if not allowed(c, roles)})
    assert not denied, f"the chart's extproc RBAC denies: {denied}"
    unused = granted(roles) - {(c.group, c.resource, c.verb) for c in calls}
    assert unused == {(g, r, "get") for g, r in EXTPROC_READS}, sorted(unused)
    # and an unnamed Secret read would be refused
    assert not allowed(Call("", "secrets", "list", NS, None), roles)
    assert not allowed(Call("", "secrets", "get", NS, "other"), roles)
