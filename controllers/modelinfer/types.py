"""The ModelInfer planner's vocabulary: what is wanted, what is seen, and what to do.

Pure data, no Kopf, HTTP or Kubernetes client here. What is wanted is the API's own model,
`crds.ModelInfer`, validated once at the edge; this module adds only what the planner derives
from it (revision hashes, resolved int-or-percent values) and what it observes and decides. Pod
templates stay opaque JSON-like mappings: Kubernetes objects the planner copies into pods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from crds.common import Condition
from crds.workload import InferGroupTemplate, ModelInfer, Role

API_GROUP = "workload.matrixinfer.ai"
API_VERSION = "v1alpha1"
PLURAL = "modelinfers"
KIND = "ModelInfer"

LABEL_PREFIX = f"{API_GROUP}/"
LABEL_MODEL_INFER = f"{LABEL_PREFIX}model-infer"
LABEL_GROUP = f"{LABEL_PREFIX}group"
LABEL_ROLE = f"{LABEL_PREFIX}role"
LABEL_ROLE_REPLICA = f"{LABEL_PREFIX}role-replica"
LABEL_ENTRY = f"{LABEL_PREFIX}entry"
LABEL_REVISION = f"{LABEL_PREFIX}revision"
LABEL_ROLE_REVISION = f"{LABEL_PREFIX}role-revision"

ANNOTATION_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"
ANNOTATION_VOLCANO_TASK = "volcano.sh/task-spec"
VOLCANO_SCHEDULER = "volcano"

MAX_NAME_LENGTH = 63  # a pod name is also its hostname: one DNS label

JSON = Mapping[str, Any]


class GroupState(StrEnum):
    """How the controller sees one InferGroup (the `state` label of the groups metric)."""

    READY = "Ready"
    STARTING = "Starting"  # pods being created or not ready yet
    UPDATING = "Updating"  # being replaced by a rolling update
    RECOVERING = "Recovering"  # a pod failed or vanished; waiting for or doing a recreate
    DELETING = "Deleting"  # removed by a scale-down


def instance_size(role: Role) -> int:
    """Pods of one role instance: the entry pod and its workers."""
    return 1 + role.worker_replicas


def _uses_volcano(role: Role) -> bool:
    for tmpl in (role.entry_template, role.worker_template):
        if tmpl and (tmpl.get("spec") or {}).get("schedulerName") == VOLCANO_SCHEDULER:
            return True
    return False


@dataclass(frozen=True, slots=True)
class GroupTemplate:
    """The InferGroup template at one revision (the update revision or an older one kept in a
    ControllerRevision): the API's template and the hashes the planner compares."""

    spec: InferGroupTemplate
    revision: str  # hash of the template's canonical JSON (the pods' `revision` label)
    role_revisions: Mapping[str, str]  # role name -> hash of the role (`role-revision` label)
    by_name: Mapping[str, Role] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.by_name:
            object.__setattr__(self, "by_name", {r.name: r for r in self.spec.roles})

    @property
    def roles(self) -> list[Role]:
        return self.spec.roles

    def min_role_replicas(self, role: Role) -> int:
        """Instances of `role` Volcano must place together (`minRoleReplicas`, default all)."""
        gang = self.spec.gang_policy
        if gang is None or gang.min_role_replicas is None:
            return role.replicas
        return gang.min_role_replicas.get(role.name, role.replicas)

    def min_member(self) -> int:
        """Pods Volcano must place together: `minRoleReplicas` instances of each role."""
        return sum(self.min_role_replicas(r) * instance_size(r) for r in self.spec.roles)

    def min_task_member(self) -> dict[str, int]:
        return {r.name: self.min_role_replicas(r) * instance_size(r) for r in self.spec.roles}

    def uses_volcano(self) -> bool:
        return any(_uses_volcano(r) for r in self.spec.roles)


@dataclass(frozen=True, slots=True)
class SpecProblem:
    """A value the planner will not act on, reported on the SpecValid condition."""

    field: str  # e.g. "spec.template.roles[1].workerTemplate"
    reason: str  # CamelCase, names the field, e.g. "InvalidWorkerTemplate"
    message: str


@dataclass(frozen=True, slots=True)
class InvalidSpec:
    """A ModelInfer the API models reject: what the planner needs to report it, and why."""

    name: str
    namespace: str
    generation: int
    problems: tuple[SpecProblem, ...]


@dataclass(frozen=True, slots=True)
class Resolved:
    """What the planner derives from a valid ModelInfer (none of it is in the API object)."""

    template: GroupTemplate  # at the update revision
    max_unavailable: int  # rolloutStrategy.maxUnavailable resolved against replicas, >= 1
    partition: int  # rolloutStrategy.partition resolved against replicas
    problems: tuple[SpecProblem, ...] = ()  # what the API models cannot check (name lengths)


@dataclass(frozen=True, slots=True)
class ObservedPod:
    """The facts about one of our pods the planner needs (parsed from labels and status)."""

    name: str
    group: int
    role: str
    role_replica: int
    index: int  # 0 = entry pod
    revision: str
    role_revision: str
    phase: str = "Pending"
    ready: bool = False
    terminating: bool = False
    deletion_cost: int = 0
    failed_at: float | None = None  # epoch seconds the pod was seen failed (phase Failed)
    uid: str = ""  # metadata.uid: tells a pod from an earlier one of the same name

    @property
    def failed(self) -> bool:
        return self.phase in ("Failed", "Succeeded")

    @property
    def serving(self) -> bool:
        return self.ready and self.phase == "Running" and not self.terminating


@dataclass(frozen=True, slots=True)
class ObservedService:
    name: str
    group: int


@dataclass(frozen=True, slots=True)
class ObservedPodGroup:
    name: str
    group: int
    min_member: int


@dataclass(frozen=True, slots=True)
class Observed:
    """What exists in the cluster for one ModelInfer (children found by label and owner)."""

    pods: tuple[ObservedPod, ...] = ()
    services: tuple[ObservedService, ...] = ()
    podgroups: tuple[ObservedPodGroup, ...] = ()
    revisions: Mapping[str, GroupTemplate] = field(default_factory=dict)  # ControllerRevisions
    gang_available: bool = False  # the Volcano PodGroup CRD is served (discovery)
    current_revision: str | None = None  # from .status.currentRevision
    conditions: tuple[Condition, ...] = ()  # from .status.conditions (the API's type)
    status: JSON = field(default_factory=dict)  # the whole previous .status, to skip no-op patches


@dataclass(frozen=True, slots=True)
class PlannerState:
    """Memory kept between plans of one ModelInfer (lost on restart; that only resets timers)."""

    failures_first_seen: Mapping[str, float] = field(default_factory=dict)  # instance key -> t
    recreating: frozenset[int] = frozenset()  # group indices deleted to be recreated in place


@dataclass(frozen=True, slots=True)
class EventNote:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ChildToCreate:
    name: str
    manifest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LabelPatch:
    name: str
    labels: dict[str, str]


@dataclass(slots=True)
class Plan:
    """Everything one reconcile should do, in execution order (deletes, then creates)."""

    delete_pods: list[str] = field(default_factory=list)
    delete_services: list[str] = field(default_factory=list)
    delete_podgroups: list[str] = field(default_factory=list)
    delete_revisions: list[str] = field(default_factory=list)
    create_revisions: list[ChildToCreate] = field(default_factory=list)
    create_podgroups: list[ChildToCreate] = field(default_factory=list)
    patch_podgroups: list[ChildToCreate] = field(default_factory=list)  # manifest = merge patch
    create_services: list[ChildToCreate] = field(default_factory=list)
    create_pods: list[ChildToCreate] = field(default_factory=list)
    relabel_pods: list[LabelPatch] = field(default_factory=list)
    status: dict[str, Any] | None = None  # None: status unchanged, nothing to patch
    events: list[EventNote] = field(default_factory=list)
    requeue_after: float | None = None
    state: PlannerState = field(default_factory=PlannerState)
    groups_by_state: dict[GroupState, int] = field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        return bool(
            self.delete_pods
            or self.delete_services
            or self.delete_podgroups
            or self.delete_revisions
            or self.create_revisions
            or self.create_podgroups
            or self.patch_podgroups
            or self.create_services
            or self.create_pods
            or self.relabel_pods
        )


def name_of(mi: ModelInfer) -> str:
    return mi.metadata.name or ""


def namespace_of(mi: ModelInfer) -> str:
    return mi.metadata.namespace or "default"


def generation_of(mi: ModelInfer) -> int:
    return mi.metadata.generation or 1
