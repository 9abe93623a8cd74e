"""KV-cache events, published the way vLLM publishes them.

Configured by ``--kv-events-config`` with vLLM's JSON shape (:class:`KVEventsConfig`). Events
(vLLM's ``vllm/distributed/kv_events.py`` msgspec structs, ``array_like=True`` and ``tag=True``:
each is a msgpack array whose first element is the class name):

- ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``
- ``["BlockRemoved", block_hashes, medium]``
- ``["AllBlocksCleared"]``

One engine step's events form a ``KVEventBatch`` ``[ts, events]`` (``data_parallel_rank`` is
omitted when it is None, as msgspec's ``omit_defaults`` does). Each batch is one ZMQ multipart
message on a PUB socket: ``[topic, seq, payload]`` with ``seq`` an 8-byte big-endian counter from
0. A ROUTER *replay* socket answers ``[identity, b"", start_seq]`` with every buffered batch from
``start_seq`` on, each as ``[identity, b"", seq, payload]``, then ``[identity, b"", END_SEQ, b""]``
(``END_SEQ`` = -1 as 8 signed big-endian bytes). The last ``buffer_steps`` batches are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import msgpack
import zmq
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "END_SEQ",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventsConfig",
    "ZmqEventPublisher",
    "encode_batch",
]

log = logging.getLogger("sim.kvevents")

END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVEventsConfig(BaseModel):
    """vLLM's ``--kv-events-config`` (the fields the simulator honours; others are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enable_kv_cache_events: bool = Field(False, description="publish KV events")
    publisher: Literal["null", "zmq"] = Field("null", description="'zmq' to publish")
    endpoint: str = Field("tcp://*:5557", description="PUB socket address (bind)")
    replay_endpoint: str | None = Field(None, description="ROUTER replay address (bind)")
    buffer_steps: int = Field(10_000, ge=1, description="batches kept for replay")
    hwm: int = Field(100_000, ge=0, description="PUB send high-water mark")
    max_queue_size: int = Field(100_000, ge=1, description="accepted for vLLM compatibility")
    topic: str = Field("", description="first frame of every message")

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = "GPU"

    def to_list(self) -> list[object]:
        return [
            "BlockStored",
            self.block_hashes,
            self.parent_block_hash,
            self.token_ids,
            self.block_size,
            self.lora_id,
            self.medium,
        ]


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = "GPU"

    def to_list(self) -> list[object]:
        return ["BlockRemoved", self.block_hashes, self.medium]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    def to_list(self) -> list[object]:
        return ["AllBlocksCleared"]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(ts: float, events: list[KVEvent], data_parallel_rank: int | None = None) -> bytes:
    """A ``KVEventBatch`` as msgpack bytes."""
    body: list[object] = [ts, [e.to_list() for e in events]]
    if data_parallel_rank is not None:
        body.append(data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)


class ZmqEventPublisher:
    """PUB socket + replay ROUTER socket (served by a daemon thread) + the replay buffer.

    :meth:`publish` is called from the engine loop: a non-blocking send (a subscriber that cannot
    keep up loses messages at the high-water mark and recovers them through replay).
    """

    def __init__(self, cfg: KVEventsConfig, bind_host: str | None = None) -> None:
        self.cfg = cfg
        self.bind_host = bind_host
        self.topic = cfg.topic.encode()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._bind(self._pub, cfg.endpoint, "endpoint")
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.buffer_steps)
        self._lock = threading.Lock()
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._replay: zmq.Socket[bytes] | None = None
        if cfg.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._bind(self._replay, cfg.replay_endpoint, "replay_endpoint")
            self._thread = threading.Thread(
                target=self._serve_replay, daemon=True, name="kv-replay"
            )
            self._thread.start()

    def _bind(self, sock: zmq.Socket[bytes], address: str, field: str) -> None:
        if self.bind_host and address.startswith("tcp://*:"):
            address = f"tcp://{self.bind_host}:{address[len('tcp://*:') :]}"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise OSError(f"--kv-events-config {field} {address!r}: cannot bind: {exc}") from None

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: list[KVEvent], ts: float | None = None) -> int:
        """Send one batch; returns its sequence number."""
        payload = encode_batch(time.time() if ts is None else ts, events)
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("KV events: PUB queue full, batch %d only reachable through replay", seq)
        return seq

    def _serve_replay(self) -> None:
        sock = self._replay
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not dict(poller.poll(100)):
                    continue
                frames = sock.recv_multipart()
            except zmq.ZMQError:
                return
            if len(frames) != 3:
                log.warning("KV events replay: expected 3 frames, got %d", len(frames))
                continue
            ident, _, start = frames
            start_seq = int.from_bytes(start, "big")
            with self._lock:
                batches = [(s, p) for s, p in self._buffer if s >= start_seq]
            try:
                for seq, payload in batches:
                    sock.send_multipart((ident, b"", seq.to_bytes(8, "big"), payload))
                sock.send_multipart((ident, b"", END_SEQ, b""))
            except zmq.ZMQError:
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._pub.close(0)
        if self._replay is not None:
            self._replay.close(0)
        self._ctx.term()
