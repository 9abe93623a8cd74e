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
from tests.controllers.model_cluster import Namespace, foreign, model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def backend(**kw: Any) -> dict[str, Any]:
    return {"name": "main", "type": "vLLM", "modelURI": "hf://org/llama", **kw}


def children(spec: dict[str, Any]) -> dict[ChildRef, dict[str, Any]]:
    d = desired(model(spec))
    assert d.problems == ()
    return {c.ref: c.manifest for c in d.children}


def engine(manifest: dict[str, Any], role: int = 0, entry: bool = True) -> dict[str, Any]:
    r = manifest["spec"]["template"]["roles"][role]
    tmpl = r["entryTemplate"] if entry else r["workerTemplate"]
    return dict(tmpl["spec"]["containers"][0])


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
        "org/llama",
        "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "llama",
        "--enable-lora", "--lora-modules", "sql=org/sql",
        "--max-model-len", "4096", "--enable-prefix-caching",
        "--seed=1",
    ]  # fmt: skip
    assert c["env"] == [
        {"name": "A", "value": "1"},
        {"name": "HF_HOME", "value": "/var/cache/matrixinfer"},
    ]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    m = mi(spec)
    assert m["spec"]["replicas"] == 1
    assert m["spec"]["template"]["roles"][0]["name"] == "server"
    assert m["spec"]["template"]["roles"][0]["workerReplicas"] == 0


def test_default_images_per_engine() -> None:
    assert engine(mi({"backends": [backend()]}))["image"].startswith("vllm/vllm-openai:")
    sg = mi({"backends": [backend(type="SGLang")]})
    assert engine(sg)["image"].startswith("lmsysorg/sglang:")


def test_config_rendering() -> None:
    assert config_args({"a": 1, "b": True, "c": False, "d": None, "e": [1, 2], "f": {"k": 1}}) == [
        "--a", "1", "--b", "--e", "1", "2", "--f", '{"k":1}'
    ]  # fmt: skip


def test_sglang_multi_pod_role_and_its_worker_pods() -> None:
    spec = {
        "backends": [
            backend(type="SGLang", workers=[{"type": "server", "replicas": 2, "pods": 3}])
        ],
        "loraAdapters": [{"name": "a", "uri": "s3://b/a"}],
    }
    m = mi(spec)
    role = m["spec"]["template"]["roles"][0]
    assert role["replicas"] == 2 and role["workerReplicas"] == 2
    entry = engine(m)
    assert entry["command"] == ["python3", "-m", "sglang.launch_server"]
    args = entry["args"]
    assert args[:2] == ["--model-path", "org/llama"]
    assert args[args.index("--nnodes") + 1] == "3"
    assert args[args.index("--node-rank") + 1] == "$(WORKER_INDEX)"
    assert args[args.index("--dist-init-addr") + 1] == "$(ENTRY_ADDRESS):5000"
    assert args[args.index("--lora-paths") + 1] == "a=s3://b/a"
    worker = engine(m, entry=False)
    assert worker["args"] == args
    assert "readinessProbe" not in worker and "ports" not in worker


@pytest.mark.parametrize(
    ("uri", "model_arg", "volume"),
    [
        ("hf://org/llama", "org/llama", None),
        ("s3://bucket/llama", "s3://bucket/llama", None),
        (
            "pvc://weights/models/llama",
            "/mnt/model/models/llama",
            {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
        ),
        (
            "file:///data/llama",
            "/mnt/model",
            {"name": "model", "hostPath": {"path": "/data/llama"}},
        ),
    ],
)
def test_model_uri_schemes(uri: str, model_arg: str, volume: dict[str, Any] | None) -> None:
    m = mi({"backends": [backend(modelURI=uri)]})
    c = engine(m)
    assert c["args"][0] == model_arg
    vols = m["spec"]["template"]["roles"][0]["entryTemplate"]["spec"]["volumes"]
    model_vols = [v for v in vols if v["name"] == "model"]
    assert model_vols == ([volume] if volume else [])
    if volume:
        assert {"name": "model", "mountPath": "/mnt/model", "readOnly": True} in c["volumeMounts"]
    assert ("--load-format" in c["args"]) == uri.startswith("s3://")


def test_user_load_format_wins_over_the_s3_default() -> None:
    c = engine(mi({"backends": [backend(modelURI="s3://b/m", args=["--load-format=auto"])]}))
    assert "runai_streamer" not in c["args"]


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


SPEC = {
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


def test_docs_show_what_the_example_generates() -> None:
    """docs/model.md pastes the planner's output for examples/model.yaml; keep them in step."""
    text = (EXAMPLES.parent / "docs" / "model.md").read_text()
    block = text.rsplit("```yaml\n", 1)[1].split("```", 1)[0]
    m = crds.load_documents((EXAMPLES / "model.yaml").read_text())[0]
    assert isinstance(m, crds.Model)
    m.metadata.uid = "<uid of the Model>"
    assert list(yaml.safe_load_all(block)) == [c.manifest for c in desired(m).children]
