"""Property tests: for generated objects the schema accepts, the Python model's rule errors are
exactly the CEL rule errors (same field path, same message) — the two halves of every
cross-field rule cannot drift apart unnoticed."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crds

from .apiserver import apply_defaults, crd_schema, evaluate_rules, schema_errors

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parity(doc: dict[str, Any]) -> bool:
    """Assert parity; returns False when the schema rejects the object (nothing to compare)."""
    kind = doc["kind"]
    if schema_errors(kind, doc):
        return False
    schema = crd_schema(kind)
    cel = sorted(
        f"{r.path}: {r.message}"
        for r in evaluate_rules(schema, apply_defaults(schema, doc))
        if not r.ok
    )
    try:
        crds.parse_object(doc)
        python: list[str] = []
    except crds.InvalidObject as exc:
        python = sorted(f"{p}: {m}" for p, m in exc.errors)
    # Python stops at the first failing rule of an object; CEL reports all of them
    assert set(python) <= set(cel), (python, cel)
    assert bool(python) == bool(cel), (python, cel)
    return True


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


string_match = st.builds(
    lambda e, p, r: compact({"exact": e, "prefix": p, "regex": r}),
    maybe(st.sampled_from(["gold", "x"])),
    maybe(st.sampled_from(["/v1/", "g"])),
    maybe(st.sampled_from(["^a.*", "b+"])),
)
target = st.builds(
    lambda n, w: compact({"modelServerName": n, "weight": w}),
    st.sampled_from(["a", "b", "c"]),
    maybe(st.sampled_from([0, 1, 50, 100])),
)
rule = st.builds(
    lambda n, h, u, t: compact(
        {
            "name": n,
            "match": compact({"headers": h, "uri": u}) if (h or u) else None,
            "targets": t,
        }
    ),
    maybe(st.sampled_from(["r1", "r2"])),
    maybe(st.dictionaries(st.sampled_from(["x-tenant", "x-canary"]), string_match, max_size=2)),
    maybe(string_match),
    st.lists(target, min_size=1, max_size=3),
)
rate_limit = st.builds(
    lambda i, o, r: compact(
        {"inputTokensPerUnit": i, "outputTokensPerUnit": o, "requestsPerUnit": r}
    ),
    maybe(st.just(100)),
    maybe(st.just(10)),
    maybe(st.just(5)),
)
access = st.builds(
    lambda t, u, g: compact({"tenants": t, "users": u, "groups": g}),
    maybe(st.lists(st.sampled_from(["gold", "silver"]), max_size=2, unique=True)),
    maybe(st.lists(st.just("alice"), max_size=1)),
    maybe(st.lists(st.just("ml"), max_size=1)),
)


@SETTINGS
@given(
    model_name=maybe(st.just("llama")),
    loras=maybe(st.lists(st.sampled_from(["l1", "l2"]), max_size=2, unique=True)),
    rules=st.lists(rule, min_size=1, max_size=3),
    rl=maybe(rate_limit),
    acc=maybe(access),
)
def test_model_route_rules(
    model_name: str | None,
    loras: list[str] | None,
    rules: list[dict[str, Any]],
    rl: dict[str, Any] | None,
    acc: dict[str, Any] | None,
) -> None:
    spec = compact(
        {
            "modelName": model_name,
            "loraAdapters": loras,
            "rules": rules,
            "rateLimit": rl,
            "access": acc,
        }
    )
    doc = {
        "apiVersion": "networking.matrixinfer.ai/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": "r"},
        "spec": spec,
    }
    assert parity(doc)


POD = {"spec": {"containers": [{"name": "c", "image": "i"}]}}

role = st.builds(
    lambda n, r, w, t: compact(
        {
            "name": n,
            "replicas": r,
            "workerReplicas": w,
            "entryTemplate": POD,
            "workerTemplate": POD if t else None,
        }
    ),
    st.sampled_from(["prefill", "decode", "server"]),
    maybe(st.integers(0, 3)),
    maybe(st.integers(0, 2)),
    st.booleans(),
)


@SETTINGS
@given(
    roles=st.lists(role, min_size=1, max_size=3),
    gang=maybe(st.dictionaries(st.sampled_from(["prefill", "decode", "x"]), st.integers(0, 3))),
    max_unavailable=maybe(st.sampled_from([0, 1, 3, "0%", "25%", "100%"])),
)
def test_model_infer_rules(
    roles: list[dict[str, Any]], gang: dict[str, int] | None, max_unavailable: int | str | None
) -> None:
    template: dict[str, Any] = {"roles": roles}
    if gang is not None:
        template["gangPolicy"] = {"minRoleReplicas": gang}
    spec: dict[str, Any] = {"template": template}
    if max_unavailable is not None:
        spec["rolloutStrategy"] = {"maxUnavailable": max_unavailable}
    doc = {
        "apiVersion": "workload.matrixinfer.ai/v1alpha1",
        "kind": "ModelInfer",
        "metadata": {"name": "m"},
        "spec": spec,
    }
    assert parity(doc)


@SETTINGS
@given(
    targets=st.sets(
        st.sampled_from(["homogeneousTarget", "heterogeneousTarget", "disaggregatedTarget"])
    ),
    lo=st.integers(0, 4),
    hi=st.integers(1, 4),
    sources=st.lists(
        st.sets(st.sampled_from(["pod", "prometheus", "gateway"])), min_size=0, max_size=2
    ),
)
def test_autoscaling_policy_rules(
    targets: set[str], lo: int, hi: int, sources: list[set[str]]
) -> None:
    src_docs = {
        "pod": {"port": 8000},
        "prometheus": {"serverURL": "http://p:9090", "query": "up"},
        "gateway": {},
    }
    metric_sources = [{k: src_docs[k] for k in s} for s in sources] or None
    bodies = {
        "homogeneousTarget": compact(
            {
                "targetRef": {"name": "a"},
                "minReplicas": lo,
                "maxReplicas": hi,
                "metricSources": metric_sources,
            }
        ),
        "heterogeneousTarget": {
            "params": [{"target": {"name": "a"}, "cost": 1, "minReplicas": lo, "maxReplicas": hi}]
        },
        "disaggregatedTarget": {
            "targetRef": {"name": "a"},
            "prefill": {"minReplicas": lo, "maxReplicas": hi},
            "decode": {"maxReplicas": 2},
        },
    }
    spec: dict[str, Any] = {"metrics": [{"name": "m", "targetValue": 1}]}
    for t in sorted(targets):
        spec[t] = bodies[t]
    doc = {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "AutoscalingPolicy",
        "metadata": {"name": "p"},
        "spec": spec,
    }
    assert parity(doc)
