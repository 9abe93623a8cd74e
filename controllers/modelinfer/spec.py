"""From a ModelInfer object (JSON as the API server stores it) to the planner's input.

Pure. `parse` validates the object into the API's model, `crds.ModelInfer`, once, at the edge:
what the models reject comes back as an `InvalidSpec` whose problems name the field, and the
planner reports them on the `SpecValid` condition instead of touching any pod. `resolve` derives
what the planner needs beyond the API object: revision hashes, int-or-percent values resolved
against `replicas`, and the checks the API models cannot make (lengths of generated names).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from controllers.modelinfer.manifests import pod_name, revision_hash, template_data
from controllers.modelinfer.types import (
    KIND,
    MAX_NAME_LENGTH,
    GroupTemplate,
    InvalidSpec,
    Resolved,
    SpecProblem,
    name_of,
)
from crds import InvalidObject, parse_object, resolve_int_or_percent
from crds.workload import API_VERSION, InferGroupTemplate, ModelInfer

__all__ = ["group_template", "parse", "resolve"]

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _reason_for(path: str) -> str:
    """`spec.template.roles[0].workerTemplate` -> `InvalidWorkerTemplate`."""
    last = re.sub(r"\[[^\]]*\]", "", path).rsplit(".", 1)[-1] or "Spec"
    return "Invalid" + last[:1].upper() + last[1:]


def parse(obj: Mapping[str, Any]) -> ModelInfer | InvalidSpec:
    """The object as a `crds.ModelInfer` (defaults written in), or why it is not one.

    `status` is left out: it is the controller's own output, not part of what is wanted.
    """
    doc = {k: v for k, v in obj.items() if k != "status"}
    doc.setdefault("apiVersion", API_VERSION)
    doc.setdefault("kind", KIND)
    try:
        model = parse_object(doc, source=KIND)
    except InvalidObject as exc:
        problems = tuple(
            SpecProblem(path or "spec", _reason_for(path), msg) for path, msg in exc.errors
        )
    else:
        if isinstance(model, ModelInfer):
            return model
        problems = (SpecProblem("kind", "InvalidKind", f"expected {KIND}, got {model.kind}"),)
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    generation = meta.get("generation")
    return InvalidSpec(
        name=str(meta.get("name") or ""),
        namespace=str(meta.get("namespace") or "default"),
        generation=generation if isinstance(generation, int) and generation > 0 else 1,
        problems=problems,
    )


def group_template(template: InferGroupTemplate) -> GroupTemplate:
    """The template with its revision hashes (over the canonical JSON a ControllerRevision
    stores: defaults written in, `restartGracePeriodSeconds` left out)."""
    data = template_data(template)
    return GroupTemplate(
        spec=template,
        revision=revision_hash(data),
        role_revisions={r["name"]: revision_hash(r) for r in data["roles"]},
    )


def _check(mi: ModelInfer, tmpl: GroupTemplate) -> list[SpecProblem]:
    """What the API models cannot check: the names the planner will generate."""
    name = name_of(mi)
    problems: list[SpecProblem] = []
    if any(r.worker_replicas > 0 for r in tmpl.roles) and not _DNS1035.match(name):
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
            name,
            max(mi.spec.replicas - 1, 0),
            role.name,
            max(role.replicas - 1, 0),
            role.worker_replicas,
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


def resolve(mi: ModelInfer) -> Resolved:
    """What the planner derives from a valid ModelInfer before it plans."""
    template = group_template(mi.spec.template)
    strategy = mi.spec.rollout_strategy
    replicas = mi.spec.replicas
    # the API admitted both values, so they resolve (never 0 for maxUnavailable: a rollout
    # must be able to move even when a percentage rounds down to nothing)
    max_unavailable = max(
        1, resolve_int_or_percent(strategy.max_unavailable, replicas, round_up=False)
    )
    partition = resolve_int_or_percent(strategy.partition, replicas, round_up=False)
    return Resolved(
        template=template,
        max_unavailable=max_unavailable,
        partition=partition,
        problems=tuple(_check(mi, template)),
    )
