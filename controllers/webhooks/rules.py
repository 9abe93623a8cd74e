"""What admission accepts, denies and warns about, for the five MatrixInfer kinds. Pure.

Each ``check_*`` function takes the API object (already a ``crds`` model) and the other objects
its rule needs, as plain data, and returns a :class:`Review`: denials as (field path, message)
pairs, and warnings (the object is stored, the user is told). :func:`parse` is the first rule of
every kind: the same pydantic validation (and CEL rules) as ``crds/``, so admission and the CRD
schema never disagree. :func:`defaults` is the one mutation (defaulting a CRD default cannot
express). ``controllers.webhooks.handlers`` translates Kopf's admission requests to these calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controllers.modelinfer.spec import resolve
from controllers.modelinfer.types import LABEL_GROUP, LABEL_ROLE
from controllers.status.compute import route_claims
from crds import InvalidObject, Model, ModelInfer, ModelRoute, ModelServer, parse_object
from crds.loading import Resource
from crds.registry import AutoscalingPolicy
from fleet.claims import Claim, winners
from fleet.plugins import check_profile

__all__ = [
    "Held",
    "Review",
    "check_autoscaling_policy",
    "check_model",
    "check_model_infer",
    "check_model_route",
    "check_model_server",
    "defaults",
    "held_names",
    "needs_review",
    "parse",
]

PREFILL_ROLE = "prefill"
DECODE_ROLE = "decode"


@dataclass(frozen=True, slots=True)
class Review:
    """The verdict on one object: denied if ``denials`` is not empty."""

    denials: tuple[tuple[str, str], ...] = ()  # (field path, message)
    warnings: tuple[str, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return not self.denials

    def message(self) -> str:
        """The denials as one line: ``path: message; path: message``."""
        return "; ".join(f"{path}: {msg}" if path else msg for path, msg in self.denials)


def parse(doc: Mapping[str, Any]) -> Resource | Review:
    """The object as its ``crds`` model, or a denial naming every invalid field."""
    body = {k: v for k, v in doc.items() if k != "status"}  # status is the controllers' output
    try:
        return parse_object(body, source="admission")
    except InvalidObject as exc:
        return Review(denials=tuple((path or "spec", msg) for path, msg in exc.errors))


def needs_review(doc: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """False for an update that leaves ``spec`` as it was (labels, annotations, finalizers):
    such an update is always allowed, so the controllers' own metadata patches (Kopf's
    finalizer and progress annotations, a finalizer removed on deletion) never fail on an object
    stored before a rule existed or that another object's change made conflict."""
    return old is None or doc.get("spec") != old.get("spec")


def key_of(obj: Resource) -> str:
    """``namespace/name``, the key routes and claims use."""
    return f"{obj.metadata.namespace or 'default'}/{obj.metadata.name}"


@dataclass(frozen=True, slots=True)
class Held:
    """The names the stored objects hold, as the cross-object checks take them."""

    adapters: dict[str, str]  # LoRA adapter name -> namespace/name of the first Model listing it
    claims: list[tuple[str, Claim]]  # every route's claims, as ``route_claims`` gives them


def held_names(models: Iterable[Mapping[str, Any]], routes: Iterable[Mapping[str, Any]]) -> Held:
    """What the stored ``models`` and ``routes`` (raw objects, as the API returns them) hold:
    the LoRA adapters the Models list (:func:`check_model`'s ``other_adapters``) and the names
    the routes claim (the ``others``/``routes`` of :func:`check_model_route` and
    :func:`check_model`)."""
    adapters: dict[str, str] = {}
    for m in models:
        meta, spec = m.get("metadata") or {}, m.get("spec") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        for a in spec.get("loraAdapters") or ():
            if isinstance(a, Mapping) and a.get("name"):
                adapters.setdefault(str(a["name"]), key)
    return Held(adapters, [c for r in routes for c in route_claims(r)])


# --------------------------------------------------------------------------------------------
# ModelRoute


def check_model_route(
    route: ModelRoute,
    others: Iterable[tuple[str, Claim]],
    model_servers: Iterable[str],
) -> Review:
    """Deny a route claiming a model name or LoRA adapter name another route already serves
    (``fleet.claims``: the route there first keeps the name, so the newcomer would never be
    served for it; model names and LoRA names are looked up apart, as the gateway does); warn
    about targets naming a ModelServer missing from the route's namespace.

    ``others``: the claims of the stored routes, ``("model" | "lora", claim)`` as
    ``controllers.status.compute.route_claims`` gives them (routes are matched by name across
    namespaces; this route's own stored claims are ignored); ``model_servers``: the names of the
    ModelServers in the route's namespace."""
    key = key_of(route)
    held: dict[str, dict[str, str]] = {}
    for kind in ("model", "lora"):
        held[kind] = winners(c for k, c in others if k == kind and c.route != key)
    claims: list[tuple[str, str, str]] = []  # (field path, kind, name)
    if route.spec.model_name:
        claims.append(("spec.modelName", "model", route.spec.model_name))
    claims.extend(
        (f"spec.loraAdapters[{i}]", "lora", lora)
        for i, lora in enumerate(route.spec.lora_adapters or ())
    )
    denials = tuple(
        (
            path,
            f"{'model name' if kind == 'model' else 'LoRA adapter'} {name!r} is already served "
            f"by ModelRoute {held[kind][name]}: two routes cannot claim the same name",
        )
        for path, kind, name in claims
        if name in held[kind]
    )
    known = set(model_servers)
    warnings = tuple(
        f"spec.rules[{i}].targets[{j}].modelServerName: ModelServer {t.model_server_name!r} "
        f"does not exist in namespace {route.metadata.namespace or 'default'} (yet); the target "
        "gets no traffic until it does"
        for i, rule in enumerate(route.spec.rules)
        for j, t in enumerate(rule.targets)
        if t.model_server_name not in known
    )
    return Review(denials=denials, warnings=warnings)


# --------------------------------------------------------------------------------------------
# Model


def check_model(
    model: Model,
    other_adapters: Mapping[str, str],
    routes: Iterable[tuple[str, Claim]] = (),
) -> Review:
    """Deny LoRA adapter names another Model already serves, and names the Model's generated
    ModelRoute (``namespace/<model name>``, claiming the Model's name and its adapters) could
    not win because another ModelRoute serves them already.

    ``other_adapters``: adapter name → ``namespace/name`` of the Model that lists it (this
    Model's own entries are ignored); ``routes``: the stored routes' claims as in
    :func:`check_model_route` (the generated route's own claims are ignored)."""
    key = key_of(model)
    held = {kind: winners(c for k, c in routes if k == kind and c.route != key)
            for kind in ("model", "lora")}  # fmt: skip
    denials: list[tuple[str, str]] = []
    name = model.metadata.name or ""
    if name in held["model"]:
        denials.append(
            (
                "metadata.name",
                f"the Model serves model name {name!r}, already served by ModelRoute "
                f"{held['model'][name]}",
            )
        )
    for i, a in enumerate(model.spec.lora_adapters or ()):
        path = f"spec.loraAdapters[{i}].name"
        if other_adapters.get(a.name, key) != key:
            holder = f"Model {other_adapters[a.name]}"
        elif a.name in held["lora"]:
            holder = f"ModelRoute {held['lora'][a.name]}"
        else:
            continue
        denials.append((path, f"LoRA adapter {a.name!r} is already served by {holder}"))
    return Review(denials=tuple(denials))


# --------------------------------------------------------------------------------------------
# ModelServer


def check_model_server(server: ModelServer) -> Review:
    """Deny scheduler profiles naming unknown plugins or bad plugin arguments."""
    denials: list[tuple[str, str]] = []
    for path, profile in (
        ("spec.scheduler", server.spec.scheduler),
        ("spec.prefillScheduler", server.spec.prefill_scheduler),
    ):
        if profile is None:
            continue
        try:
            check_profile(profile)
        except ValueError as exc:
            denials.append((path, str(exc)))
    return Review(denials=tuple(denials))


def defaults(doc: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """The fields to set on a ModelServer before it is validated: (path, value) pairs.

    A ModelServer with a ``kvConnector`` (prefill/decode serving) but no
    ``workloadSelector.pdGroup`` gets the pairing of ModelInfer pods: groups by
    ``workload.matrixinfer.ai/group``, prefill pods by role ``prefill``, decode pods by role
    ``decode`` (what the Model controller writes for a vLLMDisaggregated backend)."""
    spec = doc.get("spec")
    if not isinstance(spec, Mapping) or not spec.get("kvConnector"):
        return []
    selector = spec.get("workloadSelector")
    if not isinstance(selector, Mapping) or selector.get("pdGroup"):
        return []
    return [
        (
            ("spec", "workloadSelector", "pdGroup"),
            {
                "groupKey": LABEL_GROUP,
                "prefillLabels": {LABEL_ROLE: PREFILL_ROLE},
                "decodeLabels": {LABEL_ROLE: DECODE_ROLE},
            },
        )
    ]


# --------------------------------------------------------------------------------------------
# ModelInfer


def check_model_infer(new: ModelInfer, old: ModelInfer | None, live_groups: int) -> Review:
    """Deny the spec problems the ModelInfer controller would refuse to act on (generated
    names), and a change of the role set (a role added, removed or renamed) on a live
    ModelInfer whose rollout keeps old groups (``rolloutStrategy.partition`` > 0): groups
    below the partition stay at the old revision, so one ModelInfer would run two role sets and
    a role could have pods in some groups only.

    ``live_groups``: the InferGroups that exist (``status.replicas`` of the stored object)."""
    resolved = resolve(new)
    denials = [(p.field, p.message) for p in resolved.problems]
    if old is not None and live_groups > 0:
        before = [r.name for r in old.spec.template.roles]
        after = [r.name for r in new.spec.template.roles]
        partition = new.spec.rollout_strategy.partition
        if before != after and resolved.partition > 0:
            denials.append(
                (
                    "spec.template.roles",
                    f"roles {before} cannot become {after} while {live_groups} InferGroup(s) "
                    f"exist and rolloutStrategy.partition is {partition!r}: set the partition "
                    "to 0 first, or scale to 0 replicas",
                )
            )
    return Review(denials=tuple(denials))


# --------------------------------------------------------------------------------------------
# AutoscalingPolicy


def policy_targets(policy: AutoscalingPolicy) -> list[tuple[str, str]]:
    """(field path, ModelInfer name) of every target of the policy."""
    s = policy.spec
    out: list[tuple[str, str]] = []
    if s.homogeneous_target is not None:
        out.append(("spec.homogeneousTarget.targetRef.name", s.homogeneous_target.target_ref.name))
    if s.heterogeneous_target is not None:
        out.extend(
            (f"spec.heterogeneousTarget.params[{i}].target.name", p.target.name)
            for i, p in enumerate(s.heterogeneous_target.params)
        )
    if s.disaggregated_target is not None:
        out.append(
            ("spec.disaggregatedTarget.targetRef.name", s.disaggregated_target.target_ref.name)
        )
    return out


def check_autoscaling_policy(policy: AutoscalingPolicy, model_infers: Sequence[str]) -> Review:
    """Warn about targets naming a ModelInfer missing from the policy's namespace (a Model's
    policy is often applied before the Model controller has made its ModelInfers)."""
    known = set(model_infers)
    warnings = tuple(
        f"{path}: ModelInfer {name!r} does not exist in namespace "
        f"{policy.metadata.namespace or 'default'} (yet); nothing is scaled until it does"
        for path, name in policy_targets(policy)
        if name not in known
    )
    return Review(warnings=warnings)
