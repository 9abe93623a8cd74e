"""Pods and their engine metrics, and how a ModelServer's label selector picks pods.

Pure: no gRPC, HTTP or Kubernetes here. Hot-path objects are slotted dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from crds.networking import ModelServer
from fleet.config import GatewayConfig, StaticEndpoint, object_key

__all__ = [
    "Member",
    "Pod",
    "PodMetrics",
    "grpc_address",
    "grpc_pod_addresses",
    "index_by_label",
    "members",
    "pod_address",
    "pod_addresses",
    "selected",
    "selects",
]


@dataclass(slots=True)
class PodMetrics:
    """What the scraper last read from one pod's /metrics, engine names already mapped.

    ``None`` means "not reported"; ``stale`` marks a read older than the staleness bound, which
    plugins must treat as unknown. ``unreachable``: the last scrape found nothing listening (the
    pod is gone or its engine exited) — the datastore takes such a pod out of rotation.
    """

    waiting: float | None = None  # requests queued in the engine
    running: float | None = None  # requests in the running batch
    kv_cache_usage: float | None = None  # 0..1
    ttft_seconds: float | None = None  # mean TTFT over the last scrape interval (histogram delta)
    tpot_seconds: float | None = None  # mean inter-token latency over the last interval
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int | None = None
    # LoRA adapters the engine has loaded (its /v1/models entries with a ``parent``), read on a
    # slower interval than the metrics; None = not known (not read yet, or not an engine that lists
    # them)
    loaded_loras: frozenset[str] | None = None
    # monotonic time the read of ``loaded_loras`` started (None: never read); a list read before
    # the pod last turned ready is unknown (the datastore sets it back to None)
    loras_read_at: float | None = None
    scraped_at: float = 0.0  # monotonic time of the read
    stale: bool = True
    unreachable: bool = False


@dataclass(slots=True)
class Pod:
    """One endpoint a ModelServer may send requests to."""

    name: str
    address: str  # "ip:port" exactly as written into x-gateway-destination-endpoint
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    metrics: PodMetrics = field(default_factory=PodMetrics)
    in_flight: int = 0  # requests this gateway has sent there and not yet finished
    # requests sent there minus requests finished since its last fresh metrics: how far the
    # engine's queue may have moved since that read (the saturation filter adds it to ``waiting``)
    since_scrape: int = 0
    # monotonic time the pod last turned ready (inf while not ready): its engine's adapter list
    # is unknown until a read that started at or after it (``PodMetrics.loras_read_at``)
    ready_since: float = 0.0
    # "ip:port" of its Open Inference Protocol gRPC service (its ModelServer's
    # workloadPort.grpcPort); None: it serves no gRPC
    grpc: str | None = None


def selects(match_labels: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes ``matchLabels`` semantics: every listed label present with the same value."""
    if not match_labels:
        return False  # an empty selector selects nothing here (never every pod by accident)
    return all(labels.get(k) == v for k, v in match_labels.items())


def index_by_label(
    endpoints: list[StaticEndpoint],
) -> dict[tuple[str, str], list[StaticEndpoint]]:
    """Endpoints by each (label, value) pair they carry, in configuration order."""
    index: dict[tuple[str, str], list[StaticEndpoint]] = {}
    for endpoint in endpoints:
        for pair in endpoint.labels.items():
            index.setdefault(pair, []).append(endpoint)
    return index


def selected(
    match_labels: Mapping[str, str] | None,
    index: Mapping[tuple[str, str], list[StaticEndpoint]],
) -> list[StaticEndpoint]:
    """The endpoints ``match_labels`` selects (``selects`` semantics), in configuration order.

    Only the endpoints carrying the selector's rarest label pair are tested, so building a
    snapshot costs O(pods), not O(ModelServers x pods).
    """
    if not match_labels:
        return []
    lists = [index.get(pair, []) for pair in match_labels.items()]
    fewest = min(lists, key=len)
    return [e for e in fewest if selects(match_labels, e.labels)]


def pod_address(endpoint: StaticEndpoint, port: int | None) -> str | None:
    if endpoint.address.rsplit(":", 1)[-1].isdigit() and ":" in endpoint.address:
        return endpoint.address
    if port is None:
        return None
    return f"{endpoint.address}:{port}"


@dataclass(slots=True, frozen=True)
class Member:
    """An endpoint a ModelServer selects, with the pod address requests go to."""

    endpoint: StaticEndpoint
    address: str
    grpc: str | None = None  # "ip:port" of its gRPC service (workloadPort.grpcPort), if any


def members(
    server: ModelServer,
    by_label: Mapping[tuple[str, str], list[StaticEndpoint]],
    warnings: list[str],
) -> Iterator[Member]:
    """The endpoints ``server`` (a ``crds.ModelServer``) selects, in configuration order: its
    ``workloadSelector.matchLabels`` over endpoints of its own namespace (an endpoint without a
    namespace, from files, matches any), at its ``workloadPort`` unless the endpoint names a port.
    An endpoint left without a port is skipped with a warning appended to ``warnings``."""
    spec = server.spec
    selector = spec.workload_selector.match_labels if spec.workload_selector else None
    port = spec.workload_port.port if spec.workload_port else None
    grpc_port = spec.workload_port.grpc_port if spec.workload_port else None
    namespace = server.metadata.namespace or "default"
    for endpoint in selected(selector, by_label):
        if endpoint.namespace is not None and endpoint.namespace != namespace:
            continue  # a selector picks pods of its own namespace only
        address = pod_address(endpoint, port)
        if address is None:
            warnings.append(
                f"endpoint '{endpoint.name}' has no port and ModelServer '{object_key(server)}' "
                "sets no workloadPort; skipped"
            )
            continue
        yield Member(endpoint, address, grpc_address(address, grpc_port))


def pod_addresses(config: GatewayConfig) -> list[str]:
    """Every pod address any ModelServer of ``config`` selects, sorted (Envoy's pods cluster)."""
    by_label = index_by_label(config.endpoints)
    out: set[str] = set()
    for server in config.servers:
        out.update(m.address for m in members(server, by_label, []))
    return sorted(out)


def grpc_address(address: str, grpc_port: int | None) -> str | None:
    """The ``ip:port`` a pod at ``address`` serves the Open Inference Protocol's gRPC service
    (inference.GRPCInferenceService) on: its ModelServer's ``workloadPort.grpcPort`` at the
    pod's host, or None when the ModelServer sets none (the pod serves no gRPC)."""
    if grpc_port is None:
        return None
    host = address.rpartition(":")[0] or address
    return f"{host}:{grpc_port}"


def grpc_pod_addresses(config: GatewayConfig) -> list[str]:
    """Every gRPC address (:func:`grpc_address`) of a pod any ModelServer of ``config`` selects,
    sorted (Envoy's pods-gRPC cluster)."""
    by_label = index_by_label(config.endpoints)
    out: set[str] = set()
    for server in config.servers:
        for m in members(server, by_label, []):
            if m.grpc is not None:
                out.add(m.grpc)
    return sorted(out)
