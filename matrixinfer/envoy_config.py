"""Envoy bootstraps: ADS (``envoy/ads.yaml.tmpl``, the local stack) and a static one generated
from the same xDS resources (benchmarks)."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from controllers.xds.generate import GatewaySettings, XdsInputs, static_bootstrap
from controllers.xds.sources import with_policy_filters
from matrixinfer.resources import project_file

__all__ = [
    "TEMPLATE",
    "AdsBootstrap",
    "EnvoySettings",
    "render_ads_bootstrap",
    "render_bootstrap",
    "template_path",
]

TEMPLATE = "ads.yaml.tmpl"  # template_path() also locates baseline.yaml.tmpl next to it


def template_path() -> Path:
    """The bootstrap template (from a source checkout, or the installed data files)."""
    return project_file(f"envoy/{TEMPLATE}")


@dataclass(slots=True, frozen=True)
class EnvoySettings:
    """A static bootstrap: the gateway's Envoy settings (``GatewaySettings``, the one definition
    the xDS server uses too) plus what only a bootstrap without xDS needs."""

    admin_port: int
    extproc_port: int
    eds_path: Path
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    extproc_host: str = "127.0.0.1"
    node_id: str = "matrixinfer-gateway"
    # add the usage filters (fleet.usage_envoy); the access log to the extproc is always there
    policy_filters: bool = False


def render_bootstrap(settings: EnvoySettings) -> str:
    """A static bootstrap (no xDS server) made from the generated xDS resources
    (``controllers.xds.generate.static_bootstrap``): the one definition of the gateway's Envoy
    config. Used by the benchmarks; the local stack runs Envoy on ADS
    (:func:`render_ads_bootstrap`)."""
    s = settings
    gateway = with_policy_filters(s.gateway) if s.policy_filters else s.gateway
    bootstrap = static_bootstrap(
        gateway,
        XdsInputs(extproc_endpoints=[f"{s.extproc_host}:{s.extproc_port}"]),
        admin_port=s.admin_port,
        eds_path=str(s.eds_path),
        node_id=s.node_id,
    )
    return json.dumps(bootstrap, indent=1) + "\n"  # JSON is YAML: any file name works


ADS_TEMPLATE = "ads.yaml.tmpl"


@dataclass(slots=True)
class AdsBootstrap:
    """Envoy bootstrapped against the MatrixInfer ADS server (everything else comes over xDS)."""

    admin_port: int
    xds_port: int
    xds_host: str = "127.0.0.1"
    node_id: str = "matrixinfer-gateway"
    node_cluster: str = "matrixinfer-gateway"


def render_ads_bootstrap(settings: AdsBootstrap) -> str:
    text = template_path().with_name(ADS_TEMPLATE).read_text()  # (TEMPLATE is ADS_TEMPLATE)
    values = {
        "NODE_ID": settings.node_id,
        "NODE_CLUSTER": settings.node_cluster,
        "ADMIN_PORT": str(settings.admin_port),
        "XDS_HOST": settings.xds_host,
        "XDS_PORT": str(settings.xds_port),
    }
    return string.Template(text).substitute(values)
