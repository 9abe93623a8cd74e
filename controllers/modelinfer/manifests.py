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
    ModelInferSpec,
    RoleSpec,
)

ENV_NAMES = ("ENTRY_ADDRESS", "GROUP_SIZE", "WORKER_INDEX", "ROLE", "GROUP_INDEX", "ROLE_REPLICA")


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


def owner_reference(spec: ModelInferSpec) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": spec.name,
        "uid": spec.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _with_env(container: dict[str, Any], env: list[dict[str, str]]) -> None:
    ours = {e["name"] for e in env}
    kept = [e for e in container.get("env") or [] if e.get("name") not in ours]
    container["env"] = kept + env


def pod_manifest(
    spec: ModelInferSpec,
    template: GroupTemplate,
    role: RoleSpec,
    group: int,
    role_replica: int,
    index: int,
    gang: bool,
) -> dict[str, Any]:
    """The pod `index` of one role instance, built from the entry or worker pod template."""
    source: JSON = role.entry_template if index == 0 else (role.worker_template or {})
    name = pod_name(spec.name, group, role.name, role_replica, index)
    svc = instance_name(spec.name, group, role.name, role_replica)
    meta_in: JSON = source.get("metadata") or {}
    labels: dict[str, str] = dict(meta_in.get("labels") or {})
    labels.update(
        {
            LABEL_MODEL_INFER: spec.name,
            LABEL_GROUP: str(group),
            LABEL_ROLE: role.name,
            LABEL_ROLE_REPLICA: str(role_replica),
            LABEL_ENTRY: "true" if index == 0 else "false",
            LABEL_REVISION: template.revision,
            LABEL_ROLE_REVISION: role.revision,
        }
    )
    annotations: dict[str, str] = dict(meta_in.get("annotations") or {})
    if gang:
        annotations[ANNOTATION_VOLCANO_GROUP] = podgroup_name(spec.name, group)
        annotations[ANNOTATION_VOLCANO_TASK] = role.name
    pod_spec: dict[str, Any] = copy.deepcopy(dict(source.get("spec") or {}))
    env = [
        {"name": "GROUP_SIZE", "value": str(role.instance_size)},
        {"name": "WORKER_INDEX", "value": str(index)},
        {"name": "ROLE", "value": role.name},
        {"name": "GROUP_INDEX", "value": str(group)},
        {"name": "ROLE_REPLICA", "value": str(role_replica)},
    ]
    if role.worker_replicas > 0:
        entry = pod_name(spec.name, group, role.name, role_replica, 0)
        env.insert(0, {"name": "ENTRY_ADDRESS", "value": f"{entry}.{svc}.{spec.namespace}.svc"})
        pod_spec["hostname"] = name
        pod_spec["subdomain"] = svc
    for key in ("containers", "initContainers"):
        for container in pod_spec.get(key) or []:
            _with_env(container, env)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": spec.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(spec)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def service_manifest(
    spec: ModelInferSpec, template: GroupTemplate, role: RoleSpec, group: int, role_replica: int
) -> dict[str, Any]:
    """The headless Service that gives a role instance's pods stable DNS names."""
    selector = {
        LABEL_MODEL_INFER: spec.name,
        LABEL_GROUP: str(group),
        LABEL_ROLE: role.name,
        LABEL_ROLE_REPLICA: str(role_replica),
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": instance_name(spec.name, group, role.name, role_replica),
            "namespace": spec.namespace,
            "labels": dict(selector),
            "ownerReferences": [owner_reference(spec)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector,
        },
    }


def podgroup_manifest(spec: ModelInferSpec, template: GroupTemplate, group: int) -> dict[str, Any]:
    """A Volcano PodGroup: the group's pods are scheduled all together or not at all."""
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": {
            "name": podgroup_name(spec.name, group),
            "namespace": spec.namespace,
            "labels": {LABEL_MODEL_INFER: spec.name, LABEL_GROUP: str(group)},
            "ownerReferences": [owner_reference(spec)],
        },
        "spec": {
            "minMember": template.min_member(),
            "minTaskMember": template.min_task_member(),
        },
    }


def template_data(template: GroupTemplate) -> dict[str, Any]:
    """The canonical JSON form of a group template (what revisions store and hash)."""
    return {
        "roles": [
            {
                "name": r.name,
                "replicas": r.replicas,
                "workerReplicas": r.worker_replicas,
                "entryTemplate": r.entry_template,
                **({"workerTemplate": r.worker_template} if r.worker_template else {}),
            }
            for r in template.roles
        ],
        "gangPolicy": {"minRoleReplicas": dict(template.min_role_replicas)},
    }


def revision_manifest(spec: ModelInferSpec, template: GroupTemplate) -> dict[str, Any]:
    """An apps/v1 ControllerRevision keeping a template, so older groups can be recreated."""
    return {
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": revision_name(spec.name, template.revision),
            "namespace": spec.namespace,
            "labels": {LABEL_MODEL_INFER: spec.name, LABEL_REVISION: template.revision},
            "ownerReferences": [owner_reference(spec)],
        },
        "data": template_data(template),
        "revision": spec.generation,
    }
