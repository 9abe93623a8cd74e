"""The Model planner's vocabulary: kinds and labels of the children, what is observed of them,
and the actions and problems the planner returns. Pure data: no Kopf, HTTP or client here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from crds.networking import NETWORKING_GROUP
from crds.registry import REGISTRY_GROUP
from crds.workload import WORKLOAD_GROUP

API_VERSION = "v1alpha1"
MODEL_API_VERSION = f"{REGISTRY_GROUP}/{API_VERSION}"
MODEL_PLURAL = "models"

LABEL_MODEL = f"{REGISTRY_GROUP}/model"
LABEL_BACKEND = f"{REGISTRY_GROUP}/backend"

JSON = Mapping[str, Any]

ChildKind = Literal["ConfigMap", "ModelInfer", "ModelServer", "ModelRoute", "AutoscalingPolicy"]


@dataclass(frozen=True, slots=True)
class KindInfo:
    """Where a child kind lives in the API (``group`` empty: the core API), and the field that
    holds what the Model decides (``spec``, or ``data`` of a ConfigMap)."""

    kind: ChildKind
    group: str
    plural: str
    version: str = API_VERSION
    content: Literal["spec", "data"] = "spec"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        base = f"{root}/namespaces/{namespace}/{self.plural}"
        return base + (f"/{name}" if name else "")


CHILD_KINDS: dict[ChildKind, KindInfo] = {
    # the runtime sidecars' adapters file: before the ModelInfers whose pods mount it
    "ConfigMap": KindInfo("ConfigMap", "", "configmaps", version="v1", content="data"),
    "ModelInfer": KindInfo("ModelInfer", WORKLOAD_GROUP, "modelinfers"),
    "ModelServer": KindInfo("ModelServer", NETWORKING_GROUP, "modelservers"),
    "ModelRoute": KindInfo("ModelRoute", NETWORKING_GROUP, "modelroutes"),
    "AutoscalingPolicy": KindInfo("AutoscalingPolicy", REGISTRY_GROUP, "autoscalingpolicies"),
}
"""Every kind a Model generates, in the order they are created (what pods mount, then workloads,
then routing)."""


def model_path(namespace: str, name: str, sub: str = "") -> str:
    path = f"/apis/{REGISTRY_GROUP}/{API_VERSION}/namespaces/{namespace}/{MODEL_PLURAL}/{name}"
    return path + (f"/{sub}" if sub else "")


@dataclass(frozen=True, slots=True)
class ChildRef:
    """A child by kind and name (in the Model's namespace)."""

    kind: ChildKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class DesiredChild:
    """One object the Model wants to exist, as the full manifest to create.

    ``replica_bounds`` (ModelInfers of autoscaled backends): ``spec.replicas`` anywhere in
    [min, max] is left alone (the autoscaler, HPA or KEDA own it); outside it is clamped.
    """

    ref: ChildRef
    backend: str | None
    manifest: dict[str, Any]
    replica_bounds: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class ObservedChild:
    """One object of a child kind as it is in the API."""

    ref: ChildRef
    labels: Mapping[str, str]
    controller_uid: str | None  # uid of the ownerReference with controller: true
    owner_refs: tuple[Mapping[str, Any], ...]
    spec: Mapping[str, Any]  # the kind's content field: ``spec``, or a ConfigMap's ``data``
    status: Mapping[str, Any]
    deleting: bool = False


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong that the Model's Failed condition reports: a reason and a message that
    names the field or the child at fault."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Action:
    """One API write: create a child (body = manifest), patch it (body = JSON merge patch) or
    delete it (no body)."""

    verb: Literal["create", "patch", "delete"]
    ref: ChildRef
    body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Desired:
    """What the Model generates, and what keeps it from generating the rest."""

    children: tuple[DesiredChild, ...]
    problems: tuple[Problem, ...] = ()
    held: tuple[ChildRef, ...] = ()  # wanted but invalid: neither created, patched nor deleted


@dataclass(frozen=True, slots=True)
class Plan:
    """The actions that make the observed children the desired ones, and the problems found."""

    actions: tuple[Action, ...]
    problems: tuple[Problem, ...] = ()
    missing: tuple[ChildRef, ...] = ()  # desired children that do not exist (yet)


@dataclass(frozen=True, slots=True)
class EventNote:
    """A Kubernetes Event to post on the Model."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class StatusPlan:
    """The Model's new status and the Events of the condition transitions."""

    status: dict[str, Any]
    events: tuple[EventNote, ...] = field(default_factory=tuple)
    state: str = "Initializing"  # Failed | Active | Initializing: the models metric's label
