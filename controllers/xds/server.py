"""The ADS server (state of the world, grpc.aio): serves the generated resources to Envoy nodes.

- the store (:class:`XdsCache`): the current resources per type URL, each type with its own
  ``version_info`` that changes only when that type's content changes. ``publish()`` is
  debounced: a burst of changes becomes one push.
- one stream state per connected Envoy (several nodes at once): per type the subscribed names,
  the last sent version and nonce, the last ACKed version. A request answering the last nonce
  without ``error_detail`` is an ACK; with one it is a NACK: logged with Envoy's message,
  counted in ``matrixinfer_xds_nacks_total``, and nothing is re-sent (Envoy keeps the last
  accepted config). A request with an older nonce is stale and ignored. A first request (no
  nonce) gets the current resources.
- push order: clusters, endpoints, listeners, routes. After a cluster push the endpoints are
  re-sent, after a listener push the routes (warming clusters/listeners wait for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controllers.xds.generate import CLUSTER, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, TYPE_ORDER
from controllers.xds.generate import content_hash as _hash
from controllers.xds.protos import to_any

__all__ = ["AdsServer", "XdsCache", "XdsMetrics"]

log = logging.getLogger("matrixinfer.xds")

_SHORT = {CLUSTER: "CDS", ENDPOINT_TYPE: "EDS", LISTENER_TYPE: "LDS", ROUTE_TYPE: "RDS"}
_WILDCARD_TYPES = {CLUSTER, LISTENER_TYPE}


def short(type_url: str) -> str:
    return _SHORT.get(type_url, type_url.rsplit(".", 1)[-1])


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.nacks = Counter(
            "matrixinfer_xds_nacks_total", "Responses Envoy rejected (NACK)", ["type"], registry=r
        )
        self.acks = Counter(
            "matrixinfer_xds_acks_total", "Responses Envoy accepted (ACK)", ["type"], registry=r
        )
        self.pushes = Counter(
            "matrixinfer_xds_pushes_total", "Discovery responses sent", ["type"], registry=r
        )
        self.streams = Gauge(
            "matrixinfer_xds_connected_streams", "Connected Envoy ADS streams", registry=r
        )
        self.ack_seconds = Histogram(
            "matrixinfer_xds_push_ack_seconds",
            "From a published change to the Envoy ACK of that version",
            ["type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.versions = Counter(
            "matrixinfer_xds_snapshots_total",
            "Resource sets published (after debounce)",
            registry=r,
        )


@dataclass(slots=True)
class _TypeSet:
    version: str
    resources: dict[str, any_pb2.Any]
    published_at: float


class XdsCache:
    """Current resources per type URL with per-type versions; listeners are told on change."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._types: dict[str, _TypeSet] = {}
        self._hashes: dict[str, str] = {}
        self._serial = itertools.count(1)
        self._listeners: list[Callable[[], None]] = []

    def set(self, resources: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
        """Install a full resource set (protobuf-JSON dicts); returns the type URLs that changed.

        The dicts are converted first: a resource that does not fit the schema raises
        :class:`controllers.xds.protos.ResourceError` and nothing changes.
        """
        converted: dict[str, dict[str, any_pb2.Any]] = {}
        hashes: dict[str, str] = {}
        for type_url, items in resources.items():
            digest = _hash(items)
            hashes[type_url] = digest
            if self._hashes.get(type_url) == digest:
                continue
            converted[type_url] = {name: to_any(res) for name, res in items.items()}
        now = self.clock()
        changed = []
        for type_url, anys in converted.items():
            self._types[type_url] = _TypeSet(str(next(self._serial)), anys, now)
            self._hashes[type_url] = hashes[type_url]
            changed.append(type_url)
        if changed:
            for listener in list(self._listeners):
                listener()
        return changed

    def set_raw(self, type_url: str, resources: Mapping[str, any_pb2.Any]) -> str:
        """Install already packed resources for one type (tests inject invalid ones this way)."""
        version = str(next(self._serial))
        self._types[type_url] = _TypeSet(version, dict(resources), self.clock())
        self._hashes[type_url] = f"raw-{version}"
        for listener in list(self._listeners):
            listener()
        return version

    def get(self, type_url: str) -> _TypeSet | None:
        return self._types.get(type_url)

    def versions(self) -> dict[str, str]:
        return {short(t): s.version for t, s in self._types.items()}

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


@dataclass(slots=True)
class _TypeState:
    names: frozenset[str] | None = None  # None: wildcard
    subscribed: bool = False
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    last_error: str = ""
    force: bool = False


@dataclass
class _Stream:
    node: str
    cluster: str
    types: dict[str, _TypeState] = field(default_factory=dict)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    outbox: list[discovery_pb2.DiscoveryRequest] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "cluster": self.cluster,
            "types": {
                short(t): {
                    "sentVersion": s.sent_version,
                    "ackedVersion": s.acked_version,
                    "nonce": s.sent_nonce,
                    "lastError": s.last_error,
                    "names": None if s.names is None else sorted(s.names),
                }
                for t, s in self.types.items()
            },
        }


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """``AggregatedDiscoveryService`` over an :class:`XdsCache`; one task per Envoy stream."""

    def __init__(
        self,
        cache: XdsCache | None = None,
        metrics: XdsMetrics | None = None,
        debounce: float = 0.05,
    ) -> None:
        self.cache = cache or XdsCache()
        self.metrics = metrics or XdsMetrics()
        self.debounce = debounce
        self.streams: list[_Stream] = []
        self._pending: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None
        self._pending_task: asyncio.Task[None] | None = None
        self.last_error: str = ""
        self.published = 0
        # called with (node, type URL, version) on every ACK (the benchmark waits on these)
        self.on_ack: list[Callable[[str, str, str], None]] = []

    # ---- publishing ---------------------------------------------------------------------------
    def publish_now(self, resources: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
        try:
            changed = self.cache.set(resources)
        except ValueError as exc:
            self.last_error = str(exc)
            log.error("generated resources rejected before sending (kept the last set): %s", exc)
            return []
        self.last_error = ""
        self.published += 1
        self.metrics.versions.inc()
        if changed:
            log.info("xDS resources changed: %s", self.cache.versions())
        return changed

    def publish(self, resources: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        """Debounced: the newest set published within ``debounce`` seconds is installed once."""
        self._pending = resources
        if self._pending_task is None or self._pending_task.done():
            self._pending_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(self.debounce)
        pending, self._pending = self._pending, None
        if pending is not None:
            self.publish_now(pending)

    def status(self) -> dict[str, Any]:
        return {
            "versions": self.cache.versions(),
            "published": self.published,
            "lastError": self.last_error,
            "streams": [s.to_json() for s in self.streams],
        }

    def acked(self, type_url: str) -> list[str]:
        """The version each connected node has ACKed for a type (tests, the benchmark)."""
        return [s.types[type_url].acked_version for s in self.streams if type_url in s.types]

    # ---- the stream ---------------------------------------------------------------------------
    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _Stream(node="", cluster="")
        self.streams.append(stream)
        self.metrics.streams.inc()
        unsubscribe = self.cache.subscribe(stream.wake.set)
        closed = asyncio.Event()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    stream.outbox.append(request)
                    stream.wake.set()
            finally:
                closed.set()
                stream.wake.set()

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if closed.is_set() and not stream.outbox:
                    break
                requests, stream.outbox = stream.outbox, []
                for request in requests:
                    self._on_request(stream, request)
                for response in self._responses(stream):
                    yield response
        finally:
            unsubscribe()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.streams.remove(stream)
            self.metrics.streams.dec()
            log.info("Envoy node %r disconnected", stream.node)

    def _on_request(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> None:
        if request.HasField("node") and request.node.id:
            if not stream.node:
                log.info(
                    "Envoy node %r (cluster %r) connected", request.node.id, request.node.cluster
                )
            stream.node, stream.cluster = request.node.id, request.node.cluster
        type_url = request.type_url
        state = stream.types.setdefault(type_url, _TypeState())
        names = frozenset(request.resource_names)
        wanted: frozenset[str] | None = (
            None if (type_url in _WILDCARD_TYPES and not names) or "*" in names else names
        )
        nonce = request.response_nonce
        if nonce and nonce != state.sent_nonce:
            return  # an answer to an older response: superseded
        if nonce and request.HasField("error_detail"):
            state.last_error = request.error_detail.message
            self.metrics.nacks.labels(short(type_url)).inc()
            log.error(
                "Envoy node %r rejected %s version %s (still on %r): %s",
                stream.node,
                short(type_url),
                state.sent_version,
                request.version_info,
                request.error_detail.message,
            )
            state.names = wanted
            state.subscribed = True
            return  # keep the last accepted config; the next change is sent as usual
        if nonce:
            if state.acked_version != request.version_info:
                self.metrics.acks.labels(short(type_url)).inc()
                current = self.cache.get(type_url)
                if current is not None and current.version == request.version_info:
                    self.metrics.ack_seconds.labels(short(type_url)).observe(
                        max(0.0, self.cache.clock() - current.published_at)
                    )
            state.acked_version = request.version_info
            state.last_error = ""
            for listener in self.on_ack:
                listener(stream.node, type_url, request.version_info)
            if state.subscribed and wanted == state.names:
                return  # a plain ACK
        state.names = wanted
        state.subscribed = True
        state.force = True  # first request, reconnect, or a change of subscribed names

    def _responses(self, stream: _Stream) -> list[discovery_pb2.DiscoveryResponse]:
        out: list[discovery_pb2.DiscoveryResponse] = []
        for type_url in TYPE_ORDER + tuple(t for t in stream.types if t not in TYPE_ORDER):
            state = stream.types.get(type_url)
            if state is None or not state.subscribed:
                continue
            current = self.cache.get(type_url)
            if current is None:
                continue
            if not state.force and current.version == state.sent_version:
                continue
            state.force = False
            resources = (
                list(current.resources.values())
                if state.names is None
                else [current.resources[n] for n in sorted(state.names) if n in current.resources]
            )
            state.sent_version = current.version
            state.sent_nonce = str(next(stream.nonces))
            out.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=current.version,
                    resources=resources,
                    type_url=type_url,
                    nonce=state.sent_nonce,
                )
            )
            self.metrics.pushes.labels(short(type_url)).inc()
            # warming clusters wait for their endpoints, warming listeners for their routes
            follower = {CLUSTER: ENDPOINT_TYPE, LISTENER_TYPE: ROUTE_TYPE}.get(type_url)
            if follower is not None and follower in stream.types:
                stream.types[follower].force = True
        return out
