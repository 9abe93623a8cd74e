"""Property tests of the Model planner (hypothesis): any sequence of Model edits and hand edits
converges in one plan to exactly the desired children, and nothing another Model (or a user)
owns is ever touched."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import crds
from controllers.model.planner import desired
from controllers.model.types import CHILD_KINDS, ChildRef
from crds.networking import ModelRouteSpec, ModelServerSpec
from crds.registry import AutoscalingPolicySpec
from crds.workload import ModelInferSpec
from tests.controllers.model_cluster import Namespace, foreign, model

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECS: dict[str, type[BaseModel]] = {
    "ModelInfer": ModelInferSpec,
    "ModelServer": ModelServerSpec,
    "ModelRoute": ModelRouteSpec,
    "AutoscalingPolicy": AutoscalingPolicySpec,
}


@st.composite
def backends(draw: st.DrawFn, name: str, weighted: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(["vLLM", "SGLang", "vLLMDisaggregated"]))
    b: dict[str, Any] = {
        "name": name,
        "type": kind,
        # s3://B/m: a URI the pods could not use (InvalidURI: its ModelInfer is held)
        "modelURI": draw(
            st.sampled_from(["hf://o/m", "s3://bkt/m", "pvc://c/m", "file:///m", "s3://B/m"])
        ),
    }
    if draw(st.booleans()):
        b["image"] = draw(st.sampled_from(["e:1", "e:2"]))
    if draw(st.booleans()):
        b["args"] = draw(st.lists(st.sampled_from(["--a", "--b=1", "--c"]), max_size=2))
    if draw(st.booleans()):
        b["config"] = {"max-num-seqs": draw(st.integers(1, 512))}
    lo = draw(st.integers(0, 2))
    b["minReplicas"] = lo
    if draw(st.booleans()):
        b["maxReplicas"] = max(1, lo + draw(st.integers(0, 3)))
    if kind == "vLLMDisaggregated":
        b["workers"] = [
            {"type": "prefill", "replicas": draw(st.integers(1, 2))},
            {"type": "decode", "pods": draw(st.integers(1, 2))},
        ]
    elif draw(st.booleans()):
        b["workers"] = [{"type": "server", "pods": draw(st.integers(1, 2))}]
    if weighted:
        b["routeWeight"] = draw(st.integers(0, 100))
    return b


@st.composite
def model_specs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    weighted = draw(st.booleans())
    spec: dict[str, Any] = {"backends": [draw(backends(n, weighted)) for n in names]}
    adapters = draw(st.lists(st.sampled_from(["x", "y"]), unique=True, max_size=2))
    if adapters:
        spec["loraAdapters"] = [{"name": a, "uri": f"hf://o/{a}"} for a in adapters]
    scaling = draw(st.sampled_from([None, "spec", "ref"]))
    if scaling == "spec":
        spec["autoscalingPolicy"] = {"spec": {"metrics": [{"name": "m", "targetValue": 1}]}}
    elif scaling == "ref":
        spec["autoscalingPolicy"] = {"ref": {"name": "p"}}
    if draw(st.booleans()):
        spec["rateLimit"] = {"requestsPerUnit": draw(st.integers(1, 100))}
    return spec


KINDS = ["ModelInfer", "ModelServer", "ModelRoute", "AutoscalingPolicy"]
step = st.one_of(
    st.tuples(st.just("edit"), model_specs()),
    st.tuples(st.just("delete"), st.integers(0, 100)),
    st.tuples(st.just("tamper"), st.integers(0, 100), st.integers(0, 4)),
)


def parse(spec: dict[str, Any]) -> crds.Model | None:
    try:
        return model(spec)
    except crds.InvalidObject:
        return None


def normal(kind: str, spec: dict[str, Any]) -> Any:
    if kind not in SPECS:  # a ConfigMap's data
        return dict(spec)
    return (
        SPECS[kind].model_validate(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
    )


def tamper(obj: dict[str, Any], how: int) -> None:
    if obj["kind"] == "ConfigMap":
        obj["data"] = {"adapters.yaml": "[]", "byHand": "x"} if how % 2 else {}
        return
    spec = obj["spec"]
    if how == 0:
        spec["addedByHand"] = True  # unknown field (an API server with pruning would drop it)
    elif how == 1 and "replicas" in spec:
        spec["replicas"] = 7
    elif how == 2:
        obj["metadata"]["labels"]["registry.matrixinfer.ai/backend"] = "hand"
    elif how == 3:
        spec.pop("recoveryPolicy", None)  # what a server storing only the given fields shows
        spec.pop("rolloutStrategy", None)
    elif obj["kind"] == "ModelServer":
        spec["workloadPort"] = {"port": 1}
    elif obj["kind"] == "ModelRoute":
        spec["rules"][0]["targets"] = spec["rules"][0]["targets"][:1]


def check(ns: Namespace, m: crds.Model, strangers: dict[ChildRef, dict[str, Any]]) -> None:
    want = desired(m)
    # converged: planning again changes nothing
    p = ns.reconcile(m)
    assert p.actions == (), p.actions
    # nothing owned by someone else was touched
    for ref, obj in strangers.items():
        assert ns.objects[ref] == obj, ref
    # this Model's objects are exactly the desired children (plus held ones it had)
    ours = {
        ref
        for ref, obj in ns.objects.items()
        if ref not in strangers and obj["metadata"]["ownerReferences"][0]["uid"] == m.metadata.uid
    }
    wanted = {d.ref for d in want.children if d.ref not in strangers}
    assert wanted <= ours and ours - wanted <= set(want.held), (ours, wanted)
    for d in want.children:
        if d.ref in strangers:
            continue
        obj = ns.objects[d.ref]
        content = CHILD_KINDS[d.ref.kind].content
        got, exp = normal(d.ref.kind, obj[content]), normal(d.ref.kind, d.manifest[content])
        if d.replica_bounds is not None:
            lo, hi = d.replica_bounds
            assert lo <= got.pop("replicas") <= hi
            exp.pop("replicas")
        assert got == exp, d.ref
        labels = obj["metadata"]["labels"]
        assert d.manifest["metadata"]["labels"].items() <= labels.items()


@SETTINGS
@given(first=model_specs(), steps=st.lists(step, max_size=8))
def test_any_sequence_of_edits_converges_and_spares_other_owners(
    first: dict[str, Any], steps: list[tuple[Any, ...]]
) -> None:
    m = parse(first)
    assume(m is not None)
    assert m is not None
    ns = Namespace()
    strangers = {
        ChildRef("ModelServer", "llama-c"): foreign("ModelServer", "llama-c", "other"),
        ChildRef("ModelServer", "other-a"): foreign("ModelServer", "other-a", "other"),
        ChildRef("ModelRoute", "other"): foreign("ModelRoute", "other", None),
    }
    ns.objects.update(copy.deepcopy(strangers))
    ns.reconcile(m)
    check(ns, m, strangers)
    for s in steps:
        if s[0] == "edit":
            edited = parse(s[1])
            if edited is None:
                continue  # the API server (CRD validation) would refuse it
            m = edited
        else:
            mine = sorted((r for r in ns.objects if r not in strangers), key=str)
            if not mine:
                continue
            ref = mine[s[1] % len(mine)]
            if s[0] == "delete":
                del ns.objects[ref]
            else:
                tamper(ns.objects[ref], s[2])
        ns.reconcile(m)
        check(ns, m, strangers)
