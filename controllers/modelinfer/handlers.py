"""Kopf handlers of the ModelInfer controller: translate Kopf's calls, delegate to the controller.

- indexes (ids `modelinfer_pods`, `modelinfer_services`, `modelinfer_revisions`): our children by
  `(namespace, modelinfer)`, parsed into the planner's observed types;
- event handlers wake the ModelInfer's loop on any change of it or of its children;
- a daemon per ModelInfer runs the reconcile loop;
- the deletion handler removes the children itself (owner references are set too, for clusters
  with a garbage collector), then Kopf drops our finalizer.
"""

from __future__ import annotations

import time
from typing import Any

import kopf

from controllers.modelinfer import observe
from controllers.modelinfer.reconciler import Key, ModelInferController
from controllers.modelinfer.types import (
    API_GROUP,
    API_VERSION,
    LABEL_MODEL_INFER,
    PLURAL,
    GroupTemplate,
    ObservedPod,
    ObservedService,
)

INDEX_IDS = ("modelinfer_pods", "modelinfer_services", "modelinfer_revisions")
_OURS = {LABEL_MODEL_INFER: kopf.PRESENT}


def register(registry: kopf.OperatorRegistry, controller: ModelInferController) -> None:
    """Register the ModelInfer handlers into `registry`."""

    @kopf.index("pods", labels=_OURS, id="modelinfer_pods", registry=registry)
    async def modelinfer_pods(body: kopf.Body, **_: Any) -> dict[Key, ObservedPod] | None:
        key = observe.owner_key(body)
        pod = observe.pod_from_json(body, time.time())
        return {key: pod} if key is not None and pod is not None else None

    @kopf.index("services", labels=_OURS, id="modelinfer_services", registry=registry)
    async def modelinfer_services(body: kopf.Body, **_: Any) -> dict[Key, ObservedService] | None:
        key = observe.owner_key(body)
        svc = observe.service_from_json(body)
        return {key: svc} if key is not None and svc is not None else None

    @kopf.index(
        "apps",
        "v1",
        "controllerrevisions",
        labels=_OURS,
        id="modelinfer_revisions",
        registry=registry,
    )
    async def modelinfer_revisions(body: kopf.Body, **_: Any) -> dict[Key, GroupTemplate] | None:
        key = observe.owner_key(body)
        tmpl = observe.revision_from_json(body)
        return {key: tmpl} if key is not None and tmpl is not None else None

    @kopf.on.event("pods", labels=_OURS, id="modelinfer-pod-events", registry=registry)
    def pod_event(body: kopf.Body, name: str, **_: Any) -> None:
        uid = str((body.get("metadata") or {}).get("uid") or "")
        controller.pod_event(observe.owner_key(body), name, uid)

    @kopf.on.event("services", labels=_OURS, id="modelinfer-service-events", registry=registry)
    def service_event(body: kopf.Body, **_: Any) -> None:
        controller.wake(observe.owner_key(body))

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, id="modelinfer-events", registry=registry)
    def modelinfer_event(namespace: str | None, name: str, **_: Any) -> None:
        controller.wake((namespace or "", name))

    @kopf.daemon(
        API_GROUP,
        API_VERSION,
        PLURAL,
        id="modelinfer-reconciler",
        cancellation_timeout=10.0,
        registry=registry,
    )
    async def modelinfer_reconciler(
        namespace: str | None,
        name: str,
        body: kopf.Body,
        stopped: kopf.DaemonStopped,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        indexes = {k: kwargs.get(k) for k in INDEX_IDS}
        await controller.run((namespace or "", name), body, stopped, indexes, logger)

    @kopf.on.delete(API_GROUP, API_VERSION, PLURAL, id="modelinfer-cleanup", registry=registry)
    async def modelinfer_cleanup(
        namespace: str | None, name: str, logger: kopf.Logger, **kwargs: Any
    ) -> None:
        indexes = {k: kwargs.get(k) for k in INDEX_IDS}
        await controller.cleanup((namespace or "", name), indexes, logger)
