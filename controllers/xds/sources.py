"""Inputs for the generator from a configuration (YAML files or the Kubernetes watch).

Pods are resolved exactly as the extproc resolves them (the datastore's selection: a ModelServer's
``workloadSelector.matchLabels`` over the endpoints, its ``workloadPort``), so Envoy's pods cluster
lists exactly the pods the extproc may choose.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from controllers.xds.generate import GatewaySettings, XdsInputs

__all__ = ["inputs_from_config", "with_policy_filters"]

log = logging.getLogger("matrixinfer.xds")


def inputs_from_config(config: Any, extproc_endpoints: Sequence[str]) -> XdsInputs:
    """``config`` is an ``extproc.datastore.GatewayConfig``."""
    from extproc.datastore import Datastore

    snapshot = Datastore().apply(config)
    return XdsInputs(
        routes=tuple(config.routes),
        servers=tuple(config.servers),
        pod_addresses=tuple(sorted({p.address for p in snapshot.pods.values()})),
        extproc_endpoints=tuple(extproc_endpoints),
    )


def with_policy_filters(settings: GatewaySettings) -> GatewaySettings:
    """Add the policy filters / access logs ``extproc.usage`` declares (when that module exists:
    ``envoy_http_filters(...)`` and ``envoy_access_logs(...)``, each returning a list of dicts).
    The filter definitions live there only; this just places them in the listener."""
    try:
        usage = importlib.import_module("extproc.usage")
    except ImportError:
        return settings
    filters: tuple[Any, ...] = settings.extra_http_filters
    logs: tuple[Any, ...] = settings.extra_access_logs
    for attr, current in (("envoy_http_filters", "filters"), ("envoy_access_logs", "logs")):
        fn = getattr(usage, attr, None)
        if fn is None:
            continue
        try:
            value = tuple(fn())
        except TypeError:
            log.warning(
                "extproc.usage.%s() needs arguments this version does not pass; skipped", attr
            )
            continue
        if current == "filters":
            filters = filters + value
        else:
            logs = logs + value
    return replace(settings, extra_http_filters=filters, extra_access_logs=logs)
