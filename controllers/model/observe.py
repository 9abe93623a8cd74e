"""Child objects as the API returns them → :class:`ObservedChild` (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controllers.model.types import CHILD_KINDS, ChildKind, ChildRef, ObservedChild

__all__ = ["child_from_json", "kind_of"]


def kind_of(body: Mapping[str, Any]) -> ChildKind | None:
    """The child kind of ``body``, or None when it is not one of them."""
    kind = body.get("kind")
    for k in CHILD_KINDS:
        if k == kind:
            return k
    return None


def child_from_json(kind: ChildKind, body: Mapping[str, Any]) -> ObservedChild | None:
    """What the planner needs of one object of a child kind (None without a name)."""
    meta = body.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    owners = tuple(dict(o) for o in meta.get("ownerReferences") or [] if isinstance(o, Mapping))
    controller = next((o for o in owners if o.get("controller")), None)
    uid = controller.get("uid") if controller is not None else None
    return ObservedChild(
        ref=ChildRef(kind, name),
        labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        controller_uid=str(uid) if uid is not None else None,
        owner_refs=owners,
        spec=dict(body.get(CHILD_KINDS[kind].content) or {}),
        status=dict(body.get("status") or {}),
        deleting=bool(meta.get("deletionTimestamp")),
    )
