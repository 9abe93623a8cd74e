"""A tiny in-memory cluster that applies planner actions, for planner tests (no Kubernetes)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from controllers.modelinfer.observe import revision_from_json
from controllers.modelinfer.planner import plan
from controllers.modelinfer.spec import parse, resolve
from controllers.modelinfer.types import (
    ANNOTATION_DELETION_COST,
    LABEL_GROUP,
    LABEL_REVISION,
    LABEL_ROLE,
    LABEL_ROLE_REPLICA,
    LABEL_ROLE_REVISION,
    GroupTemplate,
    InvalidSpec,
    Observed,
    ObservedPod,
    ObservedPodGroup,
    ObservedService,
    Plan,
    PlannerState,
    SpecProblem,
)
from crds.common import Condition
from crds.workload import ModelInfer

_uids = itertools.count(1)


@dataclass
class SimPod:
    manifest: dict[str, Any]
    uid: int
    phase: str = "Pending"
    ready: bool = False
    terminating: bool = False
    failed_at: float | None = None
    age: int = 0

    def observed(self) -> ObservedPod:
        labels = self.manifest["metadata"]["labels"]
        name = self.manifest["metadata"]["name"]
        cost = int(
            (self.manifest["metadata"].get("annotations") or {}).get(ANNOTATION_DELETION_COST, 0)
        )
        return ObservedPod(
            name=name,
            group=int(labels[LABEL_GROUP]),
            role=labels[LABEL_ROLE],
            role_replica=int(labels[LABEL_ROLE_REPLICA]),
            index=int(name.rsplit("-", 1)[1]),
            revision=labels[LABEL_REVISION],
            role_revision=labels[LABEL_ROLE_REVISION],
            phase=self.phase,
            ready=self.ready,
            terminating=self.terminating,
            deletion_cost=cost,
            failed_at=self.failed_at,
        )


@dataclass
class FakeCluster:
    """Pods start Pending, turn Running+ready one tick later; deleted pods linger one tick."""

    pods: dict[str, SimPod] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    podgroups: dict[str, dict[str, Any]] = field(default_factory=dict)
    revisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    state: PlannerState = field(default_factory=PlannerState)
    gang_available: bool = False
    now: float = 1_000_000.0
    instant_delete: bool = False
    deleted_uids: list[int] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    def observe(self) -> Observed:
        revs: dict[str, GroupTemplate] = {}
        for cr in self.revisions.values():
            t = revision_from_json(cr)
            assert t is not None, f"unreadable ControllerRevision {cr['metadata']['name']}"
            revs[t.revision] = t
        conds = tuple(Condition.model_validate(c) for c in self.status.get("conditions", []))
        return Observed(
            pods=tuple(p.observed() for p in self.pods.values()),
            services=tuple(
                ObservedService(n, int(s["metadata"]["labels"][LABEL_GROUP]))
                for n, s in self.services.items()
            ),
            podgroups=tuple(
                ObservedPodGroup(
                    n, int(pg["metadata"]["labels"][LABEL_GROUP]), pg["spec"]["minMember"]
                )
                for n, pg in self.podgroups.items()
            ),
            revisions=revs,
            gang_available=self.gang_available,
            current_revision=self.status.get("currentRevision"),
            conditions=conds,
            status=self.status,
        )

    def reconcile(self, spec: ModelInfer | InvalidSpec) -> Plan:
        p = plan(spec, self.observe(), self.state, self.now)
        self.apply(p)
        return p

    def apply(self, p: Plan) -> None:
        for name in p.delete_pods:
            pod = self.pods.get(name)
            assert pod is not None, f"deleting a pod that does not exist: {name}"
            assert not pod.terminating, f"deleting a pod twice: {name}"
            self.deleted_uids.append(pod.uid)
            if self.instant_delete:
                del self.pods[name]
            else:
                pod.terminating = True
                pod.ready = False
        for name in p.delete_services:
            del self.services[name]
        for name in p.delete_podgroups:
            del self.podgroups[name]
        for name in p.delete_revisions:
            del self.revisions[name]
        for c in p.create_revisions:
            self.revisions[c.name] = c.manifest
        for c in p.create_podgroups:
            assert c.name not in self.podgroups
            self.podgroups[c.name] = c.manifest
        for c in p.patch_podgroups:
            self.podgroups[c.name]["spec"].update(c.manifest["spec"])
        for c in p.create_services:
            assert c.name not in self.services, f"duplicate service {c.name}"
            self.services[c.name] = c.manifest
        for c in p.create_pods:
            assert c.name not in self.pods, f"duplicate pod {c.name}"
            self.pods[c.name] = SimPod(c.manifest, next(_uids))
            self.created.append(c.name)
        for lp in p.relabel_pods:
            self.pods[lp.name].manifest["metadata"]["labels"].update(lp.labels)
        if p.status is not None:
            self.status = p.status
        self.state = p.state

    def tick(self, seconds: float = 1.0) -> None:
        """The kubelet: terminating pods vanish, new pods start, then become ready."""
        self.now += seconds
        for name in [n for n, p in self.pods.items() if p.terminating]:
            del self.pods[name]
        for pod in self.pods.values():
            pod.age += 1
            if pod.phase == "Pending" and pod.age >= 1:
                pod.phase = "Running"
                pod.ready = True

    def fail(self, name: str) -> None:
        pod = self.pods[name]
        pod.phase = "Failed"
        pod.ready = False
        pod.failed_at = self.now

    def vanish(self, name: str) -> None:
        del self.pods[name]

    def groups(self) -> dict[int, list[SimPod]]:
        out: dict[int, list[SimPod]] = {}
        for p in self.pods.values():
            out.setdefault(int(p.manifest["metadata"]["labels"][LABEL_GROUP]), []).append(p)
        return out

    def converge(self, spec: ModelInfer, rounds: int = 60) -> int:
        """Reconcile and tick until a plan has nothing to do and all pods are ready."""
        for i in range(rounds):
            p = self.reconcile(spec)
            settled = all(x.ready and not x.terminating for x in self.pods.values())
            if not p.has_changes and settled and p.requeue_after is None:
                return i
            self.tick(p.requeue_after or 1.0)
        raise AssertionError(f"did not converge in {rounds} rounds")


def container(image: str = "vllm:1") -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "engine", "image": image}]}}


def make_object(
    name: str = "llama",
    replicas: int = 2,
    roles: list[dict[str, Any]] | None = None,
    generation: int = 1,
    **spec_extra: Any,
) -> dict[str, Any]:
    if roles is None:
        roles = [
            {
                "name": "prefill",
                "replicas": 1,
                "workerReplicas": 1,
                "entryTemplate": container(),
                "workerTemplate": container(),
            },
            {"name": "decode", "replicas": 2, "workerReplicas": 0, "entryTemplate": container()},
        ]
    template: dict[str, Any] = {"roles": roles}
    for key in ("restartGracePeriodSeconds", "gangPolicy"):
        if key in spec_extra:
            template[key] = spec_extra.pop(key)
    return {
        "apiVersion": "workload.matrixinfer.ai/v1alpha1",
        "kind": "ModelInfer",
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": generation},
        "spec": {"replicas": replicas, "template": template, **spec_extra},
    }


def model_infer(obj: dict[str, Any]) -> ModelInfer:
    """The object as the planner takes it; fails the test when the API models reject it."""
    spec = parse(obj)
    assert isinstance(spec, ModelInfer), spec
    return spec


def make_spec(**kw: Any) -> ModelInfer:
    return model_infer(make_object(**kw))


def template_of(spec: ModelInfer) -> GroupTemplate:
    """The template at the update revision, with its revision hashes."""
    return resolve(spec).template


def problems_of(obj: dict[str, Any]) -> tuple[SpecProblem, ...]:
    """Why the planner will not act on `obj`: rejected by the API models or by its own checks."""
    spec = parse(obj)
    if isinstance(spec, InvalidSpec):
        return spec.problems
    return resolve(spec).problems


def with_image(spec_obj: dict[str, Any], image: str, role: int | None = None) -> dict[str, Any]:
    import copy

    obj = copy.deepcopy(spec_obj)
    for i, r in enumerate(obj["spec"]["template"]["roles"]):
        if role is None or i == role:
            r["entryTemplate"] = container(image)
            if r.get("workerTemplate"):
                r["workerTemplate"] = container(image)
    return obj


__all__ = [
    "FakeCluster",
    "SimPod",
    "container",
    "make_object",
    "make_spec",
    "model_infer",
    "problems_of",
    "template_of",
    "with_image",
]
