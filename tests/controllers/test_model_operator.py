"""The Model controller in the real Kopf operator against the emulated API server (kmock), with
the ModelInfer controller and a fake kubelet making the generated pods ready."""

from __future__ import annotations

import copy
import urllib.request
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from matrixinfer.process import free_port
from matrixinfer.testing.kube import Api, Kubelet, eventually, operator

pytestmark = pytest.mark.timeout(180)

MI = "workload.matrixinfer.ai/v1alpha1/modelinfers"
MS = "networking.matrixinfer.ai/v1alpha1/modelservers"
MR = "networking.matrixinfer.ai/v1alpha1/modelroutes"
AP = "registry.matrixinfer.ai/v1alpha1/autoscalingpolicies"
KIND_PATHS = {"ModelInfer": MI, "ModelServer": MS, "ModelRoute": MR, "AutoscalingPolicy": AP}


def model_object(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "backends": [
            {
                "name": "fast",
                "type": "vLLM",
                "modelURI": "hf://org/llama",
                "image": "vllm:1",
                "minReplicas": 1,
                "maxReplicas": 3,
                "routeWeight": 70,
            },
            {
                "name": "cheap",
                "type": "SGLang",
                "modelURI": "pvc://weights/llama",
                "minReplicas": 1,
                "routeWeight": 30,
            },
        ],
        "loraAdapters": [{"name": "sql", "uri": "hf://org/sql-lora"}],
        "autoscalingPolicy": {"spec": {"metrics": [{"name": "gpu", "targetValue": 0.8}]}},
    }
    base.update(spec)
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "llama", "namespace": "ns"},
        "spec": base,
    }


def children(api: Api) -> dict[str, set[str]]:
    return {kind: set(api.objects(path)) for kind, path in KIND_PATHS.items()}


def conditions(api: Api, name: str = "llama") -> dict[str, dict[str, Any]]:
    st = (api.model(name) or {}).get("status") or {}
    return {c["type"]: c for c in st.get("conditions") or []}


def all_children() -> dict[str, set[str]]:
    return {
        "ModelInfer": {"llama-fast", "llama-cheap"},
        "ModelServer": {"llama-fast", "llama-cheap"},
        "ModelRoute": {"llama"},
        "AutoscalingPolicy": {"llama"},
    }


def active(api: Api) -> bool:
    conds = conditions(api)
    return (conds.get("Active") or {}).get("status") == "True" and (
        conds.get("Initialized") or {}
    ).get("status") == "True"


async def test_apply_creates_owned_children_and_status(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_model(model_object())
        await eventually(lambda: children(api) == all_children(), what="every child")
        await eventually(lambda: active(api), what="Initialized and Active")
    for kind, path in KIND_PATHS.items():
        for obj in api.objects(path).values():
            meta = obj["metadata"]
            assert meta["labels"]["registry.matrixinfer.ai/model"] == "llama", (kind, meta)
            (owner,) = meta["ownerReferences"]
            assert owner["uid"] == "uid-llama" and owner["kind"] == "Model"
            assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    mi = api.objects(MI)["llama-fast"]
    assert mi["metadata"]["labels"]["registry.matrixinfer.ai/backend"] == "fast"
    engine = mi["spec"]["template"]["roles"][0]["entryTemplate"]["spec"]["containers"][0]
    assert engine["image"] == "vllm:1"
    assert engine["command"] == ["vllm", "serve"]
    assert engine["args"][:1] == ["/var/cache/matrixinfer/hf/org/llama/main"]
    assert "--enable-lora" in engine["args"]
    cheap = api.objects(MI)["llama-cheap"]["spec"]["template"]["roles"][0]["entryTemplate"]
    (vol,) = [v for v in cheap["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert vol["persistentVolumeClaim"]["claimName"] == "weights"
    route = api.objects(MR)["llama"]["spec"]
    assert route["modelName"] == "llama" and route["loraAdapters"] == ["sql"]
    assert route["rules"][0]["targets"] == [
        {"modelServerName": "llama-fast", "weight": 70},
        {"modelServerName": "llama-cheap", "weight": 30},
    ]
    ms = api.objects(MS)["llama-cheap"]["spec"]
    assert ms["inferenceEngine"] == "SGLang"
    assert ms["workloadSelector"]["matchLabels"] == {
        "workload.matrixinfer.ai/model-infer": "llama-cheap",
        "workload.matrixinfer.ai/entry": "true",
    }
    ap = api.objects(AP)["llama"]["spec"]
    assert ap["homogeneousTarget"]["targetRef"]["name"] == "llama-fast"
    model = api.model("llama")
    assert model is not None
    st = model["status"]
    assert st["observedGeneration"] == 1
    assert st["backends"] == [
        {"name": "fast", "replicas": 1, "readyReplicas": 1},
        {"name": "cheap", "replicas": 1, "readyReplicas": 1},
    ]
    assert conditions(api)["Failed"]["status"] == "False"
    reasons = {e.get("reason") for e in api.objects("v1/events").values()}
    assert {"ChildrenCreated", "BackendsReady"} <= reasons, reasons


def engine_of(api: Api, name: str) -> dict[str, Any]:
    mi = api.objects(MI)[name]
    return dict(mi["spec"]["template"]["roles"][0]["entryTemplate"]["spec"]["containers"][0])


async def test_edited_backend_patches_its_children(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        obj = model_object()
        await api.create_model(obj)
        await eventually(lambda: active(api), what="Active")
        before = api.objects(MI)["llama-cheap"]["metadata"]["uid"]
        backends = copy.deepcopy(obj["spec"]["backends"])
        backends[1]["image"] = "sglang:2"
        backends[1]["args"] = ["--mem-fraction-static=0.8"]
        backends[0]["routeWeight"] = 50
        backends[1]["routeWeight"] = 50
        await api.patch_model("llama", {"backends": backends})
        await eventually(
            lambda: engine_of(api, "llama-cheap")["image"] == "sglang:2", what="image patched"
        )
        assert engine_of(api, "llama-cheap")["args"][-1] == "--mem-fraction-static=0.8"
        await eventually(
            lambda: (
                [t["weight"] for t in api.objects(MR)["llama"]["spec"]["rules"][0]["targets"]]
                == [50, 50]
            ),
            what="route weights patched",
        )
        assert api.objects(MI)["llama-cheap"]["metadata"]["uid"] == before  # patched, not new

        def rolled_out() -> bool:
            pods = [p for n, p in api.pods().items() if n.startswith("llama-cheap-")]
            return bool(pods) and all(
                p["spec"]["containers"][0]["image"] == "sglang:2" for p in pods
            )

        await eventually(rolled_out, 60, "the ModelInfer controller to roll out the new image")
        await eventually(
            lambda: (api.model("llama") or {}).get("status", {}).get("observedGeneration") == 2,
            what="observedGeneration 2",
        )


async def test_hand_edited_child_is_put_back(api: Api, kubelet: Kubelet) -> None:
    async with operator(api, resync_seconds=600):  # the watch restores it, not a resync
        await api.create_model(model_object())
        await eventually(lambda: children(api) == all_children(), what="every child")
        path = f"/apis/{MS.replace('modelservers', 'namespaces/ns/modelservers')}/llama-fast"
        await api.request(
            "PATCH", path, {"spec": {"workloadPort": {"port": 9999}, "model": "other"}}
        )
        await eventually(
            lambda: (
                api.objects(MS)["llama-fast"]["spec"]["workloadPort"]["port"] == 8000
                and "model" not in api.objects(MS)["llama-fast"]["spec"]
            ),
            what="the port restored and the added field removed",
        )
        mi_path = f"/apis/{MI.replace('modelinfers', 'namespaces/ns/modelinfers')}/llama-cheap"
        await api.request("PATCH", mi_path, {"spec": {"replicas": 5}})  # not autoscaled
        await eventually(
            lambda: api.objects(MI)["llama-cheap"]["spec"]["replicas"] == 1,
            what="fixed replicas restored",
        )
        fast_path = mi_path.replace("llama-cheap", "llama-fast")
        await api.request("PATCH", fast_path, {"spec": {"replicas": 2}})  # within 1..3
        await api.request("PATCH", path, {"spec": {"workloadPort": {"port": 9998}}})
        await eventually(
            lambda: api.objects(MS)["llama-fast"]["spec"]["workloadPort"]["port"] == 8000,
            what="a later reconcile",
        )
        assert api.objects(MI)["llama-fast"]["spec"]["replicas"] == 2  # the autoscaler's


async def test_deleted_child_is_recreated(api: Api, kubelet: Kubelet) -> None:
    async with operator(api, resync_seconds=600):  # the watch restores it, not a resync
        await api.create_model(model_object())
        await all_created(api)
        await api.delete("/apis/networking.matrixinfer.ai/v1alpha1/namespaces/ns/modelroutes/llama")
        await api.delete(
            "/apis/registry.matrixinfer.ai/v1alpha1/namespaces/ns/autoscalingpolicies/llama"
        )
        await all_created(api)


async def all_created(api: Api) -> None:
    await eventually(lambda: children(api) == all_children(), what="every child")


async def test_removed_backend_removes_its_children(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        obj = model_object()
        await api.create_model(obj)
        await all_created(api)
        fast = dict(obj["spec"]["backends"][0])
        fast.pop("routeWeight")
        await api.patch_model("llama", {"backends": [fast]})
        await eventually(
            lambda: (
                children(api)
                == {
                    "ModelInfer": {"llama-fast"},
                    "ModelServer": {"llama-fast"},
                    "ModelRoute": {"llama"},
                    "AutoscalingPolicy": {"llama"},
                }
            ),
            what="the cheap backend's children gone",
        )
        targets = api.objects(MR)["llama"]["spec"]["rules"][0]["targets"]
        assert targets == [{"modelServerName": "llama-fast"}]
        # the ModelInfer controller removed the pods of the deleted ModelInfer
        await eventually(
            lambda: not any(n.startswith("llama-cheap-") for n in api.pods()),
            what="the cheap backend's pods gone",
        )


async def test_deleting_the_model_removes_everything(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_model(model_object())
        await eventually(lambda: active(api), what="Active")
        assert api.pods()
        model = api.model("llama")
        assert model is not None
        assert "workload.matrixinfer.ai/finalizer" in model["metadata"]["finalizers"]
        await api.delete_model("llama")
        await eventually(
            lambda: (
                api.model("llama") is None
                and children(api) == {k: set() for k in KIND_PATHS}
                and not api.pods()
            ),
            what="the Model, its children and their pods gone",
        )


async def test_invalid_model_and_taken_names_are_reported_on_failed(
    api: Api, kubelet: Kubelet
) -> None:
    taken = {
        "apiVersion": "networking.matrixinfer.ai/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "llama-cheap", "namespace": "ns", "labels": {"team": "x"}},
        "spec": {
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"app": "mine"}},
            "workloadPort": {"port": 9000},
        },
    }
    bad = model_object()
    bad["spec"]["backends"][0]["modelURI"] = "ftp://nope"
    bad["metadata"]["name"] = "broken"
    async with operator(api):
        await api.request(
            "POST", "/apis/networking.matrixinfer.ai/v1alpha1/namespaces/ns/modelservers", taken
        )
        await api.create_model(model_object())
        await api.create_model(bad)

        def failed(name: str, reason: str) -> dict[str, Any] | None:
            c = conditions(api, name).get("Failed")
            ok = c is not None and c["status"] == "True" and c["reason"] == reason
            return c if ok else None

        cond = await eventually(lambda: failed("llama", "ChildConflict"), what="llama Failed")
        assert "ModelServer llama-cheap exists and belongs to something else" in cond["message"]
        cond = await eventually(lambda: failed("broken", "InvalidSpec"), what="broken Failed")
        assert "spec.backends[0].modelURI" in cond["message"]
        await eventually(lambda: "llama-fast" in api.objects(MS), what="the other children")

        def warned() -> bool:
            events = api.objects("v1/events").values()
            reasons = {e.get("reason") for e in events if e.get("type") == "Warning"}
            return {"ChildConflict", "InvalidSpec"} <= reasons

        await eventually(warned, what="Warning Events for both")
    assert api.objects(MS)["llama-cheap"]["spec"]["workloadPort"]["port"] == 9000  # untouched
    assert not any(n.startswith("broken") for kind in children(api).values() for n in kind)


async def test_model_metrics(api: Api, kubelet: Kubelet) -> None:
    port = free_port()
    async with operator(api, metrics_port=port, metrics_host="127.0.0.1"):
        await api.create_model(model_object())
        await eventually(lambda: active(api), what="Active")

        def scraped() -> dict[str, float] | None:
            url = f"http://127.0.0.1:{port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            out: dict[str, float] = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}"] = s.value
            return out if out.get("matrixinfer_controller_models{condition=Active}") == 1 else None

        m = await eventually(scraped, what="one Active Model in the metrics")
        assert m["matrixinfer_controller_reconcile_duration_seconds_count{controller=model}"] > 0
        assert (
            m["matrixinfer_controller_actions_total{action=create_ModelInfer,controller=model}"]
            == 2
        )
        assert m["matrixinfer_controller_models{condition=Failed}"] == 0


async def test_a_restarted_operator_restores_drift_made_while_it_was_down(
    api: Api, kubelet: Kubelet
) -> None:
    async with operator(api):
        await api.create_model(model_object())
        await eventually(lambda: active(api), what="Active")
    uids = {n: o["metadata"]["uid"] for n, o in api.objects(MS).items()}
    await api.request(
        "PATCH",
        "/apis/networking.matrixinfer.ai/v1alpha1/namespaces/ns/modelservers/llama-fast",
        {"spec": {"workloadPort": {"port": 1}}},
    )
    await api.delete("/apis/networking.matrixinfer.ai/v1alpha1/namespaces/ns/modelroutes/llama")
    async with operator(api, resync_seconds=600):  # resume, not the resync timer
        await eventually(
            lambda: (
                children(api) == all_children()
                and api.objects(MS)["llama-fast"]["spec"]["workloadPort"]["port"] == 8000
            ),
            what="the route recreated and the port restored",
        )
    assert {n: o["metadata"]["uid"] for n, o in api.objects(MS).items()} == uids


def entry_pods(api: Api, infer: str) -> list[dict[str, Any]]:
    return [
        p
        for p in api.pods().values()
        if p["metadata"]["labels"].get("workload.matrixinfer.ai/model-infer") == infer
        and p["metadata"]["labels"].get("workload.matrixinfer.ai/entry") == "true"
    ]


async def test_s3_model_with_two_adapters_runs_downloader_and_sidecar(
    api: Api, kubelet: Kubelet
) -> None:
    """A Model with an s3:// URI and two adapters: its pods (made by the ModelInfer controller)
    fetch the weights in an init container and run the runtime sidecar, whose adapters file is
    the Model's ConfigMap; a changed adapter list patches the ConfigMap and replaces no pod."""
    adapters = [{"name": "sql", "uri": "s3://adapters/sql"}, {"name": "chat", "uri": "hf://o/chat"}]
    secret = {"secretKeyRef": {"name": "s3", "key": "id"}}
    creds = [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": secret}]
    obj = model_object(
        backends=[{"name": "fast", "type": "vLLM", "modelURI": "s3://models/llama", "env": creds}],
        loraAdapters=adapters,
    )
    del obj["spec"]["autoscalingPolicy"]
    async with operator(api, runtime_image="registry.local/matrixinfer:9"):
        await api.create_model(obj)
        await eventually(lambda: active(api), what="Active")
        (pod,) = entry_pods(api, "llama-fast")
        spec = pod["spec"]
        (init,) = spec["initContainers"]
        assert init["name"] == "download" and init["image"] == "registry.local/matrixinfer:9"
        assert init["command"] == ["matrixinfer-downloader"]
        assert init["args"][:3] == ["s3://models/llama", "--cache", "/var/cache/matrixinfer"]
        env = {e["name"]: e for e in init["env"]}
        assert env["AWS_ACCESS_KEY_ID"] == creds[0]
        assert "WORKER_INDEX" in env  # the ModelInfer controller's env reaches it too
        engine, runtime = spec["containers"]
        assert engine["name"] == "engine"
        assert engine["args"][0] == "/var/cache/matrixinfer/s3/models/llama"
        assert runtime["name"] == "runtime" and runtime["image"] == "registry.local/matrixinfer:9"
        assert runtime["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8100}
        args = runtime["args"]
        assert args[args.index("--lora-adapters") + 1] == "/etc/matrixinfer/lora/adapters.yaml"
        (vol,) = [v for v in spec["volumes"] if v["name"] == "lora-adapters"]
        assert vol["configMap"] == {"name": "llama-lora-adapters"}
        assert adapters_in(api) == adapters
        cm = api.objects(CM)["llama-lora-adapters"]["metadata"]
        assert cm["ownerReferences"][0]["uid"] == "uid-llama"

        uid = pod["metadata"]["uid"]
        await api.patch_model("llama", {"loraAdapters": adapters[:1]})
        await eventually(lambda: adapters_in(api) == adapters[:1], what="the ConfigMap patched")
        await eventually(
            lambda: api.objects(MR)["llama"]["spec"]["loraAdapters"] == ["sql"],
            what="the route patched",
        )
        assert [p["metadata"]["uid"] for p in entry_pods(api, "llama-fast")] == [uid]

        # a hand edit of the ConfigMap is put back
        await api.request(
            "PATCH",
            "/api/v1/namespaces/ns/configmaps/llama-lora-adapters",
            {"data": {"adapters.yaml": "[]"}, "metadata": {"resourceVersion": api.next_rv()}},
        )
        await eventually(lambda: adapters_in(api) == adapters[:1], what="the ConfigMap restored")
        # deleting the Model deletes it
        await api.delete_model("llama")
        await eventually(lambda: not api.objects(CM), what="the ConfigMap deleted")


CM = "v1/configmaps"


def adapters_in(api: Api) -> Any:
    cm = api.objects(CM).get("llama-lora-adapters")
    return yaml.safe_load(cm["data"]["adapters.yaml"]) if cm else None
