"""workload.matrixinfer.ai/v1alpha1: ModelInfer — replicas of an InferGroup (a group of role pods:
an entry pod plus worker pods per role instance)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from crds.common import (
    DNS1035_LABEL,
    ApiModel,
    CelRule,
    IntOrPercent,
    ObjectMeta,
    PodTemplate,
    StatusBase,
    unique,
)

__all__ = [
    "WORKLOAD_GROUP",
    "GangPolicy",
    "InferGroupTemplate",
    "ModelInfer",
    "ModelInferSpec",
    "ModelInferStatus",
    "Role",
    "RolloutStrategy",
]

WORKLOAD_GROUP = "workload.matrixinfer.ai"
API_VERSION: Literal["workload.matrixinfer.ai/v1alpha1"] = "workload.matrixinfer.ai/v1alpha1"


class Role(ApiModel):
    """A role of the InferGroup (e.g. prefill, decode): `replicas` instances per group, each an
    entry pod plus `workerReplicas` worker pods."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.workerReplicas == 0 || has(self.workerTemplate)",
            message="workerTemplate is required when workerReplicas > 0",
            check=lambda s: s.worker_replicas == 0 or s.worker_template is not None,
            field_path=".workerTemplate",
        ),
    )

    name: str = Field(
        description="Role name: a DNS-1035 label of at most 12 characters, unique in the group.",
        min_length=1,
        max_length=12,
        pattern=DNS1035_LABEL,
    )
    replicas: int = Field(
        default=1, description="Instances of this role in each InferGroup.", ge=0, le=1024
    )
    entry_template: PodTemplate = Field(
        description="Pod template of the entry pod (index 0) of each role instance."
    )
    worker_replicas: int = Field(
        default=0, description="Worker pods beside each entry pod.", ge=0, le=1024
    )
    worker_template: PodTemplate | None = Field(
        default=None,
        description="Pod template of the worker pods; required when workerReplicas > 0.",
    )


class GangPolicy(ApiModel):
    """Gang scheduling: a Volcano PodGroup per InferGroup (when the pods use schedulerName
    volcano and the PodGroup CRD exists)."""

    min_role_replicas: dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        description="Per role name, the role instances that must be schedulable together;"
        " absent: all of them.",
        max_length=4,
    )


class RolloutStrategy(ApiModel):
    """How a template change rolls out."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="string(self.maxUnavailable) != '0' && string(self.maxUnavailable) != '0%'",
            message="maxUnavailable must not be 0",
            check=lambda s: str(s.max_unavailable) not in ("0", "0%"),
            field_path=".maxUnavailable",
        ),
    )

    type: Literal["GroupRollingUpdate", "RoleRollingUpdate"] = Field(
        default="GroupRollingUpdate",
        description="GroupRollingUpdate replaces whole InferGroups; RoleRollingUpdate replaces"
        " changed roles only.",
    )
    max_unavailable: IntOrPercent = Field(
        default=1,
        description='InferGroups that may be unavailable during the update (int or "NN%",'
        " never 0).",
    )
    partition: IntOrPercent = Field(
        default=0,
        description='Groups with an index below this (int or "NN%") keep the old revision.',
    )


def _min_role_replicas_keys(s: InferGroupTemplate) -> bool:
    if s.gang_policy is None or s.gang_policy.min_role_replicas is None:
        return True
    names = {r.name for r in s.roles}
    return all(k in names for k in s.gang_policy.min_role_replicas)


def _min_role_replicas_bounds(s: InferGroupTemplate) -> bool:
    if s.gang_policy is None or s.gang_policy.min_role_replicas is None:
        return True
    mrr = s.gang_policy.min_role_replicas
    return all(r.name not in mrr or mrr[r.name] <= r.replicas for r in s.roles)


class InferGroupTemplate(ApiModel):
    """The shape of one InferGroup."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.roles.all(r, self.roles.exists_one(x, x.name == r.name))",
            message="role names must be unique",
            check=lambda s: unique([r.name for r in s.roles]),
            field_path=".roles",
        ),
        CelRule(
            rule="!has(self.gangPolicy) || !has(self.gangPolicy.minRoleReplicas)"
            " || self.gangPolicy.minRoleReplicas.all(k, self.roles.exists(r, r.name == k))",
            message="gangPolicy.minRoleReplicas keys must be role names",
            check=_min_role_replicas_keys,
            field_path=".gangPolicy.minRoleReplicas",
        ),
        CelRule(
            rule="!has(self.gangPolicy) || !has(self.gangPolicy.minRoleReplicas)"
            " || self.roles.all(r, !(r.name in self.gangPolicy.minRoleReplicas)"
            " || self.gangPolicy.minRoleReplicas[r.name] <= r.replicas)",
            message="gangPolicy.minRoleReplicas must not exceed the role's replicas",
            check=_min_role_replicas_bounds,
            field_path=".gangPolicy.minRoleReplicas",
        ),
    )

    roles: list[Role] = Field(
        description="Roles of the group (1-4), each with a unique name.",
        min_length=1,
        max_length=4,
    )
    restart_grace_period_seconds: int | None = Field(
        default=None,
        description="Seconds a failed pod may take to come back before the recovery policy"
        " acts; absent: act at once.",
        ge=0,
    )
    gang_policy: GangPolicy | None = Field(
        default=None, description="Gang scheduling; absent: pods are scheduled one by one."
    )


class ModelInferSpec(ApiModel):
    """Desired InferGroups."""

    replicas: int = Field(default=1, description="Number of InferGroups.", ge=0)
    template: InferGroupTemplate = Field(description="The InferGroup every replica follows.")
    recovery_policy: Literal["RoleRecreate", "GroupRecreate", "None"] = Field(
        default="RoleRecreate",
        description="What a failed pod takes down: RoleRecreate recreates its role instance,"
        " GroupRecreate the whole group, None only the pod.",
    )
    rollout_strategy: RolloutStrategy = Field(
        default_factory=RolloutStrategy,
        description="How template changes roll out.",
        json_schema_extra={"default": {}},
    )


class ModelInferStatus(StatusBase):
    """Observed state of a ModelInfer (conditions Available, Progressing, UpdateInProgress)."""

    replicas: int | None = Field(default=None, description="InferGroups that exist.", ge=0)
    ready_replicas: int | None = Field(
        default=None, description="InferGroups whose pods are all ready.", ge=0
    )
    updated_replicas: int | None = Field(
        default=None, description="InferGroups at the update revision.", ge=0
    )
    available_replicas: int | None = Field(
        default=None, description="InferGroups ready and serving.", ge=0
    )
    current_revision: str | None = Field(
        default=None, description="Revision of the groups below the partition."
    )
    update_revision: str | None = Field(
        default=None, description="Revision of the current template."
    )
    label_selector: str | None = Field(
        default=None,
        description="Selector of the entry pods, as a string (for the scale subresource).",
    )


class ModelInfer(ApiModel):
    """A ModelInfer runs `replicas` InferGroups of role pods."""

    api_version: Literal["workload.matrixinfer.ai/v1alpha1"] = Field(
        default=API_VERSION, description="API version of the object."
    )
    kind: Literal["ModelInfer"] = Field(default="ModelInfer", description="Kind of the object.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard metadata.")
    spec: ModelInferSpec = Field(description="Desired state.")
    status: ModelInferStatus | None = Field(default=None, description="Observed state.")
