"""``matrixinfer get KIND``: what the controllers made, read from a Kubernetes API server (the
local cluster's, by default), printed as ``kubectl get`` prints it.

:func:`list_objects` reads (plain HTTP, no credentials: the local API server); :func:`table`
formats (pure: the objects and the time in, the text out).
"""

from __future__ import annotations

import datetime
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STATE", "KINDS", "list_objects", "state_path", "table"]

DEFAULT_STATE = Path.home() / ".matrixinfer" / "local.json"
"""Where a running local cluster writes its API server's URL (``matrixinfer get`` reads it)."""


def state_path() -> Path:
    """``$MATRIXINFER_STATE``, else :data:`DEFAULT_STATE`."""
    env = os.environ.get("MATRIXINFER_STATE")
    return Path(env) if env else DEFAULT_STATE


Row = Callable[[Mapping[str, Any], datetime.datetime], list[str]]

# what `matrixinfer get` accepts -> (API path of every namespace, columns, one row per object)
KINDS: dict[str, tuple[str, list[str]]] = {
    "models": (
        "/apis/registry.matrixinfer.ai/v1alpha1/models",
        ["NAMESPACE", "NAME", "BACKENDS", "READY", "STATUS", "AGE"],
    ),
    "modelinfers": (
        "/apis/workload.matrixinfer.ai/v1alpha1/modelinfers",
        ["NAMESPACE", "NAME", "READY", "UPDATED", "REPLICAS", "AGE"],
    ),
    "pods": ("/api/v1/pods", ["NAMESPACE", "NAME", "READY", "STATUS", "IP", "AGE"]),
    "modelservers": (
        "/apis/networking.matrixinfer.ai/v1alpha1/modelservers",
        ["NAMESPACE", "NAME", "ENGINE", "ENDPOINTS", "AGE"],
    ),
    "modelroutes": (
        "/apis/networking.matrixinfer.ai/v1alpha1/modelroutes",
        ["NAMESPACE", "NAME", "MODEL", "TARGETS", "AGE"],
    ),
    "autoscalingpolicies": (
        "/apis/registry.matrixinfer.ai/v1alpha1/autoscalingpolicies",
        ["NAMESPACE", "NAME", "AGE"],
    ),
}
ALIASES = {
    "model": "models",
    "modelinfer": "modelinfers",
    "mi": "modelinfers",
    "pod": "pods",
    "po": "pods",
    "modelserver": "modelservers",
    "modelroute": "modelroutes",
    "autoscalingpolicy": "autoscalingpolicies",
}


def kind_of(text: str) -> str:
    """The kind ``text`` names (plural, singular or short), or ValueError listing them."""
    name = ALIASES.get(text.lower(), text.lower())
    if name not in KINDS:
        raise ValueError(f"unknown kind {text!r}: one of {', '.join(KINDS)}")
    return name


def list_objects(server: str, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every object of ``kind`` (see :data:`KINDS`) in every namespace, sorted by namespace and
    name. Raises OSError (with the URL) when the API server does not answer."""
    url = server.rstrip("/") + KINDS[kind][0]
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            items = json.loads(resp.read()).get("items") or []
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise OSError(f"cannot list {kind} at {url}: {exc}") from None
    live = [i for i in items if isinstance(i, dict)]
    return sorted(live, key=lambda o: (_meta(o).get("namespace") or "", _meta(o).get("name")))


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def age(obj: Mapping[str, Any], now: datetime.datetime) -> str:
    """``kubectl``'s age: 45s, 3m20s, 2h5m, 4d; ``<unknown>`` without a creationTimestamp."""
    stamp = _meta(obj).get("creationTimestamp")
    try:
        created = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    s = max(0, int((now - created).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    return f"{s // 86400}d"


def _ready(obj: Mapping[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _condition(obj: Mapping[str, Any], order: Sequence[str]) -> str:
    """The first of ``order`` whose condition is True, else the first one that is present."""
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or () if c}
    for t in order:
        if (conditions.get(t) or {}).get("status") == "True":
            return t
    return "Pending" if not conditions else f"Not{order[0]}"


def _row(kind: str, obj: Mapping[str, Any], now: datetime.datetime) -> list[str]:
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    head = [str(meta.get("namespace") or ""), str(meta.get("name") or "")]
    if kind == "models":
        rows = status.get("backends") or []
        backends = ",".join(str(b.get("name")) for b in spec.get("backends") or ())
        ready = sum(int(r.get("readyReplicas") or 0) for r in rows)
        want = sum(int(r.get("replicas") or 0) for r in rows)
        state = _condition(obj, ("Active", "Failed", "Initialized"))
        return [*head, backends, f"{ready}/{want}", state, age(obj, now)]
    if kind == "modelinfers":
        ready = int(status.get("readyReplicas") or 0)
        replicas = spec.get("replicas", 1)
        updated = int(status.get("updatedReplicas") or 0)
        return [*head, f"{ready}/{replicas}", str(updated), str(replicas), age(obj, now)]
    if kind == "pods":
        phase = str(status.get("phase") or "Pending")
        waiting = [
            prefix + str(w["reason"])
            for prefix, part in (("Init:", "initContainerStatuses"), ("", "containerStatuses"))
            for c in status.get(part) or ()
            if (w := (c.get("state") or {}).get("waiting") or {}).get("reason")
            not in (None, "PodInitializing", "ContainerCreating")
        ]
        if waiting and phase in ("Pending", "Running"):  # as kubectl shows it
            phase = waiting[0]
        if meta.get("deletionTimestamp"):
            phase = "Terminating"
        ready_pods = "1/1" if _ready(obj) else "0/1"
        return [*head, ready_pods, phase, str(status.get("podIP") or "<none>"), age(obj, now)]
    if kind == "modelservers":
        engine = str(spec.get("inferenceEngine") or "")
        endpoints = str(status.get("readyEndpoints", 0))
        return [*head, engine, endpoints, age(obj, now)]
    if kind == "modelroutes":
        targets = [
            f"{t.get('modelServerName')}" + (f"={t['weight']}" if "weight" in t else "")
            for r in spec.get("rules") or ()
            for t in r.get("targets") or ()
        ]
        model = str(spec.get("modelName") or "")
        return [*head, model, ",".join(targets), age(obj, now)]
    return [*head, age(obj, now)]


def table(kind: str, items: Sequence[Mapping[str, Any]], now: datetime.datetime) -> str:
    """The objects as ``kubectl get`` lays them out (left-aligned columns, three spaces)."""
    if not items:
        return f"No {kind} found."
    header = KINDS[kind][1]
    rows = [header, *(_row(kind, o, now) for o in items)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
