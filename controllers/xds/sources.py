"""Inputs for the generator from a configuration (YAML files or the Kubernetes watch).

Pods are resolved exactly as the extproc resolves them (:func:`fleet.pods.members`: a ModelServer's
``workloadSelector.matchLabels`` over the endpoints, its ``workloadPort``), so Envoy's pods cluster
lists exactly the pods the extproc may choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from controllers.xds.generate import GatewaySettings, XdsInputs
from fleet.config import GatewayConfig
from fleet.pods import grpc_pod_addresses, pod_addresses
from fleet.usage_envoy import envoy_http_filters

__all__ = ["inputs_from_config", "with_policy_filters"]


def inputs_from_config(config: GatewayConfig, extproc_endpoints: Sequence[str]) -> XdsInputs:
    return XdsInputs(
        routes=tuple(config.routes),
        servers=tuple(config.servers),
        pod_addresses=tuple(pod_addresses(config)),
        grpc_pod_addresses=tuple(grpc_pod_addresses(config)),
        extproc_endpoints=tuple(extproc_endpoints),
    )


def with_policy_filters(settings: GatewaySettings) -> GatewaySettings:
    """The usage-accounting filters (:mod:`fleet.usage_envoy`) placed in the listener after the
    settings' own (the access log that reports their usage is always there: ``request_log``)."""
    return replace(
        settings, extra_http_filters=(*settings.extra_http_filters, *envoy_http_filters())
    )
