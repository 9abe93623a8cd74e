"""The ZMQ side of the simulator's KV events: PUB socket, replay ROUTER socket, replay buffer.

Message shapes are described in :mod:`sim.kvevents`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import zmq

from sim.kvevents import END_SEQ, KVEvent, KVEventsConfig, KVEventsFormat, encode_batch

__all__ = ["ZmqEventPublisher"]

log = logging.getLogger("sim.kvevents")


class ZmqEventPublisher:
    """PUB socket + replay ROUTER socket (served by a daemon thread) + the replay buffer.

    :meth:`publish` is called from the engine loop: a non-blocking send (a subscriber that cannot
    keep up loses messages at the high-water mark and recovers them through replay).
    """

    def __init__(
        self, cfg: KVEventsConfig, bind_host: str | None = None, fmt: KVEventsFormat = "array"
    ) -> None:
        self.cfg = cfg
        self.fmt: KVEventsFormat = fmt
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
        payload = encode_batch(time.time() if ts is None else ts, events, fmt=self.fmt)
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
