"""The REST API against the emulated API server: CRUD of Models, validation errors, TokenReview /
SubjectAccessReview allow and deny, pods, events, logs, recommendations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import yaml

from tests.console.conftest import STRANGER, VIEWER, Console

MODELS = "/apis/registry.matrixinfer.ai/v1alpha1/namespaces/ns/models"
FORM = {
    "name": "chat",
    "modelURI": "hf://Qwen/Qwen2.5-7B-Instruct",
    "backendType": "vLLM",
    "gpus": 2,
    "replicas": 1,
    "contextLength": 8192,
}


async def test_health_needs_no_token(console: Console) -> None:
    assert await console.call("GET", "/api/health", token=None) == (200, {"status": "ok"})


async def test_openapi_document_lists_the_api(console: Console) -> None:
    status, doc = await console.call("GET", "/api/openapi.json", token=None)
    assert status == 200
    for path in ("/api/deployments", "/api/deployments/{name}/logs", "/api/recommendations"):
        assert path in doc["paths"]
    assert "DeploymentForm" in doc["components"]["schemas"]


async def test_missing_and_invalid_tokens_are_401(console: Console) -> None:
    status, body = await console.call("GET", "/api/deployments", token=None)
    assert status == 401 and "bearer token is required" in body["error"]["message"]
    status, body = await console.call("GET", "/api/deployments", token=STRANGER)
    assert status == 401 and "not valid" in body["error"]["message"]
    assert {"kind": "TokenReview", "token": STRANGER} in console.reviews.seen


async def test_rbac_denies_what_the_user_may_not_do(console: Console) -> None:
    status, _ = await console.call("GET", "/api/deployments", token=VIEWER)
    assert status == 200
    status, body = await console.call("POST", "/api/deployments", token=VIEWER, json={"form": FORM})
    assert status == 403
    assert "'viewer' may not create models in namespace 'ns'" in body["error"]["message"]
    assert not console.api.objects("registry.matrixinfer.ai/v1alpha1/models")
    review = [r for r in console.reviews.seen if r.get("verb") == "create"][-1]
    assert review == {
        "kind": "SubjectAccessReview",
        "user": "viewer",
        "namespace": "ns",
        "verb": "create",
        "group": "registry.matrixinfer.ai",
        "resource": "models",
    }
    status, _ = await console.call("DELETE", "/api/deployments/x", token=VIEWER)
    assert status == 403


async def test_create_list_get_update_delete(console: Console) -> None:
    status, body = await console.call("POST", "/api/deployments", json={"form": FORM})
    assert status == 201, body
    assert body["name"] == "chat" and body["phase"] == "Pending"
    stored = console.api.objects("registry.matrixinfer.ai/v1alpha1/models")["chat"]
    backend = stored["spec"]["backends"][0]
    assert backend["modelURI"] == "hf://Qwen/Qwen2.5-7B-Instruct"
    assert backend["config"] == {"tensor-parallel-size": 2, "max-model-len": 8192}
    assert backend["resources"] == {"limits": {"nvidia.com/gpu": 2}}

    status, listed = await console.call("GET", "/api/deployments")
    assert status == 200 and [d["name"] for d in listed] == ["chat"]

    status, got = await console.call("GET", "/api/deployments/chat")
    assert status == 200
    assert got["backends"][0]["name"] == "main" and got["backends"][0]["type"] == "vLLM"

    doc = got["model"]
    doc["spec"]["backends"][0]["minReplicas"] = 3
    doc["spec"]["backends"][0].pop("config")
    status, body = await console.call(
        "PUT", "/api/deployments/chat", json={"yaml": yaml.safe_dump(doc)}
    )
    assert status == 200, body
    stored = console.api.objects("registry.matrixinfer.ai/v1alpha1/models")["chat"]
    assert stored["spec"]["backends"][0]["minReplicas"] == 3
    assert "config" not in stored["spec"]["backends"][0]  # replaced, not merged

    status, body = await console.call("DELETE", "/api/deployments/chat")
    assert status == 200 and body == {"deleted": "chat", "namespace": "ns"}
    assert "chat" not in console.api.objects("registry.matrixinfer.ai/v1alpha1/models")
    status, body = await console.call("GET", "/api/deployments/chat")
    assert status == 404 and "deployment 'chat'" in body["error"]["message"]


async def test_dry_run_previews_the_model_without_creating_it(console: Console) -> None:
    status, body = await console.call("POST", "/api/deployments?dryRun=true", json={"form": FORM})
    assert status == 201, body
    assert yaml.safe_load(body["yaml"]) == body["model"]
    assert body["model"]["kind"] == "Model" and body["model"]["metadata"]["namespace"] == "ns"
    assert not console.api.objects("registry.matrixinfer.ai/v1alpha1/models")


async def test_validation_errors_name_the_field(console: Console) -> None:
    bad = {**FORM, "backendName": "Main_1"}
    status, body = await console.call("POST", "/api/deployments", json={"form": bad})
    assert status == 422
    paths = {f["path"] for f in body["error"]["fields"]}
    assert "spec.backends[0].name" in paths
    assert "'Main_1'" in body["error"]["message"]

    doc = {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "m"},
        "spec": {"backends": [{"name": "a", "type": "vLLM", "modelURI": "ftp://x", "gpu": 1}]},
    }
    body = {"yaml": yaml.safe_dump(doc)}
    status, body = await console.call("POST", "/api/deployments", json=body)
    assert status == 422
    fields = {f["path"]: f["message"] for f in body["error"]["fields"]}
    assert fields["spec.backends[0].gpu"] == "unknown field"
    assert "spec.backends[0].modelURI" in fields

    status, body = await console.call(
        "POST", "/api/deployments", json={"form": {**FORM, "name": "Chat!"}}
    )
    assert status == 422 and body["error"]["fields"][0]["path"] == "metadata.name"

    status, body = await console.call("POST", "/api/deployments", json={"form": {"name": "x"}})
    assert status == 422 and any(f["path"].endswith("modelURI") for f in body["error"]["fields"])
    assert not console.api.objects("registry.matrixinfer.ai/v1alpha1/models")


async def test_pods_events_and_logs_of_a_deployment(console: Console) -> None:
    status, _ = await console.call("POST", "/api/deployments", json={"form": FORM})
    assert status == 201
    for pod, mi in (("chat-main-0", "chat-main"), ("other-main-0", "other-main")):
        await console.api.request(
            "POST",
            "/api/v1/namespaces/ns/pods",
            {
                "metadata": {
                    "name": pod,
                    "namespace": "ns",
                    "labels": {"workload.matrixinfer.ai/model-infer": mi},
                },
                "status": {
                    "phase": "Running",
                    "podIP": "10.0.0.7",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            },
        )
    for i, (kind, name) in enumerate((("Model", "chat"), ("Pod", "chat-main-0"), ("Pod", "x"))):
        await console.api.request(
            "POST",
            "/api/v1/namespaces/ns/events",
            {
                "metadata": {"name": f"ev{i}", "namespace": "ns"},
                "involvedObject": {"kind": kind, "name": name},
                "reason": f"Reason{i}",
                "message": f"message {i}",
                "type": "Normal",
                "lastTimestamp": f"2026-01-01T00:00:0{i}Z",
            },
        )
    status, got = await console.call("GET", "/api/deployments/chat")
    assert status == 200
    pods = got["backends"][0]["pods"]
    assert [(p["name"], p["ready"], p["ip"]) for p in pods] == [("chat-main-0", True, "10.0.0.7")]
    assert [e["reason"] for e in got["events"]] == ["Reason0", "Reason1"]

    status, text = await console.call("GET", "/api/deployments/chat/logs?follow=true")
    assert status == 200 and text == "INFO engine started\nINFO serving on :8000\n"
    status, body = await console.call("GET", "/api/deployments/chat/logs?pod=other-main-0")
    assert status == 404 and "not a pod of deployment 'chat'" in body["error"]["message"]
    log_review = [r for r in console.reviews.seen if r.get("subresource") == "log"]
    assert log_review and log_review[0]["resource"] == "pods"
    status, _ = await console.call("GET", "/api/deployments/chat/logs", token=VIEWER)
    assert status == 403  # the viewer may read Models, not pod logs


async def test_recommendations_over_the_cluster_gpus(console: Console) -> None:
    status, pools = await console.call("GET", "/api/gpus")
    assert status == 200
    assert {(p["product"], p["count"], p["nodes"]) for p in pools} == {
        ("NVIDIA-L4", 4, 2),
        ("NVIDIA-H100-80GB-HBM3", 8, 1),
    }
    status, rec = await console.call(
        "GET",
        "/api/recommendations?model=Qwen/Qwen2.5-7B-Instruct&contextLength=8192&concurrency=8",
    )
    assert status == 200, rec
    best = rec["best"]
    # 7.62e9 x 2 B = 14.19 GiB weights; 57,344 B/token x 8192 x 8 = 3.5 GiB KV; 2 GiB overhead:
    # 19.69 GiB fits one L4 (24 GiB x 0.9 = 21.6 GiB) at 0.70 USD/h
    assert (best["engine"], best["gpu"], best["tensorParallel"]) == ("vllm", "NVIDIA-L4", 1)
    assert best["hourlyCost"] == 0.7
    assert abs(best["memory"]["totalGib"] - 19.69) < 0.01
    status, body = await console.call("GET", "/api/recommendations?model=nope/nope")
    assert status == 404 and body["error"]["fields"][0]["path"] == "model"
    status, _ = await console.call("GET", "/api/recommendations?model=x", token=VIEWER)
    assert status == 403


async def test_catalog_and_runtimes(console: Console) -> None:
    status, body = await console.call("GET", "/api/models?q=qwen2.5-7b")
    assert status == 200
    assert [m["id"] for m in body["catalog"]] == ["Qwen/Qwen2.5-7B-Instruct"]
    status, runtimes = await console.call("GET", "/api/runtimes", token=VIEWER)
    assert status == 200
    assert [r["backendType"] for r in runtimes] == ["vLLM", "SGLang", "vLLMDisaggregated"]
    status, _ = await console.call("GET", "/api/runtimes", token=STRANGER)
    assert status == 401


async def test_names_in_urls_must_be_dns_labels(console: Console) -> None:
    """Names go into the API server's URL paths: anything else is refused before they do."""
    before = len(console.api.k._requests)
    status, body = await console.call("GET", "/api/deployments?namespace=..%2Fkube-system")
    assert status == 422 and body["error"]["fields"][0]["path"] == "query.namespace"
    status, body = await console.call("GET", "/api/deployments/Bad_Name")
    assert status == 422 and body["error"]["fields"][0]["path"] == "path.name"
    status, body = await console.call("GET", "/api/deployments/chat/logs?pod=a%2Fb")
    assert status == 422 and body["error"]["fields"][0]["path"] == "query.pod"
    later = console.api.k._requests[before:]
    assert {r.resource.group for r in later if r.resource} <= {  # reviews only: no names in URLs
        "authentication.k8s.io",
        "authorization.k8s.io",
    }


async def test_reviews_are_reused_within_the_cache_time(console: Console) -> None:
    for _ in range(3):
        status, _ = await console.call("GET", "/api/deployments")
        assert status == 200
    kinds = [r["kind"] for r in console.reviews.seen]
    assert kinds == ["TokenReview", "SubjectAccessReview"]  # once each for three calls


async def test_readiness_and_the_consoles_own_metrics(console: Console) -> None:
    assert await console.call("GET", "/api/ready", token=None) == (200, {"status": "ready"})
    await console.call("GET", "/api/deployments")
    await console.call("GET", "/api/deployments", token=STRANGER)
    status, text = await console.call("GET", "/metrics", token=None)
    assert status == 200
    assert (
        'matrixinfer_console_requests_total{code="200",method="GET",route="/api/deployments"} 1.0'
        in text
    )
    assert (
        'matrixinfer_console_requests_total{code="401",method="GET",route="/api/deployments"} 1.0'
        in text
    )
    # the API server no longer serves Models (as when it is down or the CRD is missing):
    console.api.k.resources.pop("registry.matrixinfer.ai/v1alpha1/models")
    status, body = await console.call("GET", "/api/ready", token=None)
    assert status == 503 and "does not answer" in body["error"]["message"]


async def test_a_followed_log_streams_as_it_grows(console: Console) -> None:
    more = asyncio.Event()

    async def growing() -> AsyncIterator[bytes]:
        yield b"first line\n"
        await more.wait()  # the rest only once the test has seen the first line
        yield b"second line\n"

    console.logs[("ns", "chat-main-0")] = growing
    status, _ = await console.call("POST", "/api/deployments", json={"form": FORM})
    assert status == 201
    await console.api.request(
        "POST",
        "/api/v1/namespaces/ns/pods",
        {
            "metadata": {
                "name": "chat-main-0",
                "namespace": "ns",
                "labels": {"workload.matrixinfer.ai/model-infer": "chat-main"},
            }
        },
    )
    url = console.url + "/api/deployments/chat/logs?follow=true"
    async with console.session.get(url, headers=console.headers()) as r:
        assert r.status == 200
        async with asyncio.timeout(10):
            got = b""
            while b"first line\n" not in got:
                got += await r.content.readany()
        assert b"second" not in got
        more.set()
        got += await r.content.read()
    assert got == b"first line\nsecond line\n"
