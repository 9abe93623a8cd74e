"""The engines' KV events -> :class:`extproc.kvindex.KVBlockIndex` (the subscriber edge).

One ZMQ SUB socket per ready pod whose ModelServer sets ``kvEvents``: ``tcp://<pod ip>:<port>``,
filtered on ``topic``. Messages are vLLM's ``[topic, seq (8 bytes big-endian), KVEventBatch]``.
Sequence numbers drive the resync:

- first message with ``seq > 0``: the history before it is asked from the replay socket
  (``tcp://<pod ip>:<replayPort>``, a DEALER sending ``[b"", start_seq]``) so the index learns
  what the engine cached before the gateway subscribed;
- a gap (``seq`` beyond the next expected one; messages were dropped or the connection broke and
  ZMQ reconnected): the missing batches are replayed, in order, before this one is applied;
- a reconnect of the SUB socket (the engine or the network went away and came back; the engine may
  have restarted with a fresh sequence), or ``seq`` below the expected one (a restart): the pod's
  blocks are dropped and its history replayed from 0;
- when the missing batches cannot be had (no replay port, or the replay buffer no longer holds
  them) the pod's blocks are dropped: the index may under-report a pod's cache, never over-report.

A pod that leaves the ready set is unsubscribed and dropped from the index. Metrics:
``matrixinfer_kv_index_blocks``, ``matrixinfer_kv_events_lag_seconds{pod}`` (now - the last
applied batch's timestamp), ``matrixinfer_kv_events_batches_total{pod}``,
``matrixinfer_kv_events_resyncs_total{pod,reason}`` (history, gap, restart, reconnect, lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge
from zmq.utils.monitor import parse_monitor_message

from extproc.kvindex import AllBlocksCleared, BlockRemoved, BlockStored, KVBlockIndex, KVEvent

__all__ = [
    "END_SEQ",
    "KVEventsSubscriber",
    "KVEventsTarget",
    "decode_batch",
    "targets_of",
]

log = logging.getLogger("extproc.kvevents")

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent]]:
    """A vLLM ``KVEventBatch`` (msgpack ``[ts, events, dp_rank?]``) -> (ts, events).

    Events come as msgpack arrays whose first element is the tag (msgspec ``array_like``, earlier
    vLLM releases) or as maps with a ``type`` key (vLLM 0.31). Block hashes are the digests' low
    64 bits (vLLM's default) or whole digests (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``), which
    are folded to their low 64 bits so a block has one name either way. Raises ValueError naming
    what is malformed; fields vLLM may add are ignored.
    """
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"KV event batch is not msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise ValueError("KV event batch must be an array [ts, events, ...]")
    ts = float(raw[0])
    events: list[KVEvent] = []
    for i, ev in enumerate(raw[1]):
        if isinstance(ev, dict):
            events.append(_from_map(i, ev))
            continue
        if not isinstance(ev, list) or not ev or not isinstance(ev[0], str):
            raise ValueError(
                f"KV event {i} must be an array whose first element is its tag, or a map with "
                "a 'type'"
            )
        tag = ev[0]
        if tag == "BlockStored" and len(ev) >= 5:
            events.append(BlockStored(_hashes(i, ev[1]), _hash(i, ev[2]), int(ev[4] or 0)))
        elif tag == "BlockRemoved" and len(ev) >= 2:
            events.append(BlockRemoved(_hashes(i, ev[1])))
        elif tag == "AllBlocksCleared":
            events.append(AllBlocksCleared())
        else:
            raise ValueError(f"KV event {i}: unknown tag {tag!r} or too few fields ({len(ev)})")
    return ts, events


def _from_map(i: int, ev: dict[Any, Any]) -> KVEvent:
    tag = ev.get("type")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if tag not in ("BlockStored", "BlockRemoved"):
        raise ValueError(f"KV event {i}: unknown type {tag!r}")
    if "block_hashes" not in ev:
        raise ValueError(f"KV event {i} ({tag}): no block_hashes")
    hashes = _hashes(i, ev["block_hashes"])
    if tag == "BlockRemoved":
        return BlockRemoved(hashes)
    parent = _hash(i, ev.get("parent_block_hash"))
    return BlockStored(hashes, parent, int(ev.get("block_size") or 0))


def _hash(i: int, h: object) -> int | None:
    """One ExternalBlockHash as the index names blocks: an unsigned int (bytes: low 64 bits)."""
    if h is None or isinstance(h, int):
        return h
    if isinstance(h, bytes):
        return int.from_bytes(h[-8:], "big")
    raise ValueError(f"KV event {i}: a block hash must be an integer or bytes, got {h!r}")


def _hashes(i: int, hs: object) -> tuple[int, ...]:
    if not isinstance(hs, list):
        raise ValueError(f"KV event {i}: block_hashes must be an array")
    if all(type(h) is int for h in hs):  # vLLM's default: the fast path
        return tuple(hs)
    out: list[int] = []
    for x in hs:
        h = _hash(i, x)
        if h is None:
            raise ValueError(f"KV event {i}: a block hash is nil")
        out.append(h)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class KVEventsTarget:
    """Where one pod publishes."""

    pod: str
    endpoint: str  # tcp://ip:port
    replay_endpoint: str | None
    topic: str = ""
    hash_algo: str = "sha256"  # how the engine names blocks (ModelServer kvEvents)
    hash_seed: str = "0"


def _host(address: str) -> str:
    """The host of ``ip:port`` (an IPv6 ``[addr]:port`` keeps its brackets, as ZMQ wants)."""
    return address.rsplit(":", 1)[0]


def targets_of(servers: Iterable[Any]) -> list[KVEventsTarget]:
    """The pods to subscribe to: ready pods of every ModelServer view whose spec sets kvEvents.

    ``servers`` are datastore ``ServerView``s (``.spec.kv_events``, ``.pods``).
    """
    out: dict[str, KVEventsTarget] = {}
    for view in servers:
        cfg = getattr(view.spec, "kv_events", None)
        if cfg is None:
            continue
        for pod in view.pods:
            if not pod.ready or pod.name in out:
                continue
            host = _host(pod.address)
            replay = f"tcp://{host}:{cfg.replay_port}" if cfg.replay_port else None
            out[pod.name] = KVEventsTarget(
                pod.name,
                f"tcp://{host}:{cfg.port}",
                replay,
                cfg.topic,
                cfg.hash_algo,
                cfg.hash_seed,
            )
    return list(out.values())


@dataclass(slots=True)
class _Feed:
    target: KVEventsTarget
    task: asyncio.Task[None] | None = None
    next_seq: int | None = None
    last_ts: float | None = None
    batches: int = 0
    resyncs: dict[str, int] = field(default_factory=dict)


class KVEventsSubscriber:
    """Keeps one subscription per target pod and feeds the index (asyncio, pyzmq)."""

    def __init__(
        self,
        index: KVBlockIndex,
        targets: Callable[[], list[KVEventsTarget]],
        *,
        registry: CollectorRegistry | None = None,
        interval: float = 1.0,
        replay_timeout: float = 2.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self._targets = targets
        self.interval = interval
        self.replay_timeout = replay_timeout
        self._wall = wall_clock
        self._ctx = zmq.asyncio.Context()
        self.feeds: dict[str, _Feed] = {}
        self._task: asyncio.Task[None] | None = None
        registry = registry if registry is not None else CollectorRegistry()
        self.m_blocks = Gauge(
            "matrixinfer_kv_index_blocks", "Block hashes in the KV-block index", registry=registry
        )
        self.m_lag = Gauge(
            "matrixinfer_kv_events_lag_seconds",
            "Wall time since the last applied KV event batch was produced",
            ["pod"],
            registry=registry,
        )
        self.m_batches = Counter(
            "matrixinfer_kv_events_batches",
            "KV event batches applied to the index",
            ["pod"],
            registry=registry,
        )
        self.m_resyncs = Counter(
            "matrixinfer_kv_events_resyncs",
            "Resyncs of a pod's KV events (reason: history, gap, restart, reconnect, lost)",
            ["pod", "reason"],
            registry=registry,
        )

    # ---- lifecycle
    async def start(self) -> None:
        self.sync()
        self._task = asyncio.create_task(self._run(), name="kv-events-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for name in list(self.feeds):
            await self._unsubscribe(name)
        self._ctx.destroy(linger=0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sync()
            except Exception:
                log.exception("KV events: refreshing the subscriptions failed")

    def sync(self) -> None:
        """Subscribe to new target pods; drop pods that are no longer targets."""
        wanted = {t.pod: t for t in self._targets()}
        for name, feed in list(self.feeds.items()):
            if wanted.get(name) != feed.target:
                self._forget(name)
        for name, target in wanted.items():
            if name not in self.feeds:
                self.index.register(name, target.hash_algo, target.hash_seed)
                feed = self.feeds[name] = _Feed(target)
                feed.task = asyncio.create_task(self._follow(feed), name=f"kv-events-{name}")
        self.m_blocks.set(len(self.index))

    def _forget(self, name: str) -> None:
        feed = self.feeds.pop(name, None)
        if feed is not None and feed.task is not None:
            feed.task.cancel()
        self.index.forget_pod(name)
        with contextlib.suppress(KeyError):
            self.m_lag.remove(name)

    async def _unsubscribe(self, name: str) -> None:
        feed = self.feeds.get(name)
        task = feed.task if feed is not None else None
        self._forget(name)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def resubscribe(self, name: str) -> None:
        """Close and reopen one pod's SUB socket, keeping its sequence position (a reconnect)."""
        feed = self.feeds.get(name)
        if feed is None:
            return
        if feed.task is not None:
            feed.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed.task
        feed.task = asyncio.create_task(self._follow(feed), name=f"kv-events-{name}")

    # ---- one pod
    async def _follow(self, feed: _Feed) -> None:
        """Receive one pod's stream until cancelled; after an error, start over (resync)."""
        while True:
            try:
                await self._stream(feed)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("KV events: subscription to pod %s failed", feed.target.pod)
            self.index.clear_pod(feed.target.pod)
            feed.next_seq = None  # the next message replays the history again
            await asyncio.sleep(self.interval)

    async def _stream(self, feed: _Feed) -> None:
        t = feed.target
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, t.topic.encode())
        # connection events: after a reconnect the engine may have restarted (its sequence
        # starting again below or above ours): resync from its replay history
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED)
        sub.connect(t.endpoint)
        log.info("KV events: subscribed to pod %s at %s", t.pod, t.endpoint)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        connected = False
        try:
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    parse_monitor_message(await monitor.recv_multipart())
                    if connected and feed.next_seq is not None:
                        log.info("KV events: pod %s reconnected; resyncing", t.pod)
                        self.m_resyncs.labels(t.pod, "reconnect").inc()
                        feed.resyncs["reconnect"] = feed.resyncs.get("reconnect", 0) + 1
                        self.index.clear_pod(t.pod)
                        feed.next_seq = None
                    connected = True
                if sub not in ready:
                    continue
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    log.warning("KV events from pod %s: %d frames, expected 3", t.pod, len(frames))
                    continue
                _, seq_bytes, payload = frames
                await self._receive(feed, int.from_bytes(seq_bytes, "big"), payload)
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def _receive(self, feed: _Feed, seq: int, payload: bytes) -> None:
        expected = feed.next_seq
        pod = feed.target.pod
        if expected is None:
            if seq > 0:
                await self._resync(feed, 0, seq, "history")
        elif seq > expected:
            await self._resync(feed, expected, seq, "gap")
        elif seq < expected:
            self.index.clear_pod(pod)
            await self._resync(feed, 0, seq, "restart")
        self._apply(feed, seq, payload)

    async def _resync(self, feed: _Feed, start: int, upto: int, reason: str) -> None:
        """Apply batches ``start .. upto-1`` from the replay socket; drop the pod if lost."""
        pod = feed.target.pod
        feed.resyncs[reason] = feed.resyncs.get(reason, 0) + 1
        self.m_resyncs.labels(pod, reason).inc()
        batches = await self._replay(feed.target, start) if feed.target.replay_endpoint else None
        got = [(s, p) for s, p in batches or () if start <= s < upto]
        complete = [s for s, _ in got] == list(range(start, upto))
        if not complete:
            if reason != "history" or start > 0:
                log.warning(
                    "KV events: pod %s lost batches %d..%d (%s); its blocks are dropped",
                    pod, start, upto - 1, "no replay socket" if batches is None else "not replayed",
                )  # fmt: skip
                self.m_resyncs.labels(pod, "lost").inc()
            self.index.clear_pod(pod)
            # only what follows the last lost batch is safe: an earlier store may have been
            # undone by a lost removal
            missing = set(range(start, upto)).difference(s for s, _ in got)
            last_lost = max(missing)
            got = [(s, p) for s, p in got if s > last_lost]
        for s, p in got:
            self._apply(feed, s, p)

    async def _replay(self, target: KVEventsTarget, start: int) -> list[tuple[int, bytes]] | None:
        assert target.replay_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(target.replay_endpoint)
        out: list[tuple[int, bytes]] = []
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), self.replay_timeout)
                if len(frames) != 3:
                    continue
                _, seq, payload = frames
                if seq == END_SEQ:
                    return out
                out.append((int.from_bytes(seq, "big"), payload))
        except TimeoutError:
            log.warning("KV events: replay from pod %s timed out", target.pod)
            return None
        finally:
            dealer.close(linger=0)

    def _apply(self, feed: _Feed, seq: int, payload: bytes) -> None:
        pod = feed.target.pod
        feed.next_seq = seq + 1
        try:
            ts, events = decode_batch(payload)
        except ValueError as exc:
            log.warning(
                "KV events from pod %s, batch %d: %s; its blocks are dropped", pod, seq, exc
            )
            self.index.clear_pod(pod)
            return
        self.index.apply(pod, events)
        feed.last_ts = ts
        feed.batches += 1
        self.m_batches.labels(pod).inc()
        self.m_lag.labels(pod).set(max(0.0, self._wall() - ts))
        self.m_blocks.set(len(self.index))

    # ---- introspection
    def state(self) -> dict[str, Any]:
        now = self._wall()
        return {
            "blocks": len(self.index),
            "capacity": self.index.capacity,
            "evicted": self.index.evicted,
            "pods": {
                name: {
                    "endpoint": f.target.endpoint,
                    "replayEndpoint": f.target.replay_endpoint,
                    "nextSeq": f.next_seq,
                    "batches": f.batches,
                    "blocks": len(self.index.blocks_of(name)),
                    "lagSeconds": None if f.last_ts is None else round(now - f.last_ts, 3),
                    "resyncs": dict(f.resyncs),
                }
                for name, f in self.feeds.items()
            },
        }
