"""The console in the chart: its RBAC covers exactly what the real console asks of the API server
(recorded on the emulated API server while a user creates, reads, updates and deletes a
deployment, reads its pods, events and log, and asks for recommendations), and its command
parses with the console's own parser."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import yaml

from tests.console.conftest import Console, console, console_extra  # noqa: F401 (fixtures)

from .chart import NAMESPACE, objects
from .test_rbac_recorded import Call, allowed, call_of, granted

pytestmark = pytest.mark.timeout(120)

NS = "ns"  # the namespace the console fixture serves
FORM = {
    "name": "chat",
    "modelURI": "hf://Qwen/Qwen2.5-7B-Instruct",
    "backendType": "vLLM",
    "gpus": 1,
    "replicas": 1,
}


def console_roles() -> list[dict[str, Any]]:
    values = {"watchNamespace": NS, "console": {"enabled": True}}
    return [
        o
        for o in objects(values, namespace=NS)
        if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"].endswith("-console")
    ]


async def test_console_requests_are_granted_and_every_grant_is_used(
    console: Console,  # noqa: F811
) -> None:
    requests = console.api.k._requests
    mine: set[int] = set()  # the test's own requests (kubectl's part), not the console's
    start = len(requests)

    async def as_kubectl(method: str, path: str, body: dict[str, Any]) -> None:
        before = len(requests)
        await console.api.request(method, path, body)
        mine.update(range(before, len(requests)))

    status, body = await console.call("POST", "/api/deployments", json={"form": FORM})
    assert status == 201, body
    pod = {
        "metadata": {
            "name": "chat-main-0",
            "namespace": NS,
            "labels": {"workload.matrixinfer.ai/model-infer": "chat-main"},
        },
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    }
    await as_kubectl("POST", f"/api/v1/namespaces/{NS}/pods", pod)
    status, got = await console.call("GET", "/api/deployments/chat")
    assert status == 200, got
    assert (await console.call("GET", "/api/deployments"))[0] == 200
    status, text = await console.call("GET", "/api/deployments/chat/logs")
    assert status == 200 and "engine started" in text
    doc = got["model"]
    doc["spec"]["backends"][0]["minReplicas"] = 2
    status, body = await console.call(
        "PUT", "/api/deployments/chat", json={"yaml": yaml.safe_dump(doc)}
    )
    assert status == 200, body
    assert (await console.call("GET", "/api/gpus"))[0] == 200
    assert (await console.call("DELETE", "/api/deployments/chat"))[0] == 200

    calls: list[Call] = []
    for i, request in enumerate(list(requests)[start:], start):
        call = call_of(request)
        if i not in mine and call is not None:
            calls.append(call)
    used = {(c.group, c.resource, c.verb) for c in calls}
    assert ("authentication.k8s.io", "tokenreviews", "create") in used
    assert ("authorization.k8s.io", "subjectaccessreviews", "create") in used
    roles = console_roles()
    assert {r["kind"] for r in roles} == {"Role", "ClusterRole"}
    denied = sorted({str(c) for c in calls if not allowed(c, roles)})
    assert not denied, f"the chart's console RBAC denies: {denied}"
    assert granted(roles) - used == set(), "granted but unused"


def test_console_command_parses_and_points_at_the_release() -> None:
    from console.main import add_arguments

    objs = objects({"console": {"enabled": True}})
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and "console" in o["metadata"]["name"]]
    program, sub, *argv = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert (program, sub) == ("matrixinfer", "console")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    assert args.host == "0.0.0.0"
    assert args.namespace == NAMESPACE
    assert args.gateway == f"http://mi-matrixinfer-gateway.{NAMESPACE}.svc:80"
    assert args.gateway_metrics == f"http://mi-matrixinfer-extproc.{NAMESPACE}.svc:9090/metrics"
    assert not args.local_token  # Kubernetes TokenReview / SubjectAccessReview
    services = {o["metadata"]["name"] for o in objs if o["kind"] == "Service"}
    assert "mi-matrixinfer-console" in services
    # off by default
    assert not [o for o in objects({}) if "console" in o["metadata"]["name"]]


def test_notes_show_the_console_when_enabled() -> None:
    from .chart import render

    notes = render({"console": {"enabled": True}})["matrixinfer/templates/NOTES.txt"]
    assert "port-forward svc/mi-matrixinfer-console 8090:80" in notes
    assert "console" not in render({})["matrixinfer/templates/NOTES.txt"]


def test_gateway_api_mode_needs_the_gateway_url() -> None:
    import helm_python as helm

    values: dict[str, Any] = {
        "console": {"enabled": True},
        "envoy": {"mode": "gatewayAPI", "gatewayAPI": {"inferencePool": {"selector": {"a": "b"}}}},
    }
    with pytest.raises(helm.HelmError, match=r"console\.gatewayURL"):
        objects(values)
    values["console"]["gatewayURL"] = "http://inference-gateway.gw.svc"
    (dep,) = [
        o
        for o in objects(values)
        if o["kind"] == "Deployment" and "console" in o["metadata"]["name"]
    ]
    assert (
        "--gateway=http://inference-gateway.gw.svc"
        in dep["spec"]["template"]["spec"]["containers"][0]["command"]
    )
