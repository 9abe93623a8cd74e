"""What a configuration source delivers: routes, servers and endpoints, already validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from crds.networking import ModelRoute, ModelServer
from fleet.profile import SchedulerProfile

__all__ = ["GatewayConfig", "StaticEndpoint", "object_key"]


@dataclass(slots=True, frozen=True)
class StaticEndpoint:
    """A pod a standalone gateway serves (from an ``Endpoints`` document)."""

    name: str
    address: str  # "host:port" or "host" (then the ModelServer's workloadPort is used)
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    source: str = ""
    # a Kubernetes pod's namespace: only ModelServers of that namespace select it; None (files):
    # any ModelServer whose selector matches
    namespace: str | None = None


@dataclass(slots=True)
class GatewayConfig:
    """Everything a configuration source delivers, already validated."""

    routes: list[ModelRoute] = field(default_factory=list)
    servers: list[ModelServer] = field(default_factory=list)
    endpoints: list[StaticEndpoint] = field(default_factory=list)
    # gateway-wide default profile (None = the scheduler's default)
    scheduler_profile: SchedulerProfile | None = None
    source: str = ""


def object_key(obj: ModelRoute | ModelServer) -> str:
    """``namespace/name`` of a custom-resource object (namespace defaults to ``default``)."""
    meta = obj.metadata
    return f"{meta.namespace or 'default'}/{meta.name}"
