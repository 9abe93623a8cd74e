"""An in-memory namespace that applies the Model planner's actions (create, JSON merge patch,
delete), for planner tests without Kubernetes."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import crds
from controllers.model.observe import child_from_json
from controllers.model.planner import desired, plan
from controllers.model.types import CHILD_KINDS, Action, ChildRef, ObservedChild, Plan


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


@dataclass
class Namespace:
    objects: dict[ChildRef, dict[str, Any]] = field(default_factory=dict)
    writes: list[Action] = field(default_factory=list)

    def observed(self) -> list[ObservedChild]:
        out = []
        for ref, obj in self.objects.items():
            c = child_from_json(ref.kind, obj)
            assert c is not None
            out.append(c)
        return out

    def apply(self, p: Plan) -> None:
        for a in p.actions:
            self.writes.append(a)
            if a.verb == "create":
                assert a.ref not in self.objects, f"create of an existing {a.ref}"
                self.objects[a.ref] = copy.deepcopy(a.body or {})
            elif a.verb == "patch":
                self.objects[a.ref] = merge_patch(self.objects[a.ref], a.body)
            else:
                del self.objects[a.ref]

    def reconcile(self, model: crds.Model) -> Plan:
        p = plan(
            desired(model), self.observed(), model.metadata.name or "", model.metadata.uid or ""
        )
        self.apply(p)
        return p


def model(spec: dict[str, Any], name: str = "llama", uid: str = "u-llama") -> crds.Model:
    doc = {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": "ns", "uid": uid},
        "spec": spec,
    }
    m = crds.parse_object(doc)
    assert isinstance(m, crds.Model)
    return m


def foreign(kind: str, name: str, owner: str | None = "other") -> dict[str, Any]:
    """An object of a child kind that this Model does not own (another Model's, or a user's)."""
    info = CHILD_KINDS[kind]  # type: ignore[index]
    specs: dict[str, Any] = {
        "ModelServer": {
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"app": name}},
            "workloadPort": {"port": 8000},
        },
        "ModelRoute": {"modelName": name, "rules": [{"targets": [{"modelServerName": name}]}]},
    }
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if owner is not None:
        meta["labels"] = {"registry.matrixinfer.ai/model": owner}
        meta["ownerReferences"] = [
            {"apiVersion": "registry.matrixinfer.ai/v1alpha1", "kind": "Model", "name": owner,
             "uid": f"u-{owner}", "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
    return {"apiVersion": info.api_version, "kind": kind, "metadata": meta, "spec": specs[kind]}
