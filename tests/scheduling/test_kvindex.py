"""extproc.kvindex: the KV-block index against a reference model, and the prompt hashes."""

from __future__ import annotations

import hashlib
import pickle

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.kvindex import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVBlockIndex,
    PromptHasher,
)

PODS = ["p0", "p1", "p2"]
HASHES = st.integers(0, 12)

ops = st.one_of(
    st.tuples(st.just("stored"), st.sampled_from(PODS), st.lists(HASHES, max_size=5)),
    st.tuples(st.just("removed"), st.sampled_from(PODS), st.lists(HASHES, max_size=5)),
    st.tuples(st.just("cleared"), st.sampled_from(PODS), st.just([])),
    st.tuples(st.just("gone"), st.sampled_from(PODS), st.just([])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60), st.lists(HASHES, max_size=6))
def test_index_matches_reference_model(
    steps: list[tuple[str, str, list[int]]], probe: list[int]
) -> None:
    index = KVBlockIndex(capacity=10_000)
    model: dict[str, set[int]] = {p: set() for p in PODS}
    for op, pod, hashes in steps:
        if op == "stored":
            index.apply(pod, [BlockStored(tuple(hashes), None, 16)])
            model[pod].update(hashes)
        elif op == "removed":
            index.apply(pod, [BlockRemoved(tuple(hashes))])
            model[pod].difference_update(hashes)
        elif op == "cleared":
            index.apply(pod, [AllBlocksCleared()])
            model[pod].clear()
        else:  # the pod went away
            index.forget_pod(pod)
            model[pod].clear()
        for p in PODS:
            assert index.blocks_of(p) == model[p]
        assert len(index) == len(set().union(*model.values()))
    expected = {}
    for p in PODS:
        n = 0
        while n < len(probe) and probe[n] in model[p]:
            n += 1
        expected[p] = n
    assert index.prefix_blocks(probe, PODS) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PODS), st.lists(HASHES, max_size=5)), max_size=40))
def test_capacity_bounds_memory_and_never_invents_blocks(
    stores: list[tuple[str, list[int]]],
) -> None:
    index = KVBlockIndex(capacity=4)
    truth: dict[str, set[int]] = {p: set() for p in PODS}
    for pod, hashes in stores:
        index.stored(pod, hashes)
        truth[pod].update(hashes)
        assert len(index) <= 4
        for p in PODS:
            assert index.blocks_of(p) <= truth[p]


def test_lru_keeps_recently_matched_blocks() -> None:
    index = KVBlockIndex(capacity=3)
    index.stored("a", [1, 2, 3])
    assert index.prefix_blocks([1], ["a"]) == {"a": 1}  # touches 1
    index.stored("a", [4])  # evicts 2, the least recently used
    assert index.blocks_of("a") == {1, 3, 4}
    assert index.evicted == 1


def test_prompt_hasher_follows_vllm() -> None:
    h = PromptHasher("sha256", "0", block_size=2)
    root = hashlib.sha256(pickle.dumps("0", protocol=5)).digest()
    d1 = hashlib.sha256(pickle.dumps((root, (7, 8), None), protocol=5)).digest()
    d2 = hashlib.sha256(pickle.dumps((d1, (9, 10), None), protocol=5)).digest()
    assert h.hashes([7, 8, 9, 10, 11]) == [
        int.from_bytes(d1, "big") & (2**64 - 1),
        int.from_bytes(d2, "big") & (2**64 - 1),
    ]
    c = PromptHasher("sha256_cbor", "0", block_size=2)
    croot = hashlib.sha256(cbor2.dumps("0", canonical=True)).digest()
    c1 = hashlib.sha256(cbor2.dumps((croot, (7, 8), ("ad",)), canonical=True)).digest()
    assert c.hashes([7, 8, 9], lora="ad") == [int.from_bytes(c1[-8:], "big")]
    assert c.hashes(list(range(100)), max_blocks=3) == c.hashes(list(range(6)))


def test_prompt_hasher_matches_the_simulator() -> None:
    from sim.config import EngineConfig
    from sim.engine import Engine, Request

    ids = list(range(2000, 2037))
    for algo in ("sha256", "sha256_cbor"):
        cfg = EngineConfig(
            block_size=4, num_gpu_blocks=32, max_model_len=64,
            prefix_caching_hash_algo=algo, hash_seed="42",
        )  # fmt: skip
        eng = Engine(cfg, record_events=True)
        eng.add(Request("r", ids, [1], 0.0, lora="x"))
        eng.run_until_idle()
        stored = [h for e in eng.kv.take_events() for h in getattr(e, "block_hashes", [])]
        assert stored == PromptHasher(algo, "42", 4).hashes(ids, lora="x")


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="algorithm 'md5'"):
        PromptHasher("md5", "0", 16)
    with pytest.raises(ValueError, match="capacity"):
        KVBlockIndex(0)
