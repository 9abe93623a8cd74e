"""Render the Envoy bootstrap in ``envoy/gateway.yaml.tmpl`` for the local stack and the gateway."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TEMPLATE",
    "AdsBootstrap",
    "EnvoySettings",
    "render_ads_bootstrap",
    "render_bootstrap",
    "template_path",
]

_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "gateway.yaml.tmpl"


def template_path() -> Path:
    """The bootstrap template (from a source checkout, or installed next to the package)."""
    for candidate in (_ROOT / "envoy" / TEMPLATE, Path(__file__).parent / "envoy" / TEMPLATE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Envoy bootstrap template {TEMPLATE} not found under {_ROOT / 'envoy'}"
    )


@dataclass(slots=True)
class EnvoySettings:
    listen_port: int
    admin_port: int
    extproc_port: int
    eds_path: Path
    listen_host: str = "127.0.0.1"
    extproc_host: str = "127.0.0.1"
    node_id: str = "matrixinfer-gateway"
    body_mode: str = "BUFFERED"  # or FULL_DUPLEX_STREAMED
    body_limit: int = 10 * 1024 * 1024
    message_timeout_ms: int = 200
    fail_open: bool = False
    retries: int = 2
    connect_timeout_ms: int = 1000
    route_timeout_s: int = 0  # 0: no limit on the whole exchange (answers stream)
    stream_idle_timeout_s: int = 300
    access_log: bool = False


def _access_log() -> str:
    text = template_path().with_name("access_log.yaml.part").read_text()
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def render_bootstrap(settings: EnvoySettings) -> str:
    s = settings
    text = template_path().read_text()
    values = {
        "NODE_ID": s.node_id,
        "ADMIN_PORT": str(s.admin_port),
        "LISTEN_HOST": s.listen_host,
        "LISTEN_PORT": str(s.listen_port),
        "BUFFER_LIMIT": str(s.body_limit + 1024 * 1024),
        "STREAM_IDLE_TIMEOUT": f"{s.stream_idle_timeout_s}s",
        "ROUTE_TIMEOUT": f"{s.route_timeout_s}s",
        "RETRIES": str(s.retries),
        "MESSAGE_TIMEOUT": f"{s.message_timeout_ms / 1000:.3f}s",
        "BODY_MODE": s.body_mode,
        "TRAILER_MODE": "SEND" if s.body_mode == "FULL_DUPLEX_STREAMED" else "SKIP",
        "FAILURE_MODE_ALLOW": "true" if s.fail_open else "false",
        "EXTPROC_HOST": s.extproc_host,
        "EXTPROC_PORT": str(s.extproc_port),
        "CONNECT_TIMEOUT": f"{s.connect_timeout_ms / 1000:.3f}s",
        "EDS_PATH": str(s.eds_path),
        "EDS_DIR": str(s.eds_path.parent),
        "ACCESS_LOG": _access_log() if s.access_log else "",
    }
    return string.Template(text).substitute(values)


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
    text = template_path().with_name(ADS_TEMPLATE).read_text()
    values = {
        "NODE_ID": settings.node_id,
        "NODE_CLUSTER": settings.node_cluster,
        "ADMIN_PORT": str(settings.admin_port),
        "XDS_HOST": settings.xds_host,
        "XDS_PORT": str(settings.xds_port),
    }
    return string.Template(text).substitute(values)
