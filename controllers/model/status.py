"""The Model's status (pure): per-backend replicas from the child ModelInfers, and the conditions
Initialized / Active / Failed with Events on their transitions.

- **Initialized** — every child the Model generates exists and is the Model's
  (``ChildrenCreated``); otherwise False, ``CreatingChildren`` naming the missing children, or
  ``InvalidSpec`` when the Model itself does not validate.
- **Active** — every backend whose ModelInfer wants replicas has at least one ready InferGroup
  (``BackendsReady``; ``ScaledToZero`` when none wants any); otherwise False,
  ``BackendsNotReady`` naming each backend and its ModelInfer.
- **Failed** — a problem stops the Model from being what it says: the Model is invalid
  (``InvalidSpec``), an artefact URI the pods could not use (``InvalidURI``), a generated
  child is invalid (``InvalidChild``), a child's name is taken
  (``ChildConflict``), a child reports a failure (``ChildFailed``), an API write failed
  (``ApplyFailed``); the reason is the first problem's, the message lists them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from controllers.model.types import ChildRef, EventNote, ObservedChild, Problem, StatusPlan

__all__ = ["child_problems", "model_status"]

_MAX_MESSAGE = 4000


def _cond(conditions: Iterable[Mapping[str, Any]], ctype: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == ctype), None)


def child_problems(children: Iterable[ObservedChild]) -> list[Problem]:
    """Failures the children report: an invalid ModelInfer spec, a ModelRoute not accepted."""
    out: list[Problem] = []
    for c in children:
        conds = c.status.get("conditions") or []
        bad = None
        if c.ref.kind == "ModelInfer":
            bad = _cond(conds, "SpecValid")
        elif c.ref.kind == "ModelRoute":
            bad = _cond(conds, "Accepted")
        if bad is not None and bad.get("status") == "False":
            out.append(
                Problem(
                    "ChildFailed",
                    f"{c.ref}: {bad.get('type')} is False ({bad.get('reason')}):"
                    f" {bad.get('message') or ''}".rstrip(": "),
                )
            )
    return out


def _backends(
    backends: Sequence[str], infers: Mapping[str, ObservedChild | None]
) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Per backend status, the backends not serving yet (as messages), and whether any backend
    wants replicas."""
    rows: list[dict[str, Any]] = []
    waiting: list[str] = []
    wants_any = False
    for name in backends:
        mi = infers.get(name)
        st = mi.status if mi is not None else {}
        replicas = int(st.get("replicas") or 0)
        ready = int(st.get("readyReplicas") or 0)
        rows.append({"name": name, "replicas": replicas, "readyReplicas": ready})
        want = mi.spec.get("replicas", 1) if mi is not None else 1
        if isinstance(want, int) and want > 0:
            wants_any = True
            if ready < 1:
                where = f"ModelInfer {mi.ref.name}" if mi is not None else "no ModelInfer yet"
                waiting.append(f"backend {name}: {ready} of {want} InferGroups ready ({where})")
    return rows, waiting, wants_any


def model_status(
    *,
    generation: int | None,
    backends: Sequence[str],
    infers: Mapping[str, ObservedChild | None],
    missing: Sequence[ChildRef],
    problems: Sequence[Problem],
    spec_valid: bool,
    previous: Mapping[str, Any],
    now: str,
) -> StatusPlan:
    """The status to write and the Events of what changed since ``previous``.

    ``infers`` maps each backend name to its ModelInfer (None when it does not exist yet)."""
    rows, waiting, wants_any = _backends(backends, infers)
    if not spec_valid:
        init = ("False", "InvalidSpec", "the Model is invalid; see the Failed condition")
    elif missing:
        init = ("False", "CreatingChildren", "waiting for " + ", ".join(map(str, missing)))
    else:
        init = ("True", "ChildrenCreated", "every child exists")
    if init[0] != "True":
        active = ("False", "NotInitialized", "the children are not all created yet")
    elif waiting:
        active = ("False", "BackendsNotReady", "; ".join(waiting))
    elif wants_any:
        active = ("True", "BackendsReady", "every backend has a ready InferGroup")
    else:
        active = ("True", "ScaledToZero", "no backend wants replicas")
    if problems:
        failed = ("True", problems[0].reason, "; ".join(p.message for p in problems))
    else:
        failed = ("False", "NoProblems", "")
    old_conds = list(previous.get("conditions") or [])
    conditions: list[dict[str, Any]] = []
    events: list[EventNote] = []
    for ctype, (status, reason, message) in (
        ("Initialized", init),
        ("Active", active),
        ("Failed", failed),
    ):
        message = message[:_MAX_MESSAGE]
        old = _cond(old_conds, ctype)
        moved = old is None or old.get("status") != status
        cond = {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now if moved or old is None else old.get("lastTransitionTime"),
            "observedGeneration": generation,
        }
        conditions.append({k: v for k, v in cond.items() if v is not None})
        failing = ctype == "Failed" and status == "True"
        announce = moved and not (old is None and status == "False")
        if announce or (failing and old is not None and old.get("reason") != reason):
            bad = failing or (ctype != "Failed" and status == "False")
            events.append(
                EventNote(
                    "Warning" if bad else "Normal",
                    reason,
                    f"{ctype}={status}" + (f": {message}" if message else ""),
                )
            )
    status_doc: dict[str, Any] = {"conditions": conditions, "backends": rows}
    if generation is not None:
        status_doc["observedGeneration"] = generation
    state = "Failed" if failed[0] == "True" else "Active" if active[0] == "True" else "Initializing"
    return StatusPlan(status_doc, tuple(events), state)
