"""From API objects (JSON) to the planner's observed facts. Pure; used by the Kopf indexes."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from controllers.modelinfer.spec import group_template
from controllers.modelinfer.types import (
    ANNOTATION_DELETION_COST,
    LABEL_GROUP,
    LABEL_MODEL_INFER,
    LABEL_REVISION,
    LABEL_ROLE,
    LABEL_ROLE_REPLICA,
    LABEL_ROLE_REVISION,
    GroupTemplate,
    ObservedPod,
    ObservedPodGroup,
    ObservedService,
)
from crds.common import Condition
from crds.workload import InferGroupTemplate


def _time(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def pod_from_json(body: Mapping[str, Any], now: float) -> ObservedPod | None:
    """None when the pod does not carry our labels in the expected shape."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    name = str(meta.get("name", ""))
    try:
        group = int(labels[LABEL_GROUP])
        role = str(labels[LABEL_ROLE])
        role_replica = int(labels[LABEL_ROLE_REPLICA])
        index = int(name.rsplit("-", 1)[1])
    except (KeyError, ValueError, IndexError):
        return None
    status = body.get("status") or {}
    phase = str(status.get("phase") or "Pending")
    ready = False
    ready_since: float | None = None
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            ready = c.get("status") == "True"
            ready_since = _time(c.get("lastTransitionTime"))
    try:
        cost = int((meta.get("annotations") or {}).get(ANNOTATION_DELETION_COST, 0))
    except ValueError:
        cost = 0
    failed_at: float | None = None
    if phase in ("Failed", "Succeeded"):
        failed_at = ready_since if ready_since is not None else now
    return ObservedPod(
        name=name,
        group=group,
        role=role,
        role_replica=role_replica,
        index=index,
        revision=str(labels.get(LABEL_REVISION, "")),
        role_revision=str(labels.get(LABEL_ROLE_REVISION, "")),
        phase=phase,
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")),
        deletion_cost=cost,
        failed_at=failed_at,
        uid=str(meta.get("uid") or ""),
    )


def service_from_json(body: Mapping[str, Any]) -> ObservedService | None:
    meta = body.get("metadata") or {}
    try:
        return ObservedService(str(meta["name"]), int((meta.get("labels") or {})[LABEL_GROUP]))
    except (KeyError, ValueError):
        return None


def podgroup_from_json(body: Mapping[str, Any]) -> ObservedPodGroup | None:
    meta = body.get("metadata") or {}
    try:
        return ObservedPodGroup(
            str(meta["name"]),
            int((meta.get("labels") or {})[LABEL_GROUP]),
            int((body.get("spec") or {}).get("minMember", 0)),
        )
    except (KeyError, ValueError):
        return None


def revision_from_json(body: Mapping[str, Any]) -> GroupTemplate | None:
    """The template a ControllerRevision keeps; None when its data is not one."""
    try:
        return group_template(InferGroupTemplate.model_validate(body.get("data") or {}))
    except ValidationError:
        return None


_CONDITION_KEYS = ("type", "status", "reason", "message", "lastTransitionTime")


def conditions_from_status(status: Mapping[str, Any]) -> tuple[Condition, ...]:
    """The well-formed conditions of a status (others are skipped: the planner rewrites them)."""
    out = []
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and "type" in c:
            fields = {k: c[k] for k in _CONDITION_KEYS if k in c}
            fields.setdefault("status", "Unknown")
            try:
                out.append(Condition.model_validate(fields))
            except ValidationError:
                continue
    return tuple(out)


def owner_key(body: Mapping[str, Any]) -> tuple[str, str] | None:
    meta = body.get("metadata") or {}
    mi = (meta.get("labels") or {}).get(LABEL_MODEL_INFER)
    if not mi:
        return None
    return str(meta.get("namespace", "")), str(mi)
