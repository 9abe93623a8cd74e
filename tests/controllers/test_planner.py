"""Unit tests of the pure ModelInfer planner over the in-memory FakeCluster."""

from __future__ import annotations

import copy
from typing import Any

from controllers.modelinfer.planner import plan
from controllers.modelinfer.spec import parse, resolve
from controllers.modelinfer.types import (
    ANNOTATION_DELETION_COST,
    ANNOTATION_VOLCANO_GROUP,
    LABEL_ENTRY,
    LABEL_REVISION,
    GroupState,
    Observed,
)
from tests.controllers.fakecluster import (
    FakeCluster,
    container,
    make_object,
    make_spec,
    model_infer,
    problems_of,
    template_of,
    with_image,
)


def env_of(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in manifest["spec"]["containers"][0]["env"]}


def test_create_builds_pods_services_env_and_status() -> None:
    c = FakeCluster()
    spec = make_spec(replicas=2)
    c.converge(spec)
    assert sorted(c.pods) == sorted(
        f"llama-{g}-{r}"
        for g in (0, 1)
        for r in ("prefill-0-0", "prefill-0-1", "decode-0-0", "decode-1-0")
    )
    assert sorted(c.services) == ["llama-0-prefill-0", "llama-1-prefill-0"]
    worker = c.pods["llama-1-prefill-0-1"].manifest
    assert env_of(worker) == {
        "ENTRY_ADDRESS": "llama-1-prefill-0-0.llama-1-prefill-0.ns.svc",
        "GROUP_SIZE": "2",
        "WORKER_INDEX": "1",
        "ROLE": "prefill",
        "GROUP_INDEX": "1",
        "ROLE_REPLICA": "0",
    }
    assert worker["spec"]["subdomain"] == "llama-1-prefill-0"
    assert worker["metadata"]["labels"][LABEL_ENTRY] == "false"
    assert worker["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    decode = c.pods["llama-0-decode-1-0"].manifest
    assert "ENTRY_ADDRESS" not in env_of(decode) and env_of(decode)["GROUP_SIZE"] == "1"
    svc = c.services["llama-0-prefill-0"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert c.status["replicas"] == 2 and c.status["readyReplicas"] == 2
    assert (
        c.status["updatedReplicas"] == 2
        and c.status["currentRevision"] == template_of(spec).revision
    )
    conds = {x["type"]: x for x in c.status["conditions"]}
    assert conds["Available"]["status"] == "True"
    assert conds["Progressing"]["status"] == "False"
    assert conds["UpdateInProgress"]["status"] == "False"
    assert c.status["labelSelector"] == (
        "workload.matrixinfer.ai/model-infer=llama,workload.matrixinfer.ai/entry=true"
    )
    assert list(c.revisions) == [f"llama-{template_of(spec).revision}"]


def test_same_world_same_plan_and_no_status_patch_when_converged() -> None:
    c = FakeCluster()
    spec = make_spec()
    c.converge(spec)
    p1 = plan(spec, c.observe(), c.state, c.now)
    p2 = plan(spec, c.observe(), c.state, c.now)
    assert not p1.has_changes and not p2.has_changes
    assert p1.status is None  # nothing changed: no status patch, no event loop through watches


def test_scale_up_then_down_prefers_not_ready_then_cost_then_highest_index() -> None:
    c = FakeCluster(instant_delete=True)
    c.converge(make_spec(replicas=4))
    assert sorted(c.groups()) == [0, 1, 2, 3]
    c.pods["llama-1-decode-0-0"].ready = False  # group 1 not ready
    c.pods["llama-3-decode-0-0"].manifest["metadata"]["annotations"] = {
        ANNOTATION_DELETION_COST: "10"
    }
    c.pods["llama-2-decode-0-0"].manifest["metadata"]["annotations"] = {
        ANNOTATION_DELETION_COST: "5"
    }
    p = c.reconcile(make_spec(replicas=3))
    assert {n.split("-")[1] for n in p.delete_pods} == {"1"}
    c.converge(make_spec(replicas=3))
    p = c.reconcile(make_spec(replicas=1))  # cost: group 0 (0) and 2 (5) go before 3 (10)
    assert {n.split("-")[1] for n in p.delete_pods} == {"0", "2"}
    c.converge(make_spec(replicas=1))
    assert sorted(c.groups()) == [3]
    c.converge(make_spec(replicas=3))  # scale-up fills the lowest free indices
    assert sorted(c.groups()) == [0, 1, 3]
    c.converge(make_spec(replicas=0))
    assert c.pods == {} and c.services == {}


def test_highest_index_goes_first_when_all_equal() -> None:
    c = FakeCluster()
    c.converge(make_spec(replicas=3))
    p = c.reconcile(make_spec(replicas=2))
    assert {n.split("-")[1] for n in p.delete_pods} == {"2"}
    assert p.groups_by_state[GroupState.DELETING] == 1


def unavailable(c: FakeCluster, replicas: int) -> int:
    ready = 0
    for pods in c.groups().values():
        if len(pods) == 4 and all(p.ready and not p.terminating for p in pods):
            ready += 1
    return replicas - ready


def test_group_rolling_update_respects_max_unavailable_and_partition() -> None:
    c = FakeCluster()
    obj = make_object(replicas=5, rolloutStrategy={"maxUnavailable": 2, "partition": 1})
    c.converge(model_infer(obj))
    old = template_of(model_infer(obj)).revision
    keep = {p.uid for p in c.groups()[0]}
    new_obj = with_image(obj, "vllm:2")
    new_obj["metadata"]["generation"] = 2
    spec = model_infer(new_obj)
    seen_updating = False
    for _ in range(40):
        p = c.reconcile(spec)
        assert unavailable(c, 5) <= 2
        seen_updating |= any(
            x["type"] == "UpdateInProgress" and x["status"] == "True"
            for x in c.status["conditions"]
        )
        if not p.has_changes and unavailable(c, 5) == 0 and p.requeue_after is None:
            break
        c.tick()
    assert seen_updating
    revs = {
        g: {p.manifest["metadata"]["labels"][LABEL_REVISION] for p in pods}
        for g, pods in c.groups().items()
    }
    assert revs[0] == {old}
    assert all(revs[g] == {template_of(spec).revision} for g in (1, 2, 3, 4))
    assert {p.uid for p in c.groups()[0]} == keep
    assert c.status["currentRevision"] == old  # partition holds group 0 back
    assert c.status["updatedReplicas"] == 4
    conds = {x["type"]: x["status"] for x in c.status["conditions"]}
    assert conds["UpdateInProgress"] == "False"


def test_role_rolling_update_replaces_only_the_changed_role_and_relabels_the_rest() -> None:
    c = FakeCluster()
    obj = make_object(replicas=2, rolloutStrategy={"type": "RoleRollingUpdate"})
    c.converge(model_infer(obj))
    prefill_uids = {n: p.uid for n, p in c.pods.items() if "prefill" in n}
    new_obj = with_image(obj, "vllm:2", role=1)  # only decode changes
    spec = model_infer(new_obj)
    c.converge(spec)
    assert {n: p.uid for n, p in c.pods.items() if "prefill" in n} == prefill_uids
    assert all(
        p.manifest["metadata"]["labels"][LABEL_REVISION] == template_of(spec).revision
        for p in c.pods.values()
    )
    assert all(
        p.manifest["spec"]["containers"][0]["image"] == "vllm:2"
        for n, p in c.pods.items()
        if "decode" in n
    )
    assert (
        c.status["updatedReplicas"] == 2
        and c.status["currentRevision"] == template_of(spec).revision
    )


def test_role_recreate_recreates_only_the_broken_instance() -> None:
    c = FakeCluster()
    spec = make_spec(replicas=1)
    c.converge(spec)
    uids = {n: p.uid for n, p in c.pods.items()}
    c.vanish("llama-0-prefill-0-1")  # a worker disappears
    p = c.reconcile(spec)
    assert p.delete_pods == ["llama-0-prefill-0-0"]  # its entry goes too, nothing else
    assert any(e.reason == "RoleRecreate" for e in p.events)
    c.converge(spec)
    for n in ("llama-0-decode-0-0", "llama-0-decode-1-0"):
        assert c.pods[n].uid == uids[n]
    assert c.pods["llama-0-prefill-0-0"].uid != uids["llama-0-prefill-0-0"]


def test_group_recreate_recreates_the_whole_group_in_place() -> None:
    c = FakeCluster()
    spec = model_infer(make_object(replicas=2, recoveryPolicy="GroupRecreate"))
    c.converge(spec)
    uids = {n: p.uid for n, p in c.pods.items()}
    c.fail("llama-1-decode-1-0")
    p = c.reconcile(spec)
    assert sorted(p.delete_pods) == sorted(n for n in uids if n.startswith("llama-1-"))
    c.converge(spec)
    assert sorted(c.groups()) == [0, 1]
    assert all(c.pods[n].uid != uids[n] for n in uids if n.startswith("llama-1-"))
    assert all(c.pods[n].uid == uids[n] for n in uids if n.startswith("llama-0-"))


def test_recovery_none_leaves_failures_alone() -> None:
    c = FakeCluster()
    spec = model_infer(make_object(replicas=1, recoveryPolicy="None"))
    c.converge(spec)
    c.fail("llama-0-decode-0-0")
    p = c.reconcile(spec)
    assert not p.has_changes
    assert p.groups_by_state[GroupState.RECOVERING] == 1


def test_restart_grace_period_delays_the_recreate() -> None:
    c = FakeCluster()
    spec = model_infer(make_object(replicas=1, restartGracePeriodSeconds=30))
    c.converge(spec)
    c.fail("llama-0-decode-0-0")
    p = c.reconcile(spec)
    assert p.delete_pods == [] and p.requeue_after == 30
    c.tick(10)
    p = c.reconcile(spec)
    assert p.delete_pods == [] and p.requeue_after == 20
    c.tick(20)
    p = c.reconcile(spec)
    assert p.delete_pods == ["llama-0-decode-0-0"]


def test_partition_group_recreated_at_its_old_revision() -> None:
    c = FakeCluster()
    obj = make_object(replicas=2, rolloutStrategy={"partition": 1})
    c.converge(model_infer(obj))
    old = template_of(model_infer(obj)).revision
    spec = model_infer(with_image(obj, "vllm:2"))
    c.converge(spec)
    c.vanish("llama-0-decode-0-0")
    c.converge(spec)
    pod = c.pods["llama-0-decode-0-0"]
    assert pod.manifest["metadata"]["labels"][LABEL_REVISION] == old
    assert pod.manifest["spec"]["containers"][0]["image"] == "vllm:1"
    assert len(c.revisions) == 2  # old and new kept while group 0 uses the old one
    obj2 = with_image(obj, "vllm:2")
    obj2["spec"]["rolloutStrategy"] = {"partition": 0}
    c.converge(model_infer(obj2))
    assert len(c.revisions) == 1  # the old ControllerRevision is collected


def test_gang_scheduling_podgroups_when_volcano_and_crd_present() -> None:
    tmpl = {"spec": {"schedulerName": "volcano", "containers": [{"name": "e", "image": "x"}]}}
    roles = [
        {
            "name": "prefill",
            "replicas": 2,
            "workerReplicas": 1,
            "entryTemplate": tmpl,
            "workerTemplate": tmpl,
        },
        {"name": "decode", "replicas": 3, "entryTemplate": tmpl},
    ]
    obj = make_object(replicas=2, roles=roles, gangPolicy={"minRoleReplicas": {"decode": 1}})
    c = FakeCluster(gang_available=True)
    c.converge(model_infer(obj))
    assert sorted(c.podgroups) == ["llama-0", "llama-1"]
    assert c.podgroups["llama-0"]["spec"]["minMember"] == 2 * 2 + 1 * 1
    assert c.podgroups["llama-0"]["spec"]["minTaskMember"] == {"prefill": 4, "decode": 1}
    ann = c.pods["llama-1-decode-2-0"].manifest["metadata"]["annotations"]
    assert ann[ANNOTATION_VOLCANO_GROUP] == "llama-1"
    c.converge(model_infer(make_object(replicas=1, roles=roles)))
    assert sorted(c.podgroups) == ["llama-0"]
    assert c.podgroups["llama-0"]["spec"]["minMember"] == 2 * 2 + 3
    plain = FakeCluster(gang_available=False)
    plain.converge(model_infer(obj))
    assert plain.podgroups == {}
    conds = {x["type"]: x for x in plain.status["conditions"]}
    assert conds["GangScheduling"]["reason"] == "PodGroupCRDMissing"


def test_invalid_spec_is_reported_and_nothing_is_touched() -> None:
    roles = [{"name": "prefill", "replicas": 1, "workerReplicas": 2, "entryTemplate": container()}]
    spec = parse(make_object(roles=roles))
    p = plan(spec, Observed(), None, 0.0)
    assert not p.has_changes
    assert p.status is not None
    cond = next(x for x in p.status["conditions"] if x["type"] == "SpecValid")
    assert cond["status"] == "False" and cond["reason"] == "InvalidWorkerTemplate"
    assert "spec.template.roles[0].workerTemplate" in cond["message"]


def test_long_names_and_bad_int_or_percent_are_reported() -> None:
    problems = problems_of(make_object(name="m" * 55, replicas=12))
    assert [p.reason for p in problems] == ["NameTooLong"]
    assert problems[0].field == "metadata.name"
    problems = problems_of(make_object(rolloutStrategy={"maxUnavailable": "lots"}))
    assert problems[0].field == "spec.rolloutStrategy.maxUnavailable"
    resolved = resolve(
        model_infer(
            make_object(replicas=8, rolloutStrategy={"maxUnavailable": "25%", "partition": "50%"})
        )
    )
    assert (resolved.max_unavailable, resolved.partition) == (2, 4)
    problems = problems_of(make_object(gangPolicy={"minRoleReplicas": {"nope": 1}}))
    assert problems[0].reason == "InvalidMinRoleReplicas"
    assert problems[0].field == "spec.template.gangPolicy.minRoleReplicas"
    problems = problems_of(make_object(name="1abc"))
    assert problems[0].reason == "InvalidNameForService"


def test_int_or_percent_follows_the_api_rule() -> None:
    """A digit string is not a count: the API server rejects maxUnavailable "3" (the CRD pattern
    admits only "NN%" strings), and so does the controller, naming the field."""
    for field, value in (("maxUnavailable", "3"), ("partition", "3"), ("partition", -1)):
        problems = problems_of(make_object(rolloutStrategy={field: value}))
        assert problems and problems[0].field == f"spec.rolloutStrategy.{field}", problems
        assert problems[0].reason == f"Invalid{field[0].upper()}{field[1:]}"
    resolved = resolve(model_infer(make_object(rolloutStrategy={"maxUnavailable": 3})))
    assert resolved.max_unavailable == 3


def test_revision_hash_is_stable_and_ignores_key_order() -> None:
    obj = make_object()
    rev = template_of(model_infer(obj)).revision
    shuffled = copy.deepcopy(obj)
    shuffled["spec"]["template"]["roles"] = [
        dict(reversed(list(r.items()))) for r in shuffled["spec"]["template"]["roles"]
    ]
    assert template_of(model_infer(shuffled)).revision == rev
    assert template_of(model_infer(with_image(obj, "other"))).revision != rev


def test_revision_hashes_are_pinned() -> None:
    """Pods and ControllerRevisions in running clusters carry these hashes: a change to how they
    are computed would roll every InferGroup on a controller upgrade."""
    tmpl = {"spec": {"schedulerName": "volcano", "containers": [{"name": "e", "image": "x"}]}}
    roles = [
        {
            "name": "prefill",
            "replicas": 2,
            "workerReplicas": 1,
            "entryTemplate": tmpl,
            "workerTemplate": tmpl,
        },
        {"name": "decode", "replicas": 3, "entryTemplate": tmpl},
    ]
    cases = [
        (make_object(), "2f8e893ccf", ["ca371d26b3", "a6ea2be7d8"]),
        (
            make_object(
                roles=roles,
                gangPolicy={"minRoleReplicas": {"decode": 1}},
                restartGracePeriodSeconds=5,
            ),
            "c179c495fc",
            ["62907c6099", "39af1871cc"],
        ),
    ]
    for obj, group_rev, role_revs in cases:
        template = template_of(model_infer(obj))
        assert template.revision == group_rev
        assert [template.role_revisions[r.name] for r in template.roles] == role_revs
