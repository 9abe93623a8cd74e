"""From a ModelInfer object (JSON as the API server stores it) to the planner's ModelInferSpec.

Pure: defaults, int-or-percent resolution, revision hashes and the checks the CRD schema cannot
express. Problems never raise: they come back as `SpecProblem`s naming the field, and the planner
reports them on the `SpecValid` condition instead of touching any pod.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from controllers.modelinfer.manifests import pod_name, revision_hash
from controllers.modelinfer.types import (
    MAX_NAME_LENGTH,
    GroupTemplate,
    ModelInferSpec,
    RecoveryPolicy,
    RoleSpec,
    RolloutType,
    SpecProblem,
)

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_PERCENT = re.compile(r"^(\d+)%$")


class SpecError(ValueError):
    """A value the planner cannot work with; `field` names where it is."""

    def __init__(self, field: str, reason: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.problem = SpecProblem(field, reason, message)


def resolve_int_or_percent(value: Any, total: int, field: str, round_up: bool) -> int:
    """`3` -> 3; `"25%"` of `total` -> rounded down (or up); anything else -> SpecError."""
    if isinstance(value, bool):
        raise SpecError(field, "InvalidIntOrPercent", f"must be an integer or 'NN%', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise SpecError(field, "InvalidIntOrPercent", f"must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        match = _PERCENT.match(value.strip())
        if match:
            exact = total * int(match.group(1)) / 100
            return math.ceil(exact) if round_up else math.floor(exact)
    raise SpecError(field, "InvalidIntOrPercent", f"must be an integer or 'NN%', got {value!r}")


def _role_from_data(data: Mapping[str, Any]) -> RoleSpec:
    worker_template = data.get("workerTemplate")
    return RoleSpec(
        name=str(data.get("name", "")),
        replicas=int(data.get("replicas", 1)),
        worker_replicas=int(data.get("workerReplicas", 0)),
        entry_template=dict(data.get("entryTemplate") or {}),
        worker_template=dict(worker_template) if worker_template else None,
        revision=revision_hash(data),
    )


def canonical_template(template: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of `spec.template` that define pods, with defaults written in."""
    roles = []
    for r in template.get("roles") or []:
        role: dict[str, Any] = {
            "name": r.get("name", ""),
            "replicas": r.get("replicas", 1),
            "workerReplicas": r.get("workerReplicas", 0),
            "entryTemplate": r.get("entryTemplate") or {},
        }
        if r.get("workerTemplate"):
            role["workerTemplate"] = r["workerTemplate"]
        roles.append(role)
    gang = template.get("gangPolicy") or {}
    return {
        "roles": roles,
        "gangPolicy": {"minRoleReplicas": dict(gang.get("minRoleReplicas") or {})},
    }


def group_template_from_data(data: Mapping[str, Any]) -> GroupTemplate:
    """A GroupTemplate from its canonical JSON (the spec's template or a ControllerRevision)."""
    canon = canonical_template(data)
    roles = tuple(_role_from_data(r) for r in canon["roles"])
    mrr = {str(k): int(v) for k, v in canon["gangPolicy"]["minRoleReplicas"].items()}
    return GroupTemplate(revision=revision_hash(canon), roles=roles, min_role_replicas=mrr)


def _check(
    name: str, replicas: int, tmpl: GroupTemplate, raw: Mapping[str, Any]
) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    raw_roles = list(raw.get("roles") or [])
    if not tmpl.roles:
        problems.append(
            SpecProblem("spec.template.roles", "RolesMissing", "at least one role is required")
        )
    seen: set[str] = set()
    for i, role in enumerate(tmpl.roles):
        at = f"spec.template.roles[{i}]"
        if not _DNS1035.match(role.name) or len(role.name) > 12:
            problems.append(
                SpecProblem(
                    f"{at}.name",
                    "InvalidRoleName",
                    f"{role.name!r} must be a DNS-1035 label of at most 12 characters",
                )
            )
        if role.name in seen:
            problems.append(
                SpecProblem(f"{at}.name", "DuplicateRoleName", f"role {role.name!r} appears twice")
            )
        seen.add(role.name)
        if role.replicas < 0:
            problems.append(SpecProblem(f"{at}.replicas", "InvalidReplicas", "must be >= 0"))
        if role.worker_replicas < 0:
            problems.append(
                SpecProblem(f"{at}.workerReplicas", "InvalidWorkerReplicas", "must be >= 0")
            )
        if role.worker_replicas > 0 and not role.worker_template:
            problems.append(
                SpecProblem(
                    f"{at}.workerTemplate",
                    "WorkerTemplateMissing",
                    f"required when workerReplicas is {role.worker_replicas} (> 0)",
                )
            )
        for key, t in (
            ("entryTemplate", role.entry_template),
            ("workerTemplate", role.worker_template),
        ):
            if t is None or (key == "workerTemplate" and role.worker_replicas == 0):
                continue
            if not (t.get("spec") or {}).get("containers"):
                problems.append(
                    SpecProblem(
                        f"{at}.{key}.spec.containers",
                        "ContainersMissing",
                        "a pod template needs at least one container",
                    )
                )
        if i < len(raw_roles) and raw_roles[i].get("workerTemplate") and role.worker_replicas == 0:
            pass  # a worker template without workers is allowed (kept for a later scale-up)
    for rname, count in tmpl.min_role_replicas.items():
        role_spec = tmpl.by_name.get(rname)
        field = f"spec.template.gangPolicy.minRoleReplicas[{rname}]"
        if role_spec is None:
            problems.append(SpecProblem(field, "UnknownRole", f"no role named {rname!r}"))
        elif not 0 <= count <= role_spec.replicas:
            problems.append(
                SpecProblem(
                    field,
                    "InvalidMinRoleReplicas",
                    f"must be between 0 and the role's replicas ({role_spec.replicas}), "
                    f"got {count}",
                )
            )
    needs_service = any(r.worker_replicas > 0 for r in tmpl.roles)
    if needs_service and not _DNS1035.match(name):
        problems.append(
            SpecProblem(
                "metadata.name",
                "InvalidNameForService",
                f"{name!r} must start with a letter: role instances with workers get a headless "
                "Service named after it (DNS-1035)",
            )
        )
    for role in tmpl.roles:
        longest = pod_name(
            name, max(replicas - 1, 0), role.name, max(role.replicas - 1, 0), role.worker_replicas
        )
        if len(longest) > MAX_NAME_LENGTH:
            problems.append(
                SpecProblem(
                    "metadata.name",
                    "NameTooLong",
                    f"pod name {longest!r} would have {len(longest)} characters, more than "
                    f"{MAX_NAME_LENGTH}; shorten metadata.name or role {role.name!r}",
                )
            )
            break
    return problems


def _reason_for(path: str) -> str:
    """`spec.template.roles[0].workerTemplate` -> `InvalidWorkerTemplate`."""
    last = re.sub(r"\[[^\]]*\]", "", path).rsplit(".", 1)[-1] or "Spec"
    return "Invalid" + last[:1].upper() + last[1:]


def validate_with_crds(obj: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[SpecProblem]]:
    """Validate against the `crds` models; the spec with defaults written in, or the problems."""
    import crds

    doc = {k: v for k, v in obj.items() if k != "status"}
    doc.setdefault("apiVersion", "workload.matrixinfer.ai/v1alpha1")
    doc.setdefault("kind", "ModelInfer")
    try:
        model = crds.parse_object(doc, source="ModelInfer")
    except crds.InvalidObject as exc:
        return None, [
            SpecProblem(path or "spec", _reason_for(path), msg) for path, msg in exc.errors
        ]
    dumped = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dict(dumped.get("spec") or {}), []


def spec_from_object(obj: Mapping[str, Any]) -> ModelInferSpec:
    """The planner's ModelInferSpec from a ModelInfer object as JSON (camelCase).

    The object is validated with the `crds` models first (defaults written in); what they reject
    becomes SpecProblems naming the field, and the planner then leaves the pods alone.
    """
    meta = obj.get("metadata") or {}
    validated, crd_problems = validate_with_crds(obj)
    if crd_problems:
        return ModelInferSpec(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "default")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation", 1) or 1),
            replicas=0,
            template=GroupTemplate(revision="invalid", roles=()),
            problems=tuple(crd_problems),
        )
    spec = validated if validated is not None else (obj.get("spec") or {})
    raw_template = spec.get("template") or {}
    name = str(meta.get("name", ""))
    problems: list[SpecProblem] = []
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        problems.append(
            SpecProblem(
                "spec.replicas", "InvalidReplicas", f"must be an integer >= 0, got {replicas!r}"
            )
        )
        replicas = 0
    try:
        template = group_template_from_data(raw_template)
    except (TypeError, ValueError) as exc:
        problems.append(SpecProblem("spec.template", "InvalidTemplate", str(exc)))
        template = GroupTemplate(revision="invalid", roles=())
    problems.extend(_check(name, replicas, template, raw_template))
    strategy = spec.get("rolloutStrategy") or {}
    rollout_raw = strategy.get("type", RolloutType.GROUP_ROLLING_UPDATE.value)
    try:
        rollout = RolloutType(rollout_raw)
    except ValueError:
        problems.append(
            SpecProblem(
                "spec.rolloutStrategy.type", "InvalidRolloutType", f"unknown {rollout_raw!r}"
            )
        )
        rollout = RolloutType.GROUP_ROLLING_UPDATE
    recovery_raw = spec.get("recoveryPolicy", RecoveryPolicy.ROLE_RECREATE.value)
    try:
        recovery = RecoveryPolicy(recovery_raw)
    except ValueError:
        problems.append(
            SpecProblem("spec.recoveryPolicy", "InvalidRecoveryPolicy", f"unknown {recovery_raw!r}")
        )
        recovery = RecoveryPolicy.ROLE_RECREATE
    max_unavailable = 1
    partition = 0
    try:
        max_unavailable = max(
            1,
            resolve_int_or_percent(
                strategy.get("maxUnavailable", 1),
                replicas,
                "spec.rolloutStrategy.maxUnavailable",
                round_up=False,
            ),
        )
        if strategy.get("maxUnavailable") == 0:
            problems.append(
                SpecProblem(
                    "spec.rolloutStrategy.maxUnavailable", "InvalidMaxUnavailable", "must not be 0"
                )
            )
    except SpecError as exc:
        problems.append(exc.problem)
    try:
        partition = resolve_int_or_percent(
            strategy.get("partition", 0), replicas, "spec.rolloutStrategy.partition", round_up=False
        )
    except SpecError as exc:
        problems.append(exc.problem)
    grace = raw_template.get("restartGracePeriodSeconds", 0) or 0
    if not isinstance(grace, int | float) or grace < 0:
        problems.append(
            SpecProblem(
                "spec.template.restartGracePeriodSeconds",
                "InvalidRestartGracePeriod",
                f"must be a number >= 0, got {grace!r}",
            )
        )
        grace = 0
    return ModelInferSpec(
        name=name,
        namespace=str(meta.get("namespace", "default")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 1) or 1),
        replicas=replicas,
        template=template,
        recovery_policy=recovery,
        rollout_type=rollout,
        max_unavailable=max_unavailable,
        partition=partition,
        restart_grace_period_seconds=float(grace),
        problems=tuple(problems),
    )
