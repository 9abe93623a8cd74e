"""The simulator's KV events, decoded the way a vLLM subscriber decodes them.

The decoder below is written from vLLM's structs (``vllm/distributed/kv_events.py``): msgspec
``array_like`` structs, events tagged with their class name as the first array element, fields
in declaration order. It does not use the simulator's encoder.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import cbor2
import msgpack
import pytest
import zmq

from matrixinfer.process import free_port
from sim.blockhash import external, hash_fn, root_hash
from sim.config import EngineConfig
from sim.engine import Engine, Request
from sim.kvevents import BlockStored as SimBlockStored
from sim.kvevents import KVEventsConfig
from sim.kvpublisher import ZmqEventPublisher
from sim.tokenizer import Tokenizer

# ----------------------------------------------------------------- a vLLM-shaped decoder


@dataclass
class BlockStored:  # vLLM: block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


@dataclass
class BlockRemoved:  # vLLM: block_hashes, medium
    block_hashes: list[int]
    medium: str | None = None


@dataclass
class AllBlocksCleared:
    pass


@dataclass
class KVEventBatch:  # vLLM EventBatch: ts, events, data_parallel_rank
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


TAGS = {c.__name__: c for c in (BlockStored, BlockRemoved, AllBlocksCleared)}


def decode(payload: bytes) -> KVEventBatch:
    raw = msgpack.unpackb(payload, raw=False)
    batch = KVEventBatch(*raw)
    batch.events = [TAGS[e[0]](*e[1:]) for e in batch.events]
    return batch


END_SEQ = (-1).to_bytes(8, "big", signed=True)

# ----------------------------------------------------------------- hashes


def test_sha256_cbor_hashes_canonical_cbor() -> None:
    # (b"\x01\x02", (1, 500, 70000), None) -> array(3), bytes(2), array(3) of minimal ints, null
    fn = hash_fn("sha256_cbor")
    assert fn((b"\x01\x02", (1, 500, 70000), None)) == hashlib.sha256(bytes.fromhex(
        "83" "420102" "83" "01" "1901f4" "1a00011170" "f6"
    )).digest()  # fmt: skip
    assert fn(("a", -1)) == hashlib.sha256(bytes.fromhex("82" "6161" "20")).digest()  # fmt: skip


def test_block_hashes_follow_vllms_recipe() -> None:
    cfg = EngineConfig(
        block_size=4, num_gpu_blocks=64, max_model_len=64, prefix_caching_hash_algo="sha256",
        hash_seed="7",
    )  # fmt: skip
    eng = Engine(cfg, record_events=True)
    prompt = list(range(1000, 1010))
    eng.add(Request("r1", prompt, [5, 6], 0.0))
    eng.run_until_idle()
    stored = [e for e in eng.kv.take_events() if type(e).__name__ == "BlockStored"]
    root = hashlib.sha256(pickle.dumps("7", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    h1 = hashlib.sha256(pickle.dumps((root, (1000, 1001, 1002, 1003), None), protocol=5)).digest()
    h2 = hashlib.sha256(pickle.dumps((h1, (1004, 1005, 1006, 1007), None), protocol=5)).digest()
    hashes = [h for e in stored for h in e.block_hashes]
    assert hashes[:2] == [int.from_bytes(h1, "big") & (2**64 - 1), external(h2)]
    assert stored[0].parent_block_hash is None
    assert stored[0].token_ids[:4] == [1000, 1001, 1002, 1003]


def test_lora_is_an_extra_key_and_cbor_algo() -> None:
    fn = hash_fn("sha256_cbor")
    root = root_hash("sha256_cbor", "0")
    assert root == hashlib.sha256(cbor2.dumps("0", canonical=True)).digest()  # as vLLM
    eng = Engine(EngineConfig(block_size=2, num_gpu_blocks=16, max_model_len=32,
                              prefix_caching_hash_algo="sha256_cbor", hash_seed="0"),
                 record_events=True)  # fmt: skip
    eng.add(Request("r", [1, 2, 3], [4], 0.0, lora="ad"))
    eng.run_until_idle()
    (ev,) = eng.kv.take_events()
    assert ev.block_hashes[0] == external(fn((root, (1, 2), ("ad",))))
    assert ev.lora_id == 1


def test_eviction_and_reset_are_published() -> None:
    eng = Engine(EngineConfig(block_size=2, num_gpu_blocks=4, max_model_len=8), record_events=True)
    eng.add(Request("a", [1, 2, 3, 4, 5], [6], 0.0))
    eng.run_until_idle()
    first = eng.kv.take_events()
    stored_a = {h for e in first for h in getattr(e, "block_hashes", [])}
    assert stored_a and all(type(e).__name__ == "BlockStored" for e in first)
    eng.add(Request("b", [9, 8, 7, 6, 5, 4, 3], [2], 1.0))  # needs every block: evicts a's
    eng.run_until_idle(1.0)
    events = eng.kv.take_events()
    removed = {h for e in events if type(e).__name__ == "BlockRemoved" for h in e.block_hashes}
    assert removed == stored_a
    assert eng.kv.reset_prefix_cache()
    assert [type(e).__name__ for e in eng.kv.take_events()] == ["AllBlocksCleared"]
    assert eng.kv.pool.cached == {}


# ----------------------------------------------------------------- the ZMQ publisher


def _sub(ctx: zmq.Context[Any], endpoint: str, topic: bytes = b"") -> zmq.Socket[bytes]:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(endpoint)
    return sub


def _replay(ctx: zmq.Context[Any], endpoint: str, start: int) -> list[tuple[int, bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    while True:
        _, seq, payload = dealer.recv_multipart()
        if seq == END_SEQ:
            dealer.close(0)
            return out
        out.append((int.from_bytes(seq, "big"), payload))


def test_publisher_sequence_and_replay() -> None:
    port, rport = free_port("127.0.0.1"), free_port("127.0.0.1")
    cfg = KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        topic="kv",
        endpoint=f"tcp://*:{port}",
        replay_endpoint=f"tcp://*:{rport}",
    )
    pub = ZmqEventPublisher(cfg, bind_host="127.0.0.1")
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sub = _sub(ctx, f"tcp://127.0.0.1:{port}")
        from sim.kvevents import BlockRemoved as SimRemoved

        # PUB drops messages until the subscription has propagated: publish until one arrives
        deadline = time.monotonic() + 5
        sub.setsockopt(zmq.RCVTIMEO, 50)
        first = None
        while first is None and time.monotonic() < deadline:
            pub.publish([SimRemoved([1])])
            try:
                first = sub.recv_multipart()
            except zmq.Again:
                continue
        assert first is not None
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        topic, seq0, _ = first
        assert topic == b"kv"
        for i in range(3):
            pub.publish([SimRemoved([100 + i])], ts=float(i))
        got = [sub.recv_multipart() for _ in range(3)]
        seqs = [int.from_bytes(s, "big") for _, s, _ in got]
        start = int.from_bytes(seq0, "big")
        assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2] and seqs[0] > start
        assert decode(got[1][2]) == KVEventBatch(1.0, [BlockRemoved([101], "GPU")])
        # a subscriber that missed everything from seqs[0] gets it back from the replay socket
        replayed = _replay(ctx, f"tcp://127.0.0.1:{rport}", seqs[0])
        assert [s for s, _ in replayed] == seqs
        assert [decode(p).events[0].block_hashes for _, p in replayed] == [[100], [101], [102]]
        sub.close(0)
    finally:
        pub.close()
        ctx.term()


def test_simulator_process_publishes(sim_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    port, rport = free_port("127.0.0.1"), free_port("127.0.0.1")
    config = json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{port}",
            "replay_endpoint": f"tcp://*:{rport}",
        }
    )
    with sim_factory("--time-scale", "0.01", "--block-size", "4",
                     "--prefix-caching-hash-algo", "sha256_cbor",
                     "--kv-events-config", config) as pod:  # fmt: skip
        body = json.dumps({"model": "demo-model", "prompt": "one two three four five six seven "
                           "eight nine ten", "max_tokens": 2}).encode()  # fmt: skip
        req = urllib.request.Request(f"{pod.url}/v1/completions", body,
                                     {"content-type": "application/json"})  # fmt: skip
        urllib.request.urlopen(req, timeout=10).read()
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            batches = _replay(ctx, f"tcp://127.0.0.1:{rport}", 0)
        finally:
            ctx.destroy(0)
    events = [e for _, p in batches for e in decode(p).events]
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored and stored[0].parent_block_hash is None and stored[0].block_size == 4
    ids = Tokenizer().encode("one two three four five six seven eight nine ten")
    fn, root = hash_fn("sha256_cbor"), root_hash("sha256_cbor", "0")
    assert stored[0].block_hashes[0] == external(fn((root, tuple(ids[:4]), None)))
    assert stored[0].token_ids[:4] == ids[:4]


def test_bad_kv_events_config_is_named() -> None:
    from sim.cli import serve_parser

    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--kv-events-config", '{"publisher": "kafka"}'])


# ----------------------------------------------------------------- the map form, whole digests

# vLLM 0.31's tagged-map events: the keys a real engine sends (captured streams), in that order
MAP_KEYS = {
    "BlockStored": ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size",
                    "lora_id", "medium", "lora_name", "extra_keys", "group_idx",
                    "kv_cache_spec_kind"],
    "BlockRemoved": ["type", "block_hashes", "medium", "group_idx"],
    "AllBlocksCleared": ["type"],
}  # fmt: skip


def decode_map(payload: bytes) -> KVEventBatch:
    """A decoder written from vLLM 0.31's map form: ``[ts, events, dp_rank]``, each event a map
    tagged by ``type`` (the keys above, nothing else)."""
    ts, events, rank = msgpack.unpackb(payload, raw=False)
    out: list[Any] = []
    for e in events:
        assert list(e) == MAP_KEYS[e["type"]], e
        fields = {k: v for k, v in e.items() if k in TAGS[e["type"]].__dataclass_fields__}
        out.append(TAGS[e["type"]](**fields))
    return KVEventBatch(ts, out, rank)


def test_map_form_round_trips_every_event_with_whole_digests() -> None:
    from sim.kvevents import encode_batch

    fn, root = hash_fn("sha256_cbor"), root_hash("sha256_cbor", "7")
    cfg = EngineConfig(block_size=2, num_gpu_blocks=4, max_model_len=8, hash_seed="7",
                       prefix_caching_hash_algo="sha256_cbor",
                       kv_events_int_block_hashes=False)  # fmt: skip
    eng = Engine(cfg, record_events=True)
    eng.add(Request("a", [1, 2, 3, 4, 5], [6], 0.0, lora="ad"))
    eng.run_until_idle()
    stored = decode_map(encode_batch(1.5, eng.kv.take_events(), fmt="map"))
    assert stored.ts == 1.5 and stored.data_parallel_rank == 0
    h1 = fn((root, (1, 2), ("ad",)))
    h2 = fn((h1, (3, 4), ("ad",)))
    (ev,) = stored.events
    assert ev == BlockStored([h1, h2], None, [1, 2, 3, 4], 2, 1, "GPU")
    assert all(isinstance(h, bytes) and len(h) == 32 for h in ev.block_hashes)
    eng.add(Request("b", [9, 8, 7, 6, 5, 4, 3], [2], 1.0))  # needs every block: evicts a's
    eng.run_until_idle(1.0)
    events = decode_map(encode_batch(2.0, eng.kv.take_events(), fmt="map")).events
    removed = {h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert removed == {h1, h2}
    assert eng.kv.reset_prefix_cache()
    assert decode_map(encode_batch(3.0, eng.kv.take_events(), fmt="map")).events == [
        AllBlocksCleared()
    ]
    # the extra keys per block are those the blocks were hashed with: the LoRA name
    sim_event = SimBlockStored([h1, h2], None, [1, 2, 3, 4], 2, 1, "GPU", "ad")
    (first,) = msgpack.unpackb(encode_batch(0.0, [sim_event], fmt="map"))[1]
    assert first["extra_keys"] == [["ad"], ["ad"]] and first["lora_name"] == "ad"


def test_int_block_hashes_are_the_digests_low_64_bits_by_default() -> None:
    cfg = EngineConfig(block_size=2, num_gpu_blocks=4, max_model_len=8, hash_seed="7",
                       prefix_caching_hash_algo="sha256_cbor")  # fmt: skip
    eng = Engine(cfg, record_events=True)
    eng.add(Request("a", [1, 2, 3], [6], 0.0))
    eng.run_until_idle()
    (ev,) = eng.kv.take_events()
    h1 = hash_fn("sha256_cbor")((root_hash("sha256_cbor", "7"), (1, 2), None))
    assert ev.block_hashes == [int.from_bytes(h1, "big") & (2**64 - 1)]


def test_simulator_process_publishes_maps_with_whole_digests(
    sim_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "0")
    port, rport = free_port("127.0.0.1"), free_port("127.0.0.1")
    config = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"tcp://*:{port}",
                         "replay_endpoint": f"tcp://*:{rport}"})  # fmt: skip
    with sim_factory("--time-scale", "0.01", "--block-size", "4",
                     "--prefix-caching-hash-algo", "sha256_cbor",
                     "--kv-events-config", config, "--kv-events-format", "map") as pod:  # fmt: skip
        body = json.dumps({"model": "demo-model", "prompt": "one two three four five six seven "
                           "eight nine ten", "max_tokens": 2}).encode()  # fmt: skip
        req = urllib.request.Request(f"{pod.url}/v1/completions", body,
                                     {"content-type": "application/json"})  # fmt: skip
        urllib.request.urlopen(req, timeout=10).read()
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            batches = _replay(ctx, f"tcp://127.0.0.1:{rport}", 0)
        finally:
            ctx.destroy(0)
    events = [e for _, p in batches for e in decode_map(p).events]
    stored = [e for e in events if isinstance(e, BlockStored)]
    ids = Tokenizer().encode("one two three four five six seven eight nine ten")
    fn, root = hash_fn("sha256_cbor"), root_hash("sha256_cbor", "0")
    assert stored[0].block_hashes[0] == fn((root, tuple(ids[:4]), None))


def test_bad_int_block_hashes_switch_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from sim.cli import build_config, serve_parser

    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "yes")
    with pytest.raises(SystemExit, match="VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"):
        build_config(serve_parser().parse_args([]))
