"""Names, revision hashes and the manifests of a ModelInfer's children (pure functions).

Naming (all deterministic, so a restarted controller finds what it made and never duplicates):

- pod:        ``<modelinfer>-<group>-<role>-<roleReplica>-<index>`` (index 0 = entry pod)
- Service:    ``<modelinfer>-<group>-<role>-<roleReplica>`` (headless; only with workers)
- PodGroup:   ``<modelinfer>-<group>`` (Volcano gang scheduling)
- revision:   ``<modelinfer>-<revision>`` (apps/v1 ControllerRevision holding the template)

``ENTRY_ADDRESS`` is ``<entry-pod>.<service>.<namespace>.svc``: the entry pod sets ``hostname`` to
its name and ``subdomain`` to the headless Service, which publishes not-ready addresses so workers
can find the entry pod while it starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from controllers.modelinfer.types import (
    ANNOTATION_VOLCANO_GROUP,
    ANNOTATION_VOLCANO_TASK,
    API_GROUP,
    API_VERSION,
    JSON,
    KIND,
    LABEL_ENTRY,
    LABEL_GROUP,
    LABEL_MODEL_INFER,
    LABEL_REVISION,
    LABEL_ROLE,
    LABEL_ROLE_REPLICA,
    LABEL_ROLE_REVISION,
    GroupTemplate,
    generation_of,
    instance_size,
    name_of,
    namespace_of,
)
from crds.workload import InferGroupTemplate, ModelInfer, Role


def revision_hash(obj: Any) -> str:
    """A stable short hash of a JSON-able object (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def instance_name(mi: str, group: int, role: str, role_replica: int) -> str:
    return f"{mi}-{group}-{role}-{role_replica}"


def pod_name(mi: str, group: int, role: str, role_replica: int, index: int) -> str:
    return f"{mi}-{group}-{role}-{role_replica}-{index}"


def podgroup_name(mi: str, group: int) -> str:
    return f"{mi}-{group}"


def revision_name(mi: str, revision: str) -> str:
    return f"{mi}-{revision}"


def label_selector(mi: str) -> str:
    """The scale subresource's selector: the entry pods (one per role instance) serve requests."""
    return f"{LABEL_MODEL_INFER}={mi},{LABEL_ENTRY}=true"


def owner_reference(mi: ModelInfer) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": name_of(mi),
        "uid": mi.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _with_env(container: dict[str, Any], env: list[dict[str, str]]) -> None:
    ours = {e["name"] for e in env}
    kept = [e for e in container.get("env") or [] if e.get("name") not in ours]
    container["env"] = kept + env


def pod_manifest(
    mi: ModelInfer,
    template: GroupTemplate,
    role: Role,
    group: int,
    role_replica: int,
    index: int,
    gang: bool,
) -> dict[str, Any]:
    """The pod `index` of one role instance, built from the entry or worker pod template."""
    source: JSON = role.entry_template if index == 0 else (role.worker_template or {})
    mi_name, namespace = name_of(mi), namespace_of(mi)
    name = pod_name(mi_name, group, role.name, role_replica, index)
    svc = instance_name(mi_name, group, role.name, role_replica)
    meta_in: JSON = source.get("metadata") or {}
    labels: dict[str, str] = dict(meta_in.get("labels") or {})
    labels.update(
        {
            LABEL_MODEL_INFER: mi_name,
            LABEL_GROUP: str(group),
            LABEL_ROLE: role.name,
            LABEL_ROLE_REPLICA: str(role_replica),
            LABEL_ENTRY: "true" if index == 0 else "false",
            LABEL_REVISION: template.revision,
            LABEL_ROLE_REVISION: template.role_revisions[role.name],
        }
    )
    annotations: dict[str, str] = dict(meta_in.get("annotations") or {})
    if gang:
        annotations[ANNOTATION_VOLCANO_GROUP] = podgroup_name(mi_name, group)
        annotations[ANNOTATION_VOLCANO_TASK] = role.name
    pod_spec: dict[str, Any] = copy.deepcopy(dict(source.get("spec") or {}))
    env = [
        {"name": "GROUP_SIZE", "value": str(instance_size(role))},
        {"name": "WORKER_INDEX", "value": str(index)},
        {"name": "ROLE", "value": role.name},
        {"name": "GROUP_INDEX", "value": str(group)},
        {"name": "ROLE_REPLICA", "value": str(role_replica)},
    ]
    if role.worker_replicas > 0:
        entry = pod_name(mi_name, group, role.name, role_replica, 0)
        env.insert(0, {"name": "ENTRY_ADDRESS", "value": f"{entry}.{svc}.{namespace}.svc"})
        pod_spec["hostname"] = name
        pod_spec["subdomain"] = svc
    for key in ("containers", "initContainers"):
        for container in pod_spec.get(key) or []:
            _with_env(container, env)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(mi)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def service_manifest(mi: ModelInfer, role: Role, group: int, role_replica: int) -> dict[str, Any]:
    """The headless Service that gives a role instance's pods stable DNS names."""
    selector = {
        LABEL_MODEL_INFER: name_of(mi),
        LABEL_GROUP: str(group),
        LABEL_ROLE: role.name,
        LABEL_ROLE_REPLICA: str(role_replica),
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": instance_name(name_of(mi), group, role.name, role_replica),
            "namespace": namespace_of(mi),
            "labels": dict(selector),
            "ownerReferences": [owner_reference(mi)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector,
        },
    }


def podgroup_manifest(mi: ModelInfer, template: GroupTemplate, group: int) -> dict[str, Any]:
    """A Volcano PodGroup: the group's pods are scheduled all together or not at all."""
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": {
            "name": podgroup_name(name_of(mi), group),
            "namespace": namespace_of(mi),
            "labels": {LABEL_MODEL_INFER: name_of(mi), LABEL_GROUP: str(group)},
            "ownerReferences": [owner_reference(mi)],
        },
        "spec": {
            "minMember": template.min_member(),
            "minTaskMember": template.min_task_member(),
        },
    }


def template_data(template: InferGroupTemplate) -> dict[str, Any]:
    """The canonical JSON of a group template: what a ControllerRevision stores and the revision
    hashes are taken over (defaults written in; `restartGracePeriodSeconds` is not part of it,
    so changing it replaces no pod). Changing this shape would roll every InferGroup."""
    roles = []
    for r in template.roles:
        role: dict[str, Any] = {
            "name": r.name,
            "replicas": r.replicas,
            "workerReplicas": r.worker_replicas,
            "entryTemplate": r.entry_template,
        }
        if r.worker_template:
            role["workerTemplate"] = r.worker_template
        roles.append(role)
    gang = template.gang_policy
    min_role_replicas = dict(gang.min_role_replicas or {}) if gang is not None else {}
    return {"roles": roles, "gangPolicy": {"minRoleReplicas": min_role_replicas}}


def revision_manifest(mi: ModelInfer, template: GroupTemplate) -> dict[str, Any]:
    """An apps/v1 ControllerRevision keeping a template, so older groups can be recreated."""
    return {
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": revision_name(name_of(mi), template.revision),
            "namespace": namespace_of(mi),
            "labels": {LABEL_MODEL_INFER: name_of(mi), LABEL_REVISION: template.revision},
            "ownerReferences": [owner_reference(mi)],
        },
        "data": template_data(template.spec),
        "revision": generation_of(mi),
    }
