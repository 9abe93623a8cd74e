"""Kopf handlers writing ModelRoute and ModelServer status (the only writer of it).

Indexes: ModelServer names per namespace, every ModelRoute's claims on model names and LoRA
adapters (``fleet.claims`` decides who serves a contested name), and a compact view of every pod
(namespace, labels, ready) under each of its labels (a ModelServer checks only the pods of its
selector's rarest label, not every pod: with one ModelServer per pod pair that scan was
quadratic). A timer per ModelRoute / ModelServer recomputes its status (pure functions in
:mod:`controllers.status.compute`) and patches it only when it changed.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import kopf

from controllers.status.compute import (
    PodView,
    label_keys,
    route_claims,
    route_status,
    selected_candidates,
    server_status,
    taken_names,
)
from fleet.claims import Claim

__all__ = ["register"]

GROUP, VERSION = "networking.matrixinfer.ai", "v1alpha1"
INTERVAL = 1.0  # seconds between two status computations of one ModelRoute / ModelServer


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _validate(raw: Mapping[str, Any]) -> str | None:
    import crds

    doc = {k: v for k, v in raw.items() if k != "status"}
    try:
        crds.parse_object(doc, "ModelRoute")
    except (crds.InvalidObject, ValueError) as exc:
        return str(exc)[:1000]
    return None


def _changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.index(GROUP, VERSION, "modelservers", id="gateway_servers", registry=registry)
    def gateway_servers(namespace: str | None, name: str | None, **_: Any) -> Any:
        return {namespace or "default": name}

    @kopf.index(GROUP, VERSION, "modelroutes", id="gateway_route_claims", registry=registry)
    def gateway_route_claims(body: kopf.Body, **_: Any) -> Any:
        return {(kind, claim.name): claim for kind, claim in route_claims(dict(body))}

    @kopf.index("pods", id="gateway_pods", registry=registry)
    def gateway_pods(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
        status = body.get("status") or {}
        ready = (
            status.get("phase") == "Running"
            and bool(status.get("podIP"))
            and not body.get("metadata", {}).get("deletionTimestamp")
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
        )
        labels = dict(body.get("metadata", {}).get("labels") or {})
        view = PodView(namespace or "default", labels, ready)
        return {key: view for key in label_keys(view.namespace, labels)}

    @kopf.timer(
        GROUP, VERSION, "modelroutes", id="modelroute-status", interval=INTERVAL, registry=registry
    )
    def modelroute_status(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        gateway_servers: kopf.Index[str, str] = kwargs["gateway_servers"]
        claims: kopf.Index[tuple[str, str], Claim] = kwargs["gateway_route_claims"]

        def exists(ns: str, name: str) -> bool:
            return name in gateway_servers.get(ns, ())

        def claims_of(kind: str, name: str) -> list[Claim]:
            return list(claims.get((kind, name), ()))

        raw = dict(body)
        status = route_status(raw, exists, _validate, _now(), taken_names(raw, claims_of))
        if _changed(body.get("status"), status):
            patch.status.update(status)

    @kopf.timer(
        GROUP,
        VERSION,
        "modelservers",
        id="modelserver-status",
        interval=INTERVAL,
        registry=registry,
    )
    def modelserver_status(body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        gateway_pods: kopf.Index[tuple[str, str, str], PodView] = kwargs["gateway_pods"]
        ns = body.get("metadata", {}).get("namespace") or "default"
        spec = body.get("spec") or {}
        selector = (spec.get("workloadSelector") or {}).get("matchLabels") or {}
        pods = selected_candidates(ns, selector, lambda key: gateway_pods.get(key, ()))
        status = server_status(dict(body), pods, _now())
        if _changed(body.get("status"), status):
            patch.status.update(status)
