"""Property tests of the ModelInfer planner (hypothesis) over the FakeCluster."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controllers.modelinfer.observe import revision_from_json
from controllers.modelinfer.spec import resolve
from controllers.modelinfer.types import LABEL_REVISION, GroupTemplate, instance_size
from tests.controllers.fakecluster import (
    FakeCluster,
    make_object,
    model_infer,
    template_of,
    with_image,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# one step of the world: a spec change, a pod failure, a pod deletion, or time passing
step = st.one_of(
    st.tuples(st.just("replicas"), st.integers(0, 5)),
    st.tuples(st.just("image"), st.sampled_from(["v1", "v2", "v3"]), st.sampled_from([None, 0, 1])),
    st.tuples(st.just("partition"), st.integers(0, 4)),
    st.tuples(st.just("max_unavailable"), st.integers(1, 3)),
    st.tuples(st.just("fail"), st.integers(0, 10_000)),
    st.tuples(st.just("vanish"), st.integers(0, 10_000)),
    st.tuples(st.just("tick"), st.integers(1, 3)),
    st.tuples(st.just("workers"), st.integers(0, 2)),
    st.tuples(st.just("role_replicas"), st.integers(1, 3)),
)


def expected_pod_names(
    name: str,
    template: GroupTemplate,
    groups: list[int],
    templates: dict[int, GroupTemplate] | None = None,
) -> set[str]:
    out = set()
    for g in groups:
        tmpl = (templates or {}).get(g, template)
        for role in tmpl.roles:
            for rr in range(role.replicas):
                for i in range(instance_size(role)):
                    out.add(f"{name}-{g}-{role.name}-{rr}-{i}")
    return out


def apply_step(obj: dict[str, Any], c: FakeCluster, s: tuple[Any, ...]) -> dict[str, Any]:
    kind = s[0]
    obj = copy.deepcopy(obj)
    strategy = obj["spec"].setdefault("rolloutStrategy", {})
    if kind == "replicas":
        obj["spec"]["replicas"] = s[1]
    elif kind == "image":
        obj = with_image(obj, s[1], role=s[2])
    elif kind == "partition":
        strategy["partition"] = s[1]
    elif kind == "max_unavailable":
        strategy["maxUnavailable"] = s[1]
    elif kind in ("fail", "vanish") and c.pods:
        names = sorted(n for n, p in c.pods.items() if not p.terminating)
        if names:
            name = names[s[1] % len(names)]
            c.fail(name) if kind == "fail" else c.vanish(name)
    elif kind == "tick":
        c.tick(s[1])
    elif kind == "workers":
        prefill = obj["spec"]["template"]["roles"][0]
        prefill["workerReplicas"] = s[1]
        if s[1] > 0 and not prefill.get("workerTemplate"):
            prefill["workerTemplate"] = prefill["entryTemplate"]
    elif kind == "role_replicas":
        obj["spec"]["template"]["roles"][1]["replicas"] = s[1]
    obj["metadata"]["generation"] += 1
    return obj


@SETTINGS
@given(
    steps=st.lists(step, max_size=25),
    policy=st.sampled_from(["RoleRecreate", "GroupRecreate"]),
    rollout=st.sampled_from(["GroupRollingUpdate", "RoleRollingUpdate"]),
    workers=st.integers(0, 2),
)
def test_any_history_converges_to_the_desired_state(
    steps: list[tuple[Any, ...]], policy: str, rollout: str, workers: int
) -> None:
    obj = make_object(replicas=2, recoveryPolicy=policy, rolloutStrategy={"type": rollout})
    obj["spec"]["template"]["roles"][0]["workerReplicas"] = workers
    c = FakeCluster()
    revisions_by_index: dict[int, set[str]] = {}
    for s in steps:
        obj = apply_step(obj, c, s)
        c.reconcile(model_infer(obj))
    spec = model_infer(obj)
    resolved = resolve(spec)
    assert not resolved.problems
    template, partition = resolved.template, resolved.partition
    c.converge(spec, rounds=80)
    groups = sorted(c.groups())
    assert len(groups) == spec.spec.replicas
    # groups below the partition keep their revision's template (from its ControllerRevision)
    by_rev = {
        t.revision: t
        for t in (revision_from_json(cr) for cr in c.revisions.values())
        if t is not None
    }
    below = {
        g: by_rev[pods[0].manifest["metadata"]["labels"][LABEL_REVISION]]
        for g, pods in c.groups().items()
        if g < partition
        and len({p.manifest["metadata"]["labels"][LABEL_REVISION] for p in pods}) == 1
    }
    frozen_mixed = {g for g in groups if g < partition and g not in below}
    checked = [g for g in groups if g not in frozen_mixed]
    have = {n for n in c.pods if int(n.split("-")[1]) not in frozen_mixed}
    assert have == expected_pod_names("llama", template, checked, below)
    assert all(p.ready and p.phase == "Running" for p in c.pods.values())
    for g, pods in c.groups().items():
        revs = {p.manifest["metadata"]["labels"][LABEL_REVISION] for p in pods}
        revisions_by_index[g] = revs
        if g >= partition:
            assert revs == {template.revision}, f"group {g} at revisions {revs}"
        else:  # frozen by the partition; a RoleRollingUpdate may have been caught half-way
            assert len(revs) == 1 or rollout == "RoleRollingUpdate", f"group {g} mixes {revs}"
    workers = template.by_name["prefill"].worker_replicas
    want_services = {f"llama-{g}-prefill-0" for g in groups} if workers > 0 else set()
    # groups below the partition may run an older template, with or without workers
    assert {s for s in c.services if int(s.split("-")[1]) >= partition} == {
        s for s in want_services if int(s.split("-")[1]) >= partition
    }
    assert c.status["readyReplicas"] == spec.spec.replicas
    assert c.status["observedGeneration"] == spec.metadata.generation


def ready_groups(c: FakeCluster, size: int) -> set[int]:
    return {
        g
        for g, pods in c.groups().items()
        if len(pods) == size and all(p.ready and not p.terminating for p in pods)
    }


@SETTINGS
@given(
    replicas=st.integers(1, 6),
    max_unavailable=st.integers(1, 3),
    partition=st.integers(0, 6),
    rollout=st.sampled_from(["GroupRollingUpdate", "RoleRollingUpdate"]),
    role=st.sampled_from([None, 0, 1]),
    delays=st.lists(st.integers(1, 3), min_size=40, max_size=40),
)
def test_rolling_update_keeps_max_unavailable_and_partition(
    replicas: int,
    max_unavailable: int,
    partition: int,
    rollout: str,
    role: int | None,
    delays: list[int],
) -> None:
    obj = make_object(
        replicas=replicas,
        rolloutStrategy={
            "type": rollout,
            "maxUnavailable": max_unavailable,
            "partition": partition,
        },
    )
    c = FakeCluster()
    c.converge(model_infer(obj))
    old_rev = template_of(model_infer(obj)).revision
    below = {g: {p.uid for p in pods} for g, pods in c.groups().items() if g < partition}
    spec = model_infer(with_image(obj, "v9", role=role))
    size = 4
    done = False
    for d in delays:
        p = c.reconcile(spec)
        down = replicas - len(ready_groups(c, size))
        assert down <= max_unavailable, f"{down} groups down, maxUnavailable {max_unavailable}"
        if not p.has_changes and down == 0:
            done = True
            break
        c.tick(d)
    assert done
    for g, uids in below.items():
        pods = c.groups()[g]
        assert {p.uid for p in pods} == uids, f"group {g} below partition {partition} was touched"
        assert {p.manifest["metadata"]["labels"][LABEL_REVISION] for p in pods} == {old_rev}
    for g, pods in c.groups().items():
        if g >= partition:
            assert {p.manifest["metadata"]["labels"][LABEL_REVISION] for p in pods} == {
                template_of(spec).revision
            }
