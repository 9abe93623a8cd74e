"""Pure status computation for ModelRoute and ModelServer (plain dicts in, status dicts out).

- ModelRoute: ``Accepted`` (the object validates against the API and serves every name it
  claims; reason ``Accepted`` / ``Invalid`` with the first error / ``ModelNameTaken`` naming the
  route that serves a claimed model name or LoRA adapter, by :mod:`fleet.claims`) and
  ``ResolvedRefs`` (every target ModelServer exists in the
  route's namespace; reason ``ResolvedRefs`` / ``BackendNotFound`` naming the missing ones).
- ModelServer: ``readyEndpoints`` (pods of its namespace its ``workloadSelector.matchLabels``
  selects that are Running and Ready with an IP) and condition ``Ready`` (at least one).

``lastTransitionTime`` only moves when a condition's status changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from crds.common import Condition
from fleet.claims import Claim, winners

__all__ = [
    "PodView",
    "ServerSelector",
    "label_keys",
    "merge_conditions",
    "route_claims",
    "route_status",
    "route_targets",
    "selected_candidates",
    "server_selector",
    "server_status",
    "servers_to_wake",
    "taken_names",
]


@dataclass(slots=True, frozen=True)
class PodView:
    namespace: str
    labels: Mapping[str, str]
    ready: bool


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> Condition:
    return Condition(
        type=type_,
        status="True" if ok else "False",
        reason=reason,
        message=message,
        observed_generation=generation,
    )


def _identity(raw: Mapping[str, Any]) -> tuple[str, int]:
    """A raw object's namespace and generation."""
    meta = raw.get("metadata") or {}
    return meta.get("namespace") or "default", int(meta.get("generation") or 0)


def _status(
    raw: Mapping[str, Any], generation: int, conditions: list[Condition], now: str, **fields: Any
) -> dict[str, Any]:
    """The status of ``raw`` at ``generation``: ``fields``, then ``conditions`` merged with its
    previous ones (:func:`merge_conditions`)."""
    old = (raw.get("status") or {}).get("conditions")
    return {
        "observedGeneration": generation,
        **fields,
        "conditions": merge_conditions(old, conditions, now),
    }


def merge_conditions(
    old: Iterable[Mapping[str, Any]] | None, new: list[Condition], now: str
) -> list[dict[str, Any]]:
    """`new` as status JSON, each keeping its previous lastTransitionTime if its status held."""
    previous = {c.get("type"): c for c in old or ()}
    out = []
    for cond in new:
        prev = previous.get(cond.type)
        since = now
        if prev is not None and prev.get("status") == cond.status:
            since = prev.get("lastTransitionTime") or now
        stamped = cond.model_copy(update={"last_transition_time": since})
        out.append(stamped.model_dump(by_alias=True, exclude_none=True, mode="json"))
    return out


def route_claims(raw: Mapping[str, Any]) -> list[tuple[str, Claim]]:
    """The names a raw ModelRoute claims: ``("model", claim)`` for ``modelName``, ``("lora",
    claim)`` for each LoRA adapter (the two are looked up apart, as the gateway does)."""
    meta = raw.get("metadata") or {}
    key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
    created = meta.get("creationTimestamp")
    spec = raw.get("spec") or {}
    out: list[tuple[str, Claim]] = []
    if spec.get("modelName"):
        out.append(("model", Claim(str(spec["modelName"]), key, created)))
    out.extend(("lora", Claim(str(lora), key, created)) for lora in spec.get("loraAdapters") or ())
    return out


def taken_names(
    raw: Mapping[str, Any], claims_of: Callable[[str, str], Iterable[Claim]]
) -> dict[str, str]:
    """Names ``raw`` claims that another route serves → that route's namespace/name.
    ``claims_of(kind, name)``: every route's claim on ``name`` (``kind`` "model" or "lora")."""
    out: dict[str, str] = {}
    for kind, claim in route_claims(raw):
        winner = winners([claim, *claims_of(kind, claim.name)]).get(claim.name, claim.route)
        if winner != claim.route:
            out[claim.name] = winner
    return out


def route_targets(raw: Mapping[str, Any]) -> list[str]:
    """The ModelServers a raw ModelRoute targets, each once, in order."""
    targets: list[str] = []
    for rule in (raw.get("spec") or {}).get("rules") or []:
        for target in rule.get("targets") or []:
            name = target.get("modelServerName")
            if name and name not in targets:
                targets.append(name)
    return targets


def route_status(
    raw: Mapping[str, Any],
    server_exists: Callable[[str, str], bool],
    validate: Callable[[Mapping[str, Any]], str | None],
    now: str,
    taken: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``taken``: claimed names another route serves → that route (:func:`taken_names`)."""
    ns, generation = _identity(raw)
    error = validate(raw)
    if error is not None:
        accepted = _condition("Accepted", False, "Invalid", error, generation)
    elif taken:
        accepted = _condition(
            "Accepted",
            False,
            "ModelNameTaken",
            "; ".join(
                f"'{name}' is served by ModelRoute '{winner}' (created first)"
                for name, winner in sorted(taken.items())
            ),
            generation,
        )
    else:
        accepted = _condition("Accepted", True, "Accepted", "the route is valid", generation)
    conditions = [accepted]
    targets = route_targets(raw)
    missing = [t for t in targets if not server_exists(ns, t)]
    conditions.append(
        _condition(
            "ResolvedRefs",
            not missing,
            "ResolvedRefs" if not missing else "BackendNotFound",
            "every target ModelServer exists"
            if not missing
            else "ModelServer not found: " + ", ".join(missing),
            generation,
        )
    )
    return _status(raw, generation, conditions, now)


LabelKey = tuple[str, str, str]  # (namespace, label, value)


def label_keys(namespace: str, labels: Mapping[str, str]) -> list[LabelKey]:
    """The keys a pod is indexed under: one per label, so a ModelServer looks only at the pods
    carrying a label of its selector instead of every pod of the cluster."""
    return [(namespace, k, v) for k, v in labels.items()]


def selected_candidates(
    namespace: str,
    selector: Mapping[str, str],
    by_label: Callable[[LabelKey], Collection[PodView]],
) -> Collection[PodView]:
    """The pods :func:`server_status` has to check for ``selector``: those indexed under its
    rarest label (every pod it selects carries all of them); none for an empty selector."""
    best: Collection[PodView] = ()
    for i, (k, v) in enumerate(selector.items()):
        pods = by_label((namespace, k, v))
        if i == 0 or len(pods) < len(best):
            best = pods
    return best


def server_selector(raw: Mapping[str, Any]) -> dict[str, str]:
    """A raw ModelServer's ``workloadSelector.matchLabels`` ({} when absent: selects nothing)."""
    spec = raw.get("spec") or {}
    return dict((spec.get("workloadSelector") or {}).get("matchLabels") or {})


def server_status(raw: Mapping[str, Any], pods: Iterable[PodView], now: str) -> dict[str, Any]:
    ns, generation = _identity(raw)
    selector = server_selector(raw)
    ready = 0
    if selector:
        for pod in pods:
            if (
                pod.namespace == ns
                and pod.ready
                and all(pod.labels.get(k) == v for k, v in selector.items())
            ):
                ready += 1
    cond = _condition(
        "Ready",
        ready > 0,
        "EndpointsReady" if ready else "NoReadyEndpoints",
        f"{ready} ready pod(s) selected" if ready else "no Running and Ready pod is selected",
        generation,
    )
    return _status(raw, generation, [cond], now, readyEndpoints=ready)


@dataclass(slots=True, frozen=True)
class ServerSelector:
    """A ModelServer as a pod change sees it: its namespace, name and selector's labels."""

    namespace: str
    name: str
    match_labels: tuple[tuple[str, str], ...]

    def selects(self, pod: PodView) -> bool:
        return (
            bool(self.match_labels)
            and pod.namespace == self.namespace
            and all(pod.labels.get(k) == v for k, v in self.match_labels)
        )


def servers_to_wake(
    before: PodView | None,
    after: PodView | None,
    by_label: Callable[[LabelKey], Iterable[ServerSelector]],
) -> set[tuple[str, str]]:
    """The ModelServers (namespace, name) whose status a pod's change from ``before`` to
    ``after`` (None: absent) can move: those selecting it before or after. ``by_label``: the
    ModelServers with a selector label (namespace, label, value)."""
    out: set[tuple[str, str]] = set()
    for pod in (before, after):
        if pod is None:
            continue
        for key in label_keys(pod.namespace, pod.labels):
            for server in by_label(key):
                if server.selects(pod):
                    out.add((server.namespace, server.name))
    return out
