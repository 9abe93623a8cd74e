"""The Model planner (pure): what a Model generates, and the actions that make what exists match.

- :func:`desired` — ``crds.Model`` → the children it owns: per backend a ModelInfer and a
  ModelServer (both named ``<model>-<backend>``), one ModelRoute and, for an inline
  ``autoscalingPolicy.spec``, one AutoscalingPolicy (both named ``<model>``); with LoRA
  adapters, the ConfigMap ``<model>-lora-adapters`` the runtime sidecars read them from.
  Every child is validated by the API's own model before it is offered; one that fails becomes a
  :class:`Problem` naming it and is *held*: neither created, patched nor deleted.
- :func:`plan` — desired children + every observed object of the child kinds in the namespace →
  create / patch / delete actions. An object is this Model's when it carries the label
  ``registry.matrixinfer.ai/model: <model>`` *and* its controller owner reference is this
  Model's uid; nothing else is ever patched or deleted (a desired name taken by another object
  is a ``ChildConflict`` problem).

Drift is judged on the spec as the API's model reads it (defaults written in), so server-side
defaulting is not drift; a difference is put back with a JSON merge patch that also removes
fields added by hand. Labels the Model sets are put back; other labels and annotations are left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from controllers.model.engine import PD_CONNECTOR
from controllers.model.pod import (
    DEFAULT_RUNTIME_IMAGE,
    SERVE_PORT,
    adapters_config_name,
    adapters_file,
    check_cache_uri,
    check_mountable,
    pod_template,
)
from controllers.model.types import (
    CHILD_KINDS,
    LABEL_BACKEND,
    LABEL_MODEL,
    MODEL_API_VERSION,
    Action,
    ChildKind,
    ChildRef,
    Desired,
    DesiredChild,
    ObservedChild,
    Plan,
    Problem,
)
from controllers.modelinfer.types import LABEL_ENTRY, LABEL_GROUP, LABEL_MODEL_INFER, LABEL_ROLE
from crds.loading import InvalidObject, parse_object, to_dict
from crds.networking import ModelRouteSpec, ModelServerSpec
from crds.registry import AutoscalingPolicySpec, Backend, BackendWorker, Model
from crds.workload import ModelInferSpec
from fleet.artefacts import parse_uri

__all__ = ["desired", "merge_diff", "owns", "plan", "role_names"]

_ORDER = {kind: i for i, kind in enumerate(CHILD_KINDS)}
_SPEC_MODELS: dict[ChildKind, type[BaseModel]] = {
    "ModelInfer": ModelInferSpec,
    "ModelServer": ModelServerSpec,
    "ModelRoute": ModelRouteSpec,
    "AutoscalingPolicy": AutoscalingPolicySpec,
}


def _dump(obj: BaseModel | None) -> dict[str, Any] | None:
    if obj is None:
        return None
    out: dict[str, Any] = obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    return out


# --------------------------------------------------------------------------------------------
# desired children


def role_names(workers: Sequence[BackendWorker]) -> list[str]:
    """Role name of each worker: its type, with ``-<index>`` when the type repeats."""
    types = [w.type for w in workers]
    return [t if types.count(t) == 1 else f"{t}-{i}" for i, t in enumerate(types)]


def _workers(backend: Backend) -> list[BackendWorker]:
    return list(backend.workers or [BackendWorker()])


def _pod_template(
    model: Model, backend: Backend, worker: BackendWorker, entry: bool, runtime_image: str
) -> dict[str, Any]:
    """The pod of one role (:func:`controllers.model.pod.pod_template`), labelled with the
    Model and the backend."""
    tmpl = pod_template(
        _name(model),
        backend,
        worker,
        list(model.spec.lora_adapters or []),
        entry=entry,
        runtime_image=runtime_image,
    )
    tmpl["metadata"]["labels"] = {LABEL_MODEL: _name(model), LABEL_BACKEND: backend.name}
    return tmpl


def _name(model: Model) -> str:
    return model.metadata.name or ""


def child_name(model: Model, backend: Backend) -> str:
    """Name of a backend's ModelInfer and ModelServer."""
    return f"{_name(model)}-{backend.name}"


def _meta(model: Model, name: str, backend: str | None) -> dict[str, Any]:
    labels = {LABEL_MODEL: _name(model)}
    if backend is not None:
        labels[LABEL_BACKEND] = backend
    return {
        "name": name,
        "namespace": model.metadata.namespace,
        "labels": labels,
        "ownerReferences": [
            {
                "apiVersion": MODEL_API_VERSION,
                "kind": "Model",
                "name": _name(model),
                "uid": model.metadata.uid or "",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _model_infer(
    model: Model, b: Backend, runtime_image: str
) -> tuple[dict[str, Any], tuple[int, int] | None]:
    workers = _workers(b)
    roles = []
    for rname, w in zip(role_names(workers), workers, strict=True):
        role: dict[str, Any] = {
            "name": rname,
            "replicas": w.replicas,
            "entryTemplate": _pod_template(model, b, w, True, runtime_image),
            "workerReplicas": w.pods - 1,
        }
        if w.pods > 1:
            role["workerTemplate"] = _pod_template(model, b, w, False, runtime_image)
        roles.append(role)
    bounds = None
    if b.max_replicas is not None and b.max_replicas > b.min_replicas:
        bounds = (b.min_replicas, b.max_replicas)
    spec = {"replicas": b.min_replicas, "template": {"roles": roles}}
    return spec, bounds


def _model_server(model: Model, b: Backend) -> dict[str, Any]:
    selector: dict[str, Any] = {
        "matchLabels": {LABEL_MODEL_INFER: child_name(model, b), LABEL_ENTRY: "true"}
    }
    spec: dict[str, Any] = {
        "inferenceEngine": "SGLang" if b.type == "SGLang" else "vLLM",
        "workloadSelector": selector,
        "workloadPort": {"port": SERVE_PORT, "protocol": "http"},
        # an attempt that never reached the engine (connection refused: a pod that just died or
        # is not listening yet; a refused stream) is safe to retry on another pod
        "trafficPolicy": {
            "retry": {"attempts": 2, "retryOn": ["connect-failure", "refused-stream"]}
        },
    }
    if b.type == "vLLMDisaggregated":
        workers = _workers(b)
        names = dict(zip(role_names(workers), (w.type for w in workers), strict=True))
        prefill = next(n for n, t in names.items() if t == "prefill")
        decode = next(n for n, t in names.items() if t == "decode")
        selector["pdGroup"] = {
            "groupKey": LABEL_GROUP,
            "prefillLabels": {LABEL_ROLE: prefill},
            "decodeLabels": {LABEL_ROLE: decode},
        }
        spec["kvConnector"] = {"type": PD_CONNECTOR}
    return spec


def _model_route(model: Model) -> dict[str, Any]:
    s = model.spec
    targets = []
    for b in s.backends:
        t: dict[str, Any] = {"modelServerName": child_name(model, b)}
        if b.route_weight is not None:
            t["weight"] = b.route_weight
        targets.append(t)
    rule: dict[str, Any] = {"name": "default", "targets": targets}
    if s.model_match is not None:
        rule["match"] = _dump(s.model_match)
    spec: dict[str, Any] = {"modelName": _name(model), "rules": [rule]}
    if s.lora_adapters:
        spec["loraAdapters"] = [a.name for a in s.lora_adapters]
    if s.rate_limit is not None:
        spec["rateLimit"] = _dump(s.rate_limit)
    if s.access is not None:
        spec["access"] = _dump(s.access)
    return spec


def _autoscaling(model: Model) -> dict[str, Any] | Problem | None:
    scaling = model.spec.autoscaling_policy
    if scaling is None or scaling.spec is None:
        return None  # fixed replicas, or a policy the user owns (ref)
    spec = _dump(scaling.spec) or {}
    scalable = [b for b in model.spec.backends if b.max_replicas is not None]
    if not scalable:
        return Problem(
            "InvalidAutoscaling",
            "spec.autoscalingPolicy.spec: no backend sets maxReplicas, so there is nothing to"
            " scale",
        )
    if len(scalable) == 1:
        b = scalable[0]
        spec["homogeneousTarget"] = {
            "targetRef": {"kind": "ModelInfer", "name": child_name(model, b)},
            "minReplicas": b.min_replicas,
            "maxReplicas": b.max_replicas,
        }
    else:
        spec["heterogeneousTarget"] = {
            "params": [
                {
                    "target": {"kind": "ModelInfer", "name": child_name(model, b)},
                    "cost": b.cost if b.cost is not None else 1.0,
                    "minReplicas": b.min_replicas,
                    "maxReplicas": b.max_replicas,
                }
                for b in scalable
            ]
        }
    return spec


def _uri_problems(model: Model) -> tuple[list[Problem], set[str]]:
    """Artefact URIs the pods could not use, each named by its field, and the backends whose
    ModelInfer they hold back (a bad adapter URI holds every backend: all pods load them)."""
    problems: list[Problem] = []
    bad_adapters = False
    for i, a in enumerate(model.spec.lora_adapters or []):
        try:
            check_mountable(parse_uri(a.uri))
        except ValueError as exc:
            problems.append(Problem("InvalidURI", f"spec.loraAdapters[{i}].uri: {exc}"))
            bad_adapters = True
    held: set[str] = set()
    for i, b in enumerate(model.spec.backends):
        checks: list[tuple[str, str, Callable[[str], object]]] = [
            ("modelURI", b.model_uri, lambda text: check_mountable(parse_uri(text)))
        ]
        if b.cache_uri is not None:
            checks.append(("cacheURI", b.cache_uri, check_cache_uri))
        for field_name, value, check in checks:
            try:
                check(value)
            except ValueError as exc:
                problems.append(Problem("InvalidURI", f"spec.backends[{i}].{field_name}: {exc}"))
                held.add(b.name)
        if bad_adapters:
            held.add(b.name)
    return problems, held


def desired(model: Model, runtime_image: str = DEFAULT_RUNTIME_IMAGE) -> Desired:
    """Every child ``model`` generates, each validated by its kind's API model; the pods run
    the downloader, the runtime sidecar and the PD proxy from ``runtime_image``."""
    wanted: list[tuple[ChildKind, str, str | None, dict[str, Any], tuple[int, int] | None]] = []
    problems, bad_uri = _uri_problems(model)
    held: list[ChildRef] = []
    for b in model.spec.backends:
        if b.name in bad_uri:  # neither created, patched nor deleted until the URI is fixed
            held.append(ChildRef("ModelInfer", child_name(model, b)))
            continue
        spec, bounds = _model_infer(model, b, runtime_image)
        wanted.append(("ModelInfer", child_name(model, b), b.name, spec, bounds))
    if model.spec.lora_adapters:
        data = adapters_file(model.spec.lora_adapters)
        wanted.append(("ConfigMap", adapters_config_name(_name(model)), None, data, None))
    for b in model.spec.backends:
        wanted.append(("ModelServer", child_name(model, b), b.name, _model_server(model, b), None))
    wanted.append(("ModelRoute", _name(model), None, _model_route(model), None))
    scaling = _autoscaling(model)
    if isinstance(scaling, Problem):
        problems.append(scaling)
    elif scaling is not None:
        wanted.append(("AutoscalingPolicy", _name(model), None, scaling, None))
    children: list[DesiredChild] = []
    for kind, name, backend, spec, bounds in sorted(wanted, key=lambda w: _ORDER[w[0]]):
        info = CHILD_KINDS[kind]
        doc = {
            "apiVersion": info.api_version,
            "kind": kind,
            "metadata": _meta(model, name, backend),
            info.content: spec,
        }
        ref = ChildRef(kind, name)
        if kind == "ConfigMap":  # not an API kind of ours: nothing to validate it with
            children.append(DesiredChild(ref, backend, doc, bounds))
            continue
        try:
            manifest = to_dict(parse_object(doc, f"{kind} {name}"))
        except InvalidObject as exc:
            problems.append(Problem("InvalidChild", f"generated {exc}"))
            held.append(ref)
            continue
        children.append(DesiredChild(ref, backend, manifest, bounds))
    return Desired(tuple(children), tuple(problems), tuple(held))


# --------------------------------------------------------------------------------------------
# plan


def owns(model_name: str, model_uid: str, child: ObservedChild) -> bool:
    """Is ``child`` this Model's (its label and its controller owner reference)?"""
    return child.labels.get(LABEL_MODEL) == model_name and child.controller_uid == model_uid


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new`` (lists are replaced)."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        if key not in old:
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(old[key], Mapping):
            sub = merge_diff(old[key], value)
            if sub:
                out[key] = sub
        elif old[key] != value:
            out[key] = value
    for key in old:
        if key not in new:
            out[key] = None
    return out


def _normal(kind: ChildKind, spec: Mapping[str, Any]) -> Any:
    """The spec as the API's model reads it (defaults written in); raw when it does not parse
    (or the kind has no model of ours: a ConfigMap's data)."""
    if kind not in _SPEC_MODELS:
        return dict(spec)
    try:
        return _dump(_SPEC_MODELS[kind].model_validate(dict(spec)))
    except ValidationError:
        return dict(spec)


def _wanted_spec(d: DesiredChild, seen: ObservedChild) -> dict[str, Any]:
    spec: dict[str, Any] = dict(d.manifest[CHILD_KINDS[d.ref.kind].content])
    if d.replica_bounds is not None:
        lo, hi = d.replica_bounds
        current = seen.spec.get("replicas", 1)
        if isinstance(current, int) and not isinstance(current, bool):
            spec["replicas"] = min(max(current, lo), hi)
    return spec


def _patch(d: DesiredChild, seen: ObservedChild) -> dict[str, Any]:
    body: dict[str, Any] = {}
    want = _wanted_spec(d, seen)
    if _normal(d.ref.kind, seen.spec) != _normal(d.ref.kind, want):
        body[CHILD_KINDS[d.ref.kind].content] = merge_diff(seen.spec, want)
    labels = d.manifest["metadata"]["labels"]
    wrong = {k: v for k, v in labels.items() if seen.labels.get(k) != v}
    if wrong:
        body["metadata"] = {"labels": wrong}
    return body


def plan(want: Desired, observed: Iterable[ObservedChild], model_name: str, model_uid: str) -> Plan:
    """Create what is missing, patch what drifted, delete what this Model no longer wants."""
    seen = {c.ref: c for c in observed}
    wanted_refs = {d.ref for d in want.children} | set(want.held)
    actions: list[Action] = []
    problems = list(want.problems)
    missing: list[ChildRef] = []
    for d in want.children:
        o = seen.get(d.ref)
        if o is None:
            actions.append(Action("create", d.ref, d.manifest))
            missing.append(d.ref)
        elif not owns(model_name, model_uid, o):
            owner = o.labels.get(LABEL_MODEL)
            who = f"Model {owner}" if owner else "something else"
            problems.append(
                Problem("ChildConflict", f"{d.ref} exists and belongs to {who}; not touched")
            )
            missing.append(d.ref)
        elif o.deleting:
            missing.append(d.ref)  # created again once it is gone
        else:
            body = _patch(d, o)
            if body:
                actions.append(Action("patch", d.ref, body))
    for ref, o in sorted(seen.items(), key=lambda kv: (kv[0].kind, kv[0].name)):
        if ref not in wanted_refs and not o.deleting and owns(model_name, model_uid, o):
            actions.append(Action("delete", ref))
    return Plan(tuple(actions), tuple(problems), tuple(missing))
