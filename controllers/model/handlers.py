"""Kopf handlers of the Model controller: translate Kopf's calls, delegate to the controller.

- index ``model_objects``: every Model body by ``(namespace, name)``;
- indexes ``model_<plural>`` per child kind: every object by name (to see a name taken by
  someone else; of ConfigMaps only the labelled ones) and, when labelled
  ``registry.matrixinfer.ai/model``, by that Model;
- ``model-create`` / ``model-update`` / ``model-resume`` and the ``model-resync`` timer
  reconcile the Model;
- ``model-child-<plural>`` event handlers reconcile the owning Model on any change of a child,
  so a child edited by hand is put back and a deleted one recreated;
- ``model-cleanup`` (behind the operator's finalizer) deletes the children when the Model is
  deleted (a cluster's garbage collector would also do it through the owner references).
"""

from __future__ import annotations

from typing import Any

import kopf

from controllers.model.observe import child_from_json
from controllers.model.reconciler import (
    MODEL_INDEX,
    Key,
    ModelController,
    model_key,
    name_key,
)
from controllers.model.types import (
    API_VERSION,
    CHILD_KINDS,
    LABEL_MODEL,
    MODEL_PLURAL,
    ChildKind,
    ChildRef,
    ObservedChild,
)
from crds.registry import REGISTRY_GROUP

__all__ = ["register"]


def _key(namespace: str | None, name: str) -> Key:
    return (namespace or "", name)


def register(
    registry: kopf.OperatorRegistry, controller: ModelController, resync: float = 30.0
) -> None:
    """Register the Model handlers into ``registry``."""

    @kopf.index(REGISTRY_GROUP, API_VERSION, MODEL_PLURAL, id=MODEL_INDEX, registry=registry)
    async def model_objects(
        namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> dict[Key, dict[str, Any]]:
        return {_key(namespace, name): dict(body)}

    for kind in CHILD_KINDS:
        _register_child(registry, controller, kind)

    @kopf.on.create(REGISTRY_GROUP, API_VERSION, MODEL_PLURAL, id="model-create", registry=registry)
    @kopf.on.update(REGISTRY_GROUP, API_VERSION, MODEL_PLURAL, id="model-update", registry=registry)
    @kopf.on.resume(REGISTRY_GROUP, API_VERSION, MODEL_PLURAL, id="model-resume", registry=registry)
    @kopf.timer(
        REGISTRY_GROUP,
        API_VERSION,
        MODEL_PLURAL,
        id="model-resync",
        interval=resync,
        registry=registry,
    )
    async def model_reconcile(
        namespace: str | None, name: str, body: kopf.Body, logger: kopf.Logger, **kwargs: Any
    ) -> None:
        await controller.reconcile(_key(namespace, name), kwargs, logger, body=dict(body))

    @kopf.on.delete(
        REGISTRY_GROUP, API_VERSION, MODEL_PLURAL, id="model-cleanup", registry=registry
    )
    async def model_cleanup(
        namespace: str | None, name: str, body: kopf.Body, logger: kopf.Logger, **kwargs: Any
    ) -> None:
        uid = str((body.get("metadata") or {}).get("uid") or "")
        await controller.cleanup(_key(namespace, name), uid, kwargs, logger)


def _register_child(
    registry: kopf.OperatorRegistry, controller: ModelController, kind: ChildKind
) -> None:
    info = CHILD_KINDS[kind]
    plural = info.plural
    # our kinds by group, version and plural; a core kind (ConfigMap) by plural, and only the
    # labelled ones indexed: every ConfigMap of the namespaces would cost memory, and a name
    # taken by an unlabelled one shows as a failed create instead
    resource = (info.group, info.version, plural) if info.group else (plural,)
    only_labelled = {LABEL_MODEL: kopf.PRESENT} if not info.group else None

    @kopf.index(*resource, labels=only_labelled, id=f"model_{plural}", registry=registry)
    async def child_index(
        namespace: str | None, body: kopf.Body, **_: Any
    ) -> dict[tuple[str, ...], ObservedChild] | None:
        child = child_from_json(kind, body)
        if child is None:
            return None
        ns = namespace or ""
        out: dict[tuple[str, ...], ObservedChild] = {name_key(ns, kind, child.ref.name): child}
        owner = child.labels.get(LABEL_MODEL)
        if owner:
            out[model_key(ns, owner)] = child
        return out

    @kopf.on.event(
        *resource,
        labels={LABEL_MODEL: kopf.PRESENT},
        id=f"model-child-{plural}",
        registry=registry,
    )
    async def child_event(
        namespace: str | None, name: str, labels: kopf.Labels, logger: kopf.Logger, **kwargs: Any
    ) -> None:
        owner = labels.get(LABEL_MODEL)
        if owner:
            key = _key(namespace, owner)
            controller.child_event(key, ChildRef(kind, name))
            await controller.reconcile(key, kwargs, logger)
