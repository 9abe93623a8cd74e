"""extproc.kvevents: subscribing to a real ZMQ publisher (the simulator's), resync via replay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
from prometheus_client import CollectorRegistry

from crds.networking import KVEvents
from extproc.kvevents import KVEventsSubscriber, KVEventsTarget, decode_batch, targets_of
from extproc.kvindex import AllBlocksCleared, BlockRemoved, BlockStored, KVBlockIndex
from fleet.pods import Pod
from matrixinfer.process import free_port
from sim import kvevents as simkv
from sim.kvpublisher import ZmqEventPublisher


async def until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Engine:
    """A publisher plus the truth: which blocks the engine holds."""

    def __init__(self, replay: bool = True) -> None:
        self.port = free_port("127.0.0.1")
        self.rport = free_port("127.0.0.1") if replay else None
        cfg = simkv.KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=f"tcp://127.0.0.1:{self.port}",
            replay_endpoint=f"tcp://127.0.0.1:{self.rport}" if replay else None,
        )
        self.pub = ZmqEventPublisher(cfg)
        self.blocks: set[int] = set()
        self.drop_live = False
        send = self.pub._pub.send_multipart

        def maybe_send(frames: Any, flags: int = 0) -> None:
            if not self.drop_live:  # a dropped message: as at the PUB high-water mark
                send(frames, flags)

        self.pub._pub.send_multipart = maybe_send  # type: ignore[method-assign]

    def target(self, pod: str = "pod-a") -> KVEventsTarget:
        replay = f"tcp://127.0.0.1:{self.rport}" if self.rport else None
        return KVEventsTarget(pod, f"tcp://127.0.0.1:{self.port}", replay)

    def store(self, *hashes: int) -> None:
        self.blocks.update(hashes)
        self.pub.publish([simkv.BlockStored(list(hashes), None, [], 16, None)])

    def remove(self, *hashes: int) -> None:
        self.blocks.difference_update(hashes)
        self.pub.publish([simkv.BlockRemoved(list(hashes))])

    def clear(self) -> None:
        self.blocks.clear()
        self.pub.publish([simkv.AllBlocksCleared()])


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    e = Engine()
    yield e
    e.pub.close()


async def subscribed(
    e: Engine, index: KVBlockIndex, targets: list[KVEventsTarget] | None = None
) -> KVEventsSubscriber:
    tl = [e.target()] if targets is None else targets
    sub = KVEventsSubscriber(index, lambda: tl, registry=CollectorRegistry(), interval=0.05)
    await sub.start()
    return sub


_fresh = iter(range(10_000, 1 << 62))


async def warm_up(e: Engine, index: KVBlockIndex, pod: str = "pod-a") -> None:
    """PUB drops messages until the subscription has propagated: store until one lands."""
    h = next(_fresh)
    deadline = time.monotonic() + 5
    while not index.holds(pod, h):
        assert time.monotonic() < deadline, "no KV event reached the subscriber"
        h = next(_fresh)
        e.store(h)
        await asyncio.sleep(0.02)


def test_decode_batch_reads_vllm_batches() -> None:
    payload = simkv.encode_batch(
        1.5, [simkv.BlockStored([1, 2], None, [5] * 32, 16, None), simkv.BlockRemoved([1])]
    )
    assert decode_batch(payload) == (1.5, [BlockStored((1, 2), None, 16), BlockRemoved((1,))])
    with pytest.raises(ValueError, match="unknown tag 'Nope'"):
        decode_batch(simkv.encode_batch(0.0, []).replace(b"\x90", b"\x91\x91\xa4Nope"))
    with pytest.raises(ValueError, match="array"):
        decode_batch(b"\x01")


def test_decode_batch_reads_vllms_map_form_and_whole_digests() -> None:
    # vLLM 0.31 sends tagged maps; with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 whole digests,
    # which name the same blocks as the integer form (their low 64 bits)
    d1, d2 = bytes(range(32)), bytes(range(32, 64))
    low = [int.from_bytes(d[-8:], "big") for d in (d1, d2)]
    events = [
        simkv.BlockStored([d1, d2], None, [5] * 32, 16, None),
        simkv.BlockStored([7], d2, [5] * 16, 16, None),
        simkv.BlockRemoved([d1]),
        simkv.AllBlocksCleared(),
    ]
    expected = [
        BlockStored(tuple(low), None, 16),
        BlockStored((7,), low[1], 16),
        BlockRemoved((low[0],)),
        AllBlocksCleared(),
    ]
    assert decode_batch(simkv.encode_batch(2.5, events, fmt="map")) == (2.5, expected)
    assert decode_batch(simkv.encode_batch(2.5, events, fmt="array")) == (2.5, expected)
    with pytest.raises(ValueError, match="unknown type 'Nope'"):
        decode_batch(msgpack.packb([0.0, [{"type": "Nope"}], 0]))
    with pytest.raises(ValueError, match="no block_hashes"):
        decode_batch(msgpack.packb([0.0, [{"type": "BlockRemoved"}], 0]))
    with pytest.raises(ValueError, match="integer or bytes"):
        decode_batch(msgpack.packb([0.0, [{"type": "BlockRemoved", "block_hashes": ["x"]}], 0]))


async def test_history_is_replayed_on_subscribe(engine: Engine) -> None:
    engine.store(1, 2, 3)
    engine.remove(2)
    index = KVBlockIndex()
    sub = await subscribed(engine, index)
    try:
        await warm_up(engine, index)
        assert {1, 3} <= index.blocks_of("pod-a") and not index.holds("pod-a", 2)
        assert index.blocks_of("pod-a") == engine.blocks
        assert sub.feeds["pod-a"].resyncs == {"history": 1}
    finally:
        await sub.stop()


async def test_dropped_messages_are_replayed(engine: Engine) -> None:
    index = KVBlockIndex()
    sub = await subscribed(engine, index)
    try:
        await warm_up(engine, index)
        engine.store(1, 2, 3)
        await until(lambda: index.holds("pod-a", 3))
        engine.drop_live = True  # these never reach the subscriber live
        engine.remove(1)
        engine.store(4)
        engine.clear()
        engine.store(5)
        engine.drop_live = False
        engine.store(6)
        await until(lambda: index.holds("pod-a", 6))
        assert index.blocks_of("pod-a") == engine.blocks == {5, 6}
        assert sub.feeds["pod-a"].resyncs.get("gap") == 1
        state = sub.state()["pods"]["pod-a"]
        assert state["blocks"] == 2 and state["lagSeconds"] is not None
    finally:
        await sub.stop()


async def test_reconnect_after_a_dropped_subscription(engine: Engine) -> None:
    index = KVBlockIndex()
    sub = await subscribed(engine, index)
    try:
        await warm_up(engine, index)
        engine.store(1, 2)
        await until(lambda: index.holds("pod-a", 2))
        task = sub.feeds["pod-a"].task
        assert task is not None
        task.cancel()  # the connection is gone: nothing is received meanwhile
        await asyncio.gather(task, return_exceptions=True)
        engine.remove(1, 2)
        engine.store(7)
        await sub.resubscribe("pod-a")
        await warm_up(engine, index)
        assert index.blocks_of("pod-a") == engine.blocks
        assert not index.holds("pod-a", 1)
    finally:
        await sub.stop()


async def test_without_replay_a_gap_drops_the_pod() -> None:
    e = Engine(replay=False)
    index = KVBlockIndex()
    sub = await subscribed(e, index)
    try:
        await warm_up(e, index)
        e.store(1)
        await until(lambda: index.holds("pod-a", 1))
        e.drop_live = True
        e.remove(1)
        e.drop_live = False
        e.store(2)
        await until(lambda: index.holds("pod-a", 2))
        assert not index.holds("pod-a", 1)  # under-reports, never over-reports
    finally:
        await sub.stop()
        e.pub.close()


async def test_a_pod_that_goes_away_drops_out(engine: Engine) -> None:
    index = KVBlockIndex()
    targets = [engine.target()]
    sub = await subscribed(engine, index, targets)
    try:
        await warm_up(engine, index)
        assert index.naming["pod-a"] == ("sha256", "0")
        targets.clear()
        await until(lambda: "pod-a" not in sub.feeds)
        assert index.blocks_of("pod-a") == frozenset() and len(index) == 0
        assert "pod-a" not in index.naming
    finally:
        await sub.stop()


def test_targets_are_the_ready_pods_of_servers_with_kv_events() -> None:
    ready = Pod("a", "10.0.0.1:8000")
    down = Pod("b", "10.0.0.2:8000", ready=False)
    events = KVEvents(port=5557, replay_port=5558, hash_seed="9")
    views = [
        SimpleNamespace(spec=SimpleNamespace(kv_events=events), pods=(ready, down)),
        SimpleNamespace(spec=SimpleNamespace(kv_events=None), pods=(Pod("c", "10.0.0.3:8000"),)),
    ]
    assert targets_of(views) == [
        KVEventsTarget("a", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558", "", "sha256", "9")
    ]


async def test_an_engine_restart_resets_the_pods_blocks() -> None:
    e = Engine()
    index = KVBlockIndex()
    sub = await subscribed(e, index)
    try:
        await warm_up(e, index)
        e.store(1, 2, 3)
        await until(lambda: index.holds("pod-a", 3))
        e.pub.close()  # the engine restarts on the same ports: its sequence starts again at 0
        cfg = e.pub.cfg
        e.pub = ZmqEventPublisher(cfg)
        e.blocks = set()
        await warm_up(e, index)
        assert index.blocks_of("pod-a") == e.blocks and not index.holds("pod-a", 1)
        resyncs = sub.feeds["pod-a"].resyncs
        assert resyncs.get("reconnect", 0) + resyncs.get("restart", 0) >= 1
    finally:
        await sub.stop()
        e.pub.close()
