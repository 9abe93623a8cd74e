"""The Model planner: what a Model generates, field by field, and the plan against what exists."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import crds
from controllers.model.engine import config_args
from controllers.model.planner import desired, merge_diff, plan
from controllers.model.types import ChildRef
from runtime.sidecar import read_adapters
from tests.controllers.model_cluster import Namespace, foreign, model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def backend(**kw: Any) -> dict[str, Any]:
    return {"name": "main", "type": "vLLM", "modelURI": "hf://org/llama", **kw}


RUNTIME_IMAGE = "ghcr.io/matrixinfer/matrixinfer:test"


def children(spec: dict[str, Any]) -> dict[ChildRef, dict[str, Any]]:
    d = desired(model(spec), runtime_image=RUNTIME_IMAGE)
    assert d.problems == ()
    return {c.ref: c.manifest for c in d.children}


def engine(manifest: dict[str, Any], role: int = 0, entry: bool = True) -> dict[str, Any]:
    r = manifest["spec"]["template"]["roles"][role]
    tmpl = r["entryTemplate"] if entry else r["workerTemplate"]
    return dict(tmpl["spec"]["containers"][0])


def pod(manifest: dict[str, Any], role: int = 0, entry: bool = True) -> dict[str, Any]:
    r = manifest["spec"]["template"]["roles"][role]
    return dict((r["entryTemplate"] if entry else r["workerTemplate"])["spec"])


def containers(manifest: dict[str, Any], role: int = 0) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod(manifest, role)["containers"]}


def mi(spec: dict[str, Any], name: str = "llama-main") -> dict[str, Any]:
    return children(spec)[ChildRef("ModelInfer", name)]


# ---- what is generated -----------------------------------------------------------------------


def test_the_example_generates_every_child_owned_and_labelled() -> None:
    m = crds.load_documents((EXAMPLES / "model.yaml").read_text())[0]
    assert isinstance(m, crds.Model)
    m.metadata.uid = "u1"
    d = desired(m)
    assert d.problems == ()
    assert [str(c.ref) for c in d.children] == [
        "ConfigMap llama-3-8b-lora-adapters",
        "ModelInfer llama-3-8b-vllm-a100",
        "ModelInfer llama-3-8b-sglang-l4",
        "ModelServer llama-3-8b-vllm-a100",
        "ModelServer llama-3-8b-sglang-l4",
        "ModelRoute llama-3-8b",
        "AutoscalingPolicy llama-3-8b",
    ]
    for c in d.children:
        meta = c.manifest["metadata"]
        assert meta["namespace"] == "llm"
        assert meta["labels"]["registry.matrixinfer.ai/model"] == "llama-3-8b"
        if c.ref.kind in ("ModelInfer", "ModelServer"):
            assert meta["labels"]["registry.matrixinfer.ai/backend"] == c.backend
        if c.ref.kind == "ConfigMap":
            continue  # not a kind of our API
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "registry.matrixinfer.ai/v1alpha1",
                "kind": "Model",
                "name": "llama-3-8b",
                "uid": "u1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        crds.parse_object(c.manifest)  # every child is a valid object of its kind


def test_vllm_command_args_config_lora_env_and_resources() -> None:
    spec = {
        "backends": [
            backend(
                image="vllm:9",
                config={"max-model-len": 4096, "enable-prefix-caching": True, "x": False},
                args=["--seed=1"],
                env=[{"name": "A", "value": "1"}],
                resources={"limits": {"nvidia.com/gpu": 2}},
            )
        ],
        "loraAdapters": [{"name": "sql", "uri": "hf://org/sql"}],
    }
    c = engine(mi(spec))
    assert c["image"] == "vllm:9"
    assert c["command"] == ["vllm", "serve"]
    assert c["args"] == [
        "/var/cache/matrixinfer/hf/org/llama/main",
        "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "llama",
        "--enable-lora",
        "--max-model-len", "4096", "--enable-prefix-caching",
        "--seed=1",
    ]  # fmt: skip
    assert c["env"] == [
        {"name": "A", "value": "1"},
        {"name": "HF_HOME", "value": "/var/cache/matrixinfer"},
        {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
    ]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert "readinessProbe" not in c  # the runtime sidecar's /ready is the pod's readiness
    m = mi(spec)
    assert m["spec"]["replicas"] == 1
    assert m["spec"]["template"]["roles"][0]["name"] == "server"
    assert m["spec"]["template"]["roles"][0]["workerReplicas"] == 0


def test_no_adapters_no_lora_flags() -> None:
    c = engine(mi({"backends": [backend()]}))
    assert "--enable-lora" not in c["args"]
    assert [e["name"] for e in c["env"]] == ["HF_HOME"]


def test_default_images_per_engine() -> None:
    assert engine(mi({"backends": [backend()]}))["image"].startswith("vllm/vllm-openai:")
    sg = mi({"backends": [backend(type="SGLang")]})
    assert engine(sg)["image"].startswith("lmsysorg/sglang:")


def test_a_command_replaces_the_engine_and_its_derived_arguments() -> None:
    """A backend's own engine (the simulator): its command, then config, then args as written;
    what would have been derived is in its env for $(VAR)."""
    args = ["--served-model-name", "$(MATRIXINFER_SERVED_MODEL_NAME)", "--port",
            "$(MATRIXINFER_PORT)", "--role", "$(ROLE)"]  # fmt: skip
    workers = [{"type": "prefill"}, {"type": "decode"}]
    spec = {
        "backends": [
            backend(image="mi:1", command=["matrixinfer-sim"], config={"max-num-seqs": 8},
                    args=args, env=[{"name": "MATRIXINFER_PORT", "value": "9"}]),
            backend(name="pd", type="vLLMDisaggregated", command=["matrixinfer-sim"],
                    workers=workers),
        ],
        "loraAdapters": [{"name": "sql", "uri": "hf://org/sql"}],
    }  # fmt: skip
    c = engine(mi(spec))
    assert (c["image"], c["command"]) == ("mi:1", ["matrixinfer-sim"])
    assert c["args"] == ["--max-num-seqs", "8", *args]  # no --enable-lora, no weights
    assert {e["name"]: e.get("value") for e in c["env"]} == {
        "MATRIXINFER_PORT": "9",  # the user's own value wins
        "HF_HOME": "/var/cache/matrixinfer",
        "MATRIXINFER_MODEL_PATH": "/var/cache/matrixinfer/hf/org/llama/main",
        "MATRIXINFER_SERVED_MODEL_NAME": "llama",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    decode = containers(mi(spec, "llama-pd"), role=1)["engine"]
    assert decode["args"] == []  # no --kv-transfer-config either
    assert {"name": "MATRIXINFER_PORT", "value": "8001"} in decode["env"]
    plain = engine(mi({"backends": [backend()]}))
    assert not any(e["name"].startswith("MATRIXINFER_") for e in plain["env"])
    with pytest.raises(ValueError, match="command"):
        crds.parse_object(
            {"apiVersion": "registry.matrixinfer.ai/v1alpha1", "kind": "Model",
             "metadata": {"name": "x"}, "spec": {"backends": [backend(command=[])]}}, "x"
        )  # fmt: skip


def test_config_rendering() -> None:
    assert config_args({"a": 1, "b": True, "c": False, "d": None, "e": [1, 2], "f": {"k": 1}}) == [
        "--a", "1", "--b", "--e", "1", "2", "--f", '{"k":1}'
    ]  # fmt: skip


def test_sglang_multi_pod_role_and_its_worker_pods() -> None:
    spec = {
        "backends": [
            backend(type="SGLang", workers=[{"type": "server", "replicas": 2, "pods": 3}])
        ],
        "loraAdapters": [{"name": "a", "uri": "s3://bucket/a"}],
    }
    m = mi(spec)
    role = m["spec"]["template"]["roles"][0]
    assert role["replicas"] == 2 and role["workerReplicas"] == 2
    entry = engine(m)
    assert entry["command"] == ["python3", "-m", "sglang.launch_server"]
    args = entry["args"]
    assert args[:2] == ["--model-path", "/var/cache/matrixinfer/hf/org/llama/main"]
    assert args[args.index("--nnodes") + 1] == "3"
    assert args[args.index("--node-rank") + 1] == "$(WORKER_INDEX)"
    assert args[args.index("--dist-init-addr") + 1] == "$(ENTRY_ADDRESS):5000"
    assert "--enable-lora" in args and "--lora-paths" not in args
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in {e["name"] for e in entry["env"]}
    worker = engine(m, entry=False)
    assert worker["args"] == args
    assert "readinessProbe" not in worker and "ports" not in worker
    # worker pods download the weights too (each loads its shard) but run no sidecar
    wspec = role["workerTemplate"]["spec"]
    assert [c["name"] for c in wspec["initContainers"]] == ["download"]
    assert [c["name"] for c in wspec["containers"]] == ["engine"]
    assert [v["name"] for v in wspec["volumes"]] == ["cache"]  # no adapters file
    rt = containers(m)["runtime"]
    assert rt["args"][:2] == ["--engine", "sglang"]


@pytest.mark.parametrize(
    ("uri", "model_arg", "volume", "mount"),
    [
        ("hf://org/llama", "/var/cache/matrixinfer/hf/org/llama/main", None, None),
        ("hf://org/llama@v1.0", "/var/cache/matrixinfer/hf/org/llama/v1.0", None, None),
        ("s3://bucket/llama", "/var/cache/matrixinfer/s3/bucket/llama", None, None),
        (
            "pvc://weights/models/llama",
            "/mnt/pvc/weights/models/llama",
            {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            {"name": "pvc-0", "mountPath": "/mnt/pvc/weights", "readOnly": True},
        ),
        (
            "file:///data/llama",
            "/data/llama",
            {"name": "host-0", "hostPath": {"path": "/data/llama"}},
            {"name": "host-0", "mountPath": "/data/llama", "readOnly": True},
        ),
    ],
)
def test_model_uri_schemes(
    uri: str, model_arg: str, volume: dict[str, Any] | None, mount: dict[str, Any] | None
) -> None:
    """The engine reads the weights where the downloader leaves them (fleet.artefacts): in the
    cache for hf:// and s3://, in place for pvc:// and file://; the same mounts in both."""
    m = mi({"backends": [backend(modelURI=uri)]})
    c = engine(m)
    assert c["args"][0] == model_arg
    vols = pod(m)["volumes"]
    assert [v for v in vols if v["name"] != "cache"] == ([volume] if volume else [])
    init = pod(m)["initContainers"][0]
    for container in (c, init):
        assert [x for x in container["volumeMounts"] if x["name"] != "cache"] == (
            [mount] if mount else []
        )
    assert "--load-format" not in c["args"]  # s3:// weights are on disk, not streamed


def test_a_claim_shared_by_the_model_and_adapters_is_mounted_once() -> None:
    spec = {
        "backends": [backend(modelURI="pvc://store/llama")],
        "loraAdapters": [
            {"name": "a", "uri": "pvc://store/loras/a"},
            {"name": "b", "uri": "pvc://other/b"},
            {"name": "c", "uri": "hf://org/c"},
        ],
    }
    m = mi(spec)
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod(m)["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["store", "other"]
    rt = containers(m)["runtime"]
    assert {x["mountPath"] for x in rt["volumeMounts"]} == {
        "/var/cache/matrixinfer", "/mnt/pvc/store", "/mnt/pvc/other", "/etc/matrixinfer/lora"
    }  # fmt: skip


def test_cache_uri_volumes() -> None:
    def cache(uri: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        b = backend(cacheURI=uri) if uri else backend()
        m = mi({"backends": [b]})
        vols = m["spec"]["template"]["roles"][0]["entryTemplate"]["spec"]["volumes"]
        mounts = engine(m)["volumeMounts"]
        return (
            next(v for v in vols if v["name"] == "cache"),
            next(x for x in mounts if x["name"] == "cache"),
        )

    assert cache(None)[0] == {"name": "cache", "emptyDir": {}}
    vol, mount = cache("pvc://hf-cache/llama")
    assert vol["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    assert mount == {"name": "cache", "mountPath": "/var/cache/matrixinfer", "subPath": "llama"}
    vol, _ = cache("hostpath:///srv/cache")
    assert vol["hostPath"] == {"path": "/srv/cache", "type": "DirectoryOrCreate"}


def test_a_pvc_cache_is_made_writable_for_the_runtime_user() -> None:
    assert "securityContext" not in pod(mi({"backends": [backend()]}))
    sc = pod(mi({"backends": [backend(cacheURI="pvc://cache")]}))["securityContext"]
    assert sc == {"fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}


SECRET_ENV = [
    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
    {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"},
]


def test_download_init_container_fetches_the_model_into_the_cache() -> None:
    m = mi({"backends": [backend(modelURI="s3://models/llama", env=SECRET_ENV)]})
    p = pod(m)
    (init,) = p["initContainers"]
    assert init["name"] == "download"
    assert init["image"] == "ghcr.io/matrixinfer/matrixinfer:test"
    assert init["command"] == ["matrixinfer-downloader"]
    assert init["args"] == [
        "s3://models/llama", "--cache", "/var/cache/matrixinfer", "--pvc-root", "/mnt/pvc"
    ]  # fmt: skip
    assert init["env"] == SECRET_ENV  # credentials from the backend's env (a Secret)
    assert init["volumeMounts"] == [{"name": "cache", "mountPath": "/var/cache/matrixinfer"}]
    assert p["volumes"] == [{"name": "cache", "emptyDir": {}}]
    # the engine reads the directory the downloader fills
    assert engine(m)["args"][0] == "/var/cache/matrixinfer/s3/models/llama"
    assert {"name": "cache", "mountPath": "/var/cache/matrixinfer"} in engine(m)["volumeMounts"]


def test_runtime_sidecar_beside_the_engine(tmp_path: Path) -> None:
    adapters = [{"name": "sql", "uri": "hf://org/sql"}, {"name": "chat", "uri": "s3://bkt/chat"}]
    m = mi({"backends": [backend(env=SECRET_ENV)], "loraAdapters": adapters})
    cs = containers(m)
    assert list(cs) == ["engine", "runtime"]  # the engine first: its port is the pod's first
    rt = cs["runtime"]
    assert rt["image"] == "ghcr.io/matrixinfer/matrixinfer:test"
    assert rt["command"] == ["matrixinfer-runtime"]
    assert rt["args"] == [
        "--engine", "vllm", "--engine-url", "http://127.0.0.1:8000", "--port", "8100",
        "--cache", "/var/cache/matrixinfer", "--pvc-root", "/mnt/pvc",
        "--lora-adapters", "/etc/matrixinfer/lora/adapters.yaml",
    ]  # fmt: skip
    assert rt["ports"] == [{"name": "runtime", "containerPort": 8100, "protocol": "TCP"}]
    assert rt["readinessProbe"] == {"httpGet": {"path": "/ready", "port": 8100}, "periodSeconds": 5}
    assert rt["env"] == SECRET_ENV  # it fetches adapters with the same credentials
    assert {"name": "lora-adapters", "mountPath": "/etc/matrixinfer/lora", "readOnly": True} in (
        rt["volumeMounts"]
    )
    # the adapters file is the Model's ConfigMap, which the sidecar re-reads
    (vol,) = [v for v in pod(m)["volumes"] if v["name"] == "lora-adapters"]
    assert vol == {"name": "lora-adapters", "configMap": {"name": "llama-lora-adapters"}}
    cm = children({"backends": [backend()], "loraAdapters": adapters})[
        ChildRef("ConfigMap", "llama-lora-adapters")
    ]
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"] == {"registry.matrixinfer.ai/model": "llama"}
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u-llama"
    assert list(cm["data"]) == ["adapters.yaml"]
    # and the sidecar reads that file as the Model's adapters
    f = tmp_path / "adapters.yaml"
    f.write_text(cm["data"]["adapters.yaml"])
    assert read_adapters(f) == {"sql": "hf://org/sql", "chat": "s3://bkt/chat"}


def test_without_adapters_no_adapters_file() -> None:
    spec = {"backends": [backend()]}
    m = mi(spec)
    rt = containers(m)["runtime"]
    assert "--lora-adapters" not in rt["args"] and "env" not in rt
    assert [v["name"] for v in pod(m)["volumes"]] == ["cache"]
    assert not any(r.kind == "ConfigMap" for r in children(spec))


ONE = [{"name": "a", "uri": "hf://o/a"}]
TWO = [*ONE, {"name": "b", "uri": "hf://o/b"}]


def test_changed_adapters_patch_only_the_configmap() -> None:
    """While the Model has adapters, a changed list is a patch of the ConfigMap: the pod
    templates stay the same, so no pod is replaced (the sidecars load and unload)."""
    ns = Namespace()
    ns.reconcile(model({"backends": [backend()], "loraAdapters": ONE}))
    p = ns.reconcile(model({"backends": [backend()], "loraAdapters": TWO}))
    assert sorted((a.verb, str(a.ref)) for a in p.actions) == [
        ("patch", "ConfigMap llama-lora-adapters"),
        ("patch", "ModelRoute llama"),  # the route names the new adapter
    ]
    a = next(a for a in p.actions if a.ref.kind == "ConfigMap")
    assert a.body is not None and set(a.body) == {"data"}
    cm = ns.objects[ChildRef("ConfigMap", "llama-lora-adapters")]
    assert "name: b" in cm["data"]["adapters.yaml"]
    assert ns.reconcile(model({"backends": [backend()], "loraAdapters": TWO})).actions == ()
    # hand-edited data is put back like any child's spec
    cm["data"] = {"adapters.yaml": "[]", "extra": "x"}
    (a,) = ns.reconcile(model({"backends": [backend()], "loraAdapters": TWO})).actions
    assert a.verb == "patch" and a.body is not None and a.body["data"]["extra"] is None


def test_first_and_last_adapter_roll_the_engines() -> None:
    """Going from no adapters to some (and back) changes the engine (--enable-lora) and the
    sidecar's mounts: the ModelInfer is patched and the ConfigMap created (or deleted)."""
    ns = Namespace()
    ns.reconcile(model({"backends": [backend()]}))
    p = ns.reconcile(model({"backends": [backend()], "loraAdapters": ONE}))
    assert sorted((a.verb, str(a.ref)) for a in p.actions) == [
        ("create", "ConfigMap llama-lora-adapters"),
        ("patch", "ModelInfer llama-main"),
        ("patch", "ModelRoute llama"),
    ]
    p = ns.reconcile(model({"backends": [backend()]}))
    assert sorted((a.verb, str(a.ref)) for a in p.actions) == [
        ("delete", "ConfigMap llama-lora-adapters"),
        ("patch", "ModelInfer llama-main"),
        ("patch", "ModelRoute llama"),
    ]


def test_the_runtime_image_is_a_setting() -> None:
    d = desired(model({"backends": [backend()]}), runtime_image="registry.local/mi:7")
    (infer,) = [c.manifest for c in d.children if c.ref.kind == "ModelInfer"]
    p = pod(infer)
    assert {c["image"] for c in [*p["initContainers"], *p["containers"][1:]]} == {
        "registry.local/mi:7"
    }


def test_pd_proxy_on_decode_entry_pods_holds_the_serving_port() -> None:
    workers = [{"type": "prefill"}, {"type": "decode", "pods": 2}]
    spec = {"backends": [backend(type="vLLMDisaggregated", workers=workers)]}
    m = mi(spec)
    prefill, decode = containers(m, role=0), containers(m, role=1)
    assert list(prefill) == ["engine", "runtime"]
    assert prefill["engine"]["ports"][0]["containerPort"] == 8000
    assert list(decode) == ["engine", "runtime", "pd-proxy"]
    eng = decode["engine"]
    assert eng["args"][eng["args"].index("--port") + 1] == "8001"
    assert eng["ports"] == [{"name": "engine", "containerPort": 8001, "protocol": "TCP"}]
    assert decode["runtime"]["args"][3] == "http://127.0.0.1:8001"
    proxy = decode["pd-proxy"]
    assert proxy["command"] == ["matrixinfer-pd-proxy"]
    assert proxy["args"] == [
        "--engine", "http://127.0.0.1:8001", "--port", "8000", "--connector", "nixl"
    ]  # fmt: skip
    assert proxy["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert proxy["env"][0]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # the ModelServer's port is the proxy's on decode pods and the engine's on prefill pods
    server = children(spec)[ChildRef("ModelServer", "llama-main")]["spec"]
    assert server["workloadPort"]["port"] == 8000
    assert server["kvConnector"] == {"type": "nixl"}
    # decode worker pods: the engine (same port), no sidecar, no proxy
    worker = pod(m, role=1, entry=False)
    assert [c["name"] for c in worker["containers"]] == ["engine"]
    assert worker["containers"][0]["args"] == eng["args"]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"modelURI": "hf://org/x@../y"}, "spec.backends[0].modelURI", "bad revision"),
        ({"modelURI": "s3://B/x"}, "spec.backends[0].modelURI", "bad bucket"),
        ({"modelURI": "file://relative"}, "spec.backends[0].modelURI", "absolute"),
        ({"cacheURI": "pvc:///x"}, "spec.backends[0].cacheURI", "pvc://claim"),
        ({"modelURI": "file:///"}, "spec.backends[0].modelURI", "root"),
        ({"modelURI": "file:///var/cache"}, "spec.backends[0].modelURI", "overlaps"),
        ({"modelURI": "file:///mnt/pvc/x"}, "spec.backends[0].modelURI", "overlaps"),
    ],
)
def test_an_unusable_uri_holds_its_modelinfer_and_names_the_field(
    change: dict[str, Any], field: str, words: str
) -> None:
    d = desired(model({"backends": [backend(**change), backend(name="other")]}))
    (p,) = d.problems
    assert p.reason == "InvalidURI" and p.message.startswith(field + ": ") and words in p.message
    assert d.held == (ChildRef("ModelInfer", "llama-main"),)
    assert ChildRef("ModelInfer", "llama-other") in {c.ref for c in d.children}
    assert ChildRef("ModelServer", "llama-main") in {c.ref for c in d.children}


def test_an_unusable_adapter_uri_holds_every_modelinfer() -> None:
    spec = {
        "backends": [backend(), backend(name="other")],
        "loraAdapters": [{"name": "a", "uri": "s3://UPPER/a"}],
    }
    d = desired(model(spec))
    assert [p.message.split(":")[0] for p in d.problems] == ["spec.loraAdapters[0].uri"]
    assert set(d.held) == {
        ChildRef("ModelInfer", "llama-main"),
        ChildRef("ModelInfer", "llama-other"),
    }


def test_disaggregated_backend_roles_server_and_kv_transfer() -> None:
    m = crds.load_documents((EXAMPLES / "model-disaggregated.yaml").read_text())[0]
    assert isinstance(m, crds.Model)
    m.metadata.uid = "u"
    d = {c.ref: c.manifest for c in desired(m).children}
    infer = d[ChildRef("ModelInfer", "qwen-2-72b-pd")]
    roles = infer["spec"]["template"]["roles"]
    assert [(r["name"], r["replicas"], r["workerReplicas"]) for r in roles] == [
        ("prefill", 2, 0),
        ("decode", 1, 3),
    ]
    args = engine(infer, role=1)["args"]
    kv = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    server = d[ChildRef("ModelServer", "qwen-2-72b-pd")]["spec"]
    assert server["inferenceEngine"] == "vLLM"
    assert server["kvConnector"] == {"type": "nixl"}
    assert server["workloadSelector"]["pdGroup"] == {
        "groupKey": "workload.matrixinfer.ai/group",
        "prefillLabels": {"workload.matrixinfer.ai/role": "prefill"},
        "decodeLabels": {"workload.matrixinfer.ai/role": "decode"},
    }
    # autoscalingPolicy.ref: the referenced policy is the user's; none is generated
    assert not any(r.kind == "AutoscalingPolicy" for r in d)


def test_repeated_worker_types_get_indexed_role_names() -> None:
    workers = [{"type": "server"}, {"type": "server", "pods": 2}]
    roles = mi({"backends": [backend(workers=workers)]})["spec"]["template"]["roles"]
    assert [r["name"] for r in roles] == ["server-0", "server-1"]


def test_route_copies_match_rate_limit_access_and_weights() -> None:
    spec = {
        "backends": [backend(routeWeight=80), backend(name="b", routeWeight=20)],
        "loraAdapters": [{"name": "x", "uri": "hf://o/x"}],
        "modelMatch": {"headers": {"x-team": {"prefix": "ml-"}}},
        "rateLimit": {"inputTokensPerUnit": 10, "unit": "hour", "scope": "user"},
        "access": {"users": ["alice"]},
    }
    route = children(spec)[ChildRef("ModelRoute", "llama")]["spec"]
    assert route["modelName"] == "llama"
    assert route["loraAdapters"] == ["x"]
    (rule,) = route["rules"]
    assert rule["match"] == {"headers": {"x-team": {"prefix": "ml-"}}}
    assert rule["targets"] == [
        {"modelServerName": "llama-main", "weight": 80},
        {"modelServerName": "llama-b", "weight": 20},
    ]
    assert route["rateLimit"] == {
        "inputTokensPerUnit": 10,
        "unit": "hour",
        "scope": "user",
    }
    assert route["access"] == {"users": ["alice"]}


RULES = {"metrics": [{"name": "gpu", "targetValue": 0.8}]}


def test_autoscaling_one_scalable_backend_is_homogeneous() -> None:
    spec = {
        "backends": [backend(minReplicas=0, maxReplicas=4), backend(name="fixed")],
        "autoscalingPolicy": {"spec": RULES},
    }
    d = desired(model(spec))
    ap = next(c for c in d.children if c.ref.kind == "AutoscalingPolicy").manifest["spec"]
    assert ap["metrics"] == [{"name": "gpu", "targetValue": 0.8}]
    assert ap["homogeneousTarget"] == {
        "targetRef": {"kind": "ModelInfer", "name": "llama-main"},
        "minReplicas": 0,
        "maxReplicas": 4,
    }
    bounds = {c.ref.name: c.replica_bounds for c in d.children if c.ref.kind == "ModelInfer"}
    assert bounds == {"llama-main": (0, 4), "llama-fixed": None}


def test_autoscaling_several_backends_is_heterogeneous_by_cost() -> None:
    spec = {
        "backends": [backend(maxReplicas=4, cost=3), backend(name="b", maxReplicas=8)],
        "autoscalingPolicy": {"spec": RULES},
    }
    ap = children(spec)[ChildRef("AutoscalingPolicy", "llama")]["spec"]
    params = ap["heterogeneousTarget"]["params"]
    got = [(p["target"]["name"], p["cost"], p["maxReplicas"]) for p in params]
    assert got == [("llama-main", 3.0, 4), ("llama-b", 1.0, 8)]


def test_autoscaling_with_nothing_to_scale_is_a_problem() -> None:
    d = desired(model({"backends": [backend()], "autoscalingPolicy": {"spec": RULES}}))
    assert [p.reason for p in d.problems] == ["InvalidAutoscaling"]
    assert "spec.autoscalingPolicy.spec" in d.problems[0].message
    assert not any(c.ref.kind == "AutoscalingPolicy" for c in d.children)


def test_an_invalid_generated_child_is_held_and_named() -> None:
    spec = {"backends": [backend(routeWeight=0), backend(name="b", routeWeight=0)]}
    d = desired(model(spec))
    assert d.held == (ChildRef("ModelRoute", "llama"),)
    (p,) = d.problems
    assert p.reason == "InvalidChild"
    assert 'ModelRoute "llama"' in p.message and "weights must add up" in p.message
    ns = Namespace()
    ns.reconcile(model({"backends": [backend(routeWeight=50), backend(name="b", routeWeight=50)]}))
    ns.reconcile(model(spec))
    assert ChildRef("ModelRoute", "llama") in ns.objects  # held: the last good route stays


# ---- the plan --------------------------------------------------------------------------------


SPEC: dict[str, Any] = {
    "backends": [backend(maxReplicas=3), backend(name="b")],
    "autoscalingPolicy": {"spec": RULES},
}


def test_plan_creates_then_converges() -> None:
    ns = Namespace()
    p = ns.reconcile(model(SPEC))
    assert [a.verb for a in p.actions] == ["create"] * 6
    assert len(p.missing) == 6
    again = ns.reconcile(model(SPEC))
    assert again.actions == () and again.missing == () and again.problems == ()


def test_server_defaults_are_not_drift() -> None:
    ns = Namespace()
    ns.reconcile(model(SPEC))
    for obj in ns.objects.values():  # an API server that stores only what it was given
        obj["spec"].pop("recoveryPolicy", None)
        obj["spec"].pop("rolloutStrategy", None)
        obj["spec"].get("workloadPort", {}).pop("protocol", None)
    assert ns.reconcile(model(SPEC)).actions == ()


def test_drift_is_put_back_and_added_fields_removed() -> None:
    ns = Namespace()
    ns.reconcile(model(SPEC))
    ms = ns.objects[ChildRef("ModelServer", "llama-b")]
    ms["spec"]["workloadPort"]["port"] = 1
    ms["spec"]["model"] = "sneaky"
    ms["metadata"]["labels"]["registry.matrixinfer.ai/backend"] = "x"
    ms["metadata"]["labels"]["team"] = "kept"
    (a,) = ns.reconcile(model(SPEC)).actions
    assert a.verb == "patch" and a.ref == ChildRef("ModelServer", "llama-b")
    assert a.body == {
        "spec": {"workloadPort": {"port": 8000}, "model": None},
        "metadata": {"labels": {"registry.matrixinfer.ai/backend": "b"}},
    }
    assert ns.objects[ChildRef("ModelServer", "llama-b")]["metadata"]["labels"]["team"] == "kept"


def test_replicas_within_the_bounds_belong_to_the_autoscaler() -> None:
    ns = Namespace()
    ns.reconcile(model(SPEC))
    scaled = ns.objects[ChildRef("ModelInfer", "llama-main")]["spec"]
    fixed = ns.objects[ChildRef("ModelInfer", "llama-b")]["spec"]
    scaled["replicas"], fixed["replicas"] = 3, 3
    (a,) = ns.reconcile(model(SPEC)).actions
    assert a.ref == ChildRef("ModelInfer", "llama-b") and a.body == {"spec": {"replicas": 1}}
    scaled["replicas"] = 9
    (a,) = ns.reconcile(model(SPEC)).actions
    assert a.body == {"spec": {"replicas": 3}}  # clamped to maxReplicas


def test_removed_backend_children_are_deleted_route_patched() -> None:
    ns = Namespace()
    ns.reconcile(model(SPEC))
    one = copy.deepcopy(SPEC)
    one["backends"] = one["backends"][:1]
    p = ns.reconcile(model(one))
    assert sorted((a.verb, str(a.ref)) for a in p.actions) == [
        ("delete", "ModelInfer llama-b"),
        ("delete", "ModelServer llama-b"),
        ("patch", "ModelRoute llama"),
    ]


def test_other_owners_are_never_touched() -> None:
    ns = Namespace()
    taken = foreign("ModelServer", "llama-b", owner="other")
    unlabelled = foreign("ModelRoute", "llama", owner=None)
    theirs = foreign("ModelServer", "other-x", owner="other")
    ns.objects[ChildRef("ModelServer", "llama-b")] = copy.deepcopy(taken)
    ns.objects[ChildRef("ModelRoute", "llama")] = copy.deepcopy(unlabelled)
    ns.objects[ChildRef("ModelServer", "other-x")] = copy.deepcopy(theirs)
    p = ns.reconcile(model(SPEC))
    touched = {a.ref for a in p.actions}
    assert ChildRef("ModelServer", "llama-b") not in touched
    assert ChildRef("ModelRoute", "llama") not in touched
    assert ChildRef("ModelServer", "other-x") not in touched
    msgs = sorted(pr.message for pr in p.problems)
    assert msgs == [
        "ModelRoute llama exists and belongs to something else; not touched",
        "ModelServer llama-b exists and belongs to Model other; not touched",
    ]
    taken_refs = {ChildRef("ModelServer", "llama-b"), ChildRef("ModelRoute", "llama")}
    assert set(ns.reconcile(model(SPEC)).missing) == taken_refs  # the rest was created
    assert ns.objects[ChildRef("ModelServer", "llama-b")] == taken
    assert ns.objects[ChildRef("ModelRoute", "llama")] == unlabelled
    assert ns.objects[ChildRef("ModelServer", "other-x")] == theirs


def test_same_label_but_another_uid_is_not_ours() -> None:
    """A leftover of an earlier Model of the same name (another uid) is not deleted."""
    ns = Namespace()
    ns.reconcile(model(SPEC, uid="old"))
    p = plan(desired(model({"backends": [backend()]})), ns.observed(), "llama", "new")
    assert not any(a.verb in ("delete", "patch") for a in p.actions)


def test_a_child_being_deleted_is_waited_for() -> None:
    ns = Namespace()
    ns.reconcile(model(SPEC))
    ns.objects[ChildRef("ModelRoute", "llama")]["metadata"]["deletionTimestamp"] = "now"
    p = ns.reconcile(model(SPEC))
    assert p.actions == () and p.missing == (ChildRef("ModelRoute", "llama"),)


def test_merge_diff() -> None:
    old = {"a": 1, "b": {"c": 1, "d": 2}, "e": [1]}
    new = {"a": 1, "b": {"c": 2}, "e": [2]}
    assert merge_diff(old, new) == {"b": {"c": 2, "d": None}, "e": [2]}
    assert merge_diff({"a": {"x": 1}}, {"a": 3}) == {"a": 3}
    assert merge_diff({}, {}) == {}


DOCS_RUNTIME_IMAGE = "ghcr.io/matrixinfer/matrixinfer:0.1.0"  # what docs/model.md says it uses


def test_docs_show_what_the_example_generates() -> None:
    """docs/model.md pastes the planner's output for examples/model.yaml; keep them in step."""
    text = (EXAMPLES.parent / "docs" / "model.md").read_text()
    block = text.rsplit("```yaml\n", 1)[1].split("```", 1)[0]
    m = crds.load_documents((EXAMPLES / "model.yaml").read_text())[0]
    assert isinstance(m, crds.Model)
    m.metadata.uid = "<uid of the Model>"
    generated = desired(m, runtime_image=DOCS_RUNTIME_IMAGE).children
    assert list(yaml.safe_load_all(block)) == [c.manifest for c in generated]


def test_runtime_image_flag_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from controllers.main import build_parser, parse_args
    from controllers.model.pod import DEFAULT_RUNTIME_IMAGE
    from fleet.service import version

    monkeypatch.delenv("MATRIXINFER_IMAGE", raising=False)
    assert f"ghcr.io/matrixinfer/matrixinfer:{version()}" == DEFAULT_RUNTIME_IMAGE
    assert parse_args([]).runtime_image == DEFAULT_RUNTIME_IMAGE
    monkeypatch.setenv("MATRIXINFER_IMAGE", "mirror.local/mi:1")
    assert parse_args([]).runtime_image == "mirror.local/mi:1"
    assert parse_args(["--runtime-image", "x/y:2"]).runtime_image == "x/y:2"
    assert "--runtime-image" in build_parser().format_help()


def test_generated_commands_parse_with_the_programs_own_parsers() -> None:
    """Every MatrixInfer container a Model generates names an installed program and flags that
    program takes (a typo would crash-loop every engine pod)."""
    import tomllib

    from runtime import downloader, pd_proxy, sidecar

    scripts = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())["project"]["scripts"]
    parsers = {
        "matrixinfer-downloader": downloader.build_parser,
        "matrixinfer-runtime": sidecar.build_parser,
        "matrixinfer-pd-proxy": pd_proxy.build_parser,
    }
    workers = [{"type": "prefill"}, {"type": "decode"}]
    spec = {
        "backends": [backend(type="vLLMDisaggregated", workers=workers, cacheURI="pvc://c/x")],
        "loraAdapters": [{"name": "a", "uri": "pvc://loras/a"}],
    }
    seen = {}
    for role in (0, 1):
        p = pod(mi(spec), role)
        for c in [*p["initContainers"], *p["containers"]]:
            program = c["command"][0]
            if program not in parsers:
                continue
            assert program in scripts, program
            seen[(program, role)] = parsers[program]().parse_args(c["args"])
    dl = seen[("matrixinfer-downloader", 0)]
    assert (dl.uri, str(dl.cache), str(dl.pvc_root)) == (
        "hf://org/llama", "/var/cache/matrixinfer", "/mnt/pvc"
    )  # fmt: skip
    rt = seen[("matrixinfer-runtime", 1)]
    assert (rt.engine, rt.engine_url, rt.port) == ("vllm", "http://127.0.0.1:8001", 8100)
    assert str(rt.lora_adapters) == "/etc/matrixinfer/lora/adapters.yaml"
    proxy = seen[("matrixinfer-pd-proxy", 1)]
    assert (proxy.engine, proxy.port, proxy.connector) == ("http://127.0.0.1:8001", 8000, "nixl")
    assert ("matrixinfer-pd-proxy", 0) not in seen  # prefill pods serve on their own
