"""KV-cache events, published the way vLLM publishes them.

Configured by ``--kv-events-config`` with vLLM's JSON shape (:class:`KVEventsConfig`). Events
are vLLM's ``vllm/distributed/kv_events.py`` msgspec structs (``tag=True``) in one of two wire
forms (:data:`KVEventsFormat`, the simulator's ``--kv-events-format``):

- ``array`` (``array_like=True``, as earlier vLLM releases encode them; the default): each event
  is a msgpack array whose first element is the class name:
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``,
  ``["BlockRemoved", block_hashes, medium]``, ``["AllBlocksCleared"]``; the batch is
  ``[ts, events]`` (``data_parallel_rank`` omitted when None, as ``omit_defaults`` does).
- ``map`` (tagged maps, as vLLM 0.31 sends them): each event is a map whose ``type`` is the class
  name: ``BlockStored`` {type, block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind}, ``BlockRemoved`` {type,
  block_hashes, medium, group_idx}, ``AllBlocksCleared`` {type}; the batch is
  ``[ts, events, data_parallel_rank]`` with rank 0. ``vllm-router``'s ``kv_aware`` policy reads
  only this form.

Block hashes are vLLM's ``ExternalBlockHash``: the digest's low 64 bits as an unsigned integer
(vLLM's default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``) or the whole digest as bytes (32 for
``sha256`` / ``sha256_cbor``) with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``; the KV cache
chooses (``sim.kvcache``), the encoding here writes what it is given.

One engine step's events form one ``KVEventBatch``. Each batch is one ZMQ multipart
message on a PUB socket: ``[topic, seq, payload]`` with ``seq`` an 8-byte big-endian counter from
0. A ROUTER *replay* socket answers ``[identity, b"", start_seq]`` with every buffered batch from
``start_seq`` on, each as ``[identity, b"", seq, payload]``, then ``[identity, b"", END_SEQ, b""]``
(``END_SEQ`` = -1 as 8 signed big-endian bytes). The last ``buffer_steps`` batches are kept.

Pure (msgpack only): the ZMQ sockets are :mod:`sim.kvpublisher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import msgpack
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "END_SEQ",
    "KV_EVENTS_FORMATS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "ExternalBlockHash",
    "KVEvent",
    "KVEventsConfig",
    "KVEventsFormat",
    "encode_batch",
]

KVEventsFormat = Literal["array", "map"]
"""How events are laid out on the wire (see the module doc)."""
KV_EVENTS_FORMATS: tuple[str, ...] = get_args(KVEventsFormat)
ExternalBlockHash = int | bytes
""" A block hash as events carry it: low 64 bits (int) or the whole digest (bytes)."""

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
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = "GPU"
    lora_name: str | None = None  # the map form's lora_name and per-block extra_keys

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

    def to_map(self) -> dict[str, object]:
        # extra_keys: each block's extra hash keys, (lora_name,) or None, as hashed
        extra = [self.lora_name] if self.lora_name is not None else None
        return {
            "type": "BlockStored",
            "block_hashes": self.block_hashes,
            "parent_block_hash": self.parent_block_hash,
            "token_ids": self.token_ids,
            "block_size": self.block_size,
            "lora_id": self.lora_id,
            "medium": self.medium,
            "lora_name": self.lora_name,
            "extra_keys": [extra] * len(self.block_hashes),
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[ExternalBlockHash]
    medium: str | None = "GPU"

    def to_list(self) -> list[object]:
        return ["BlockRemoved", self.block_hashes, self.medium]

    def to_map(self) -> dict[str, object]:
        return {
            "type": "BlockRemoved",
            "block_hashes": self.block_hashes,
            "medium": self.medium,
            "group_idx": 0,
        }


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    def to_list(self) -> list[object]:
        return ["AllBlocksCleared"]

    def to_map(self) -> dict[str, object]:
        return {"type": "AllBlocksCleared"}


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(
    ts: float,
    events: list[KVEvent],
    data_parallel_rank: int | None = None,
    fmt: KVEventsFormat = "array",
) -> bytes:
    """A ``KVEventBatch`` as msgpack bytes, in wire form ``fmt`` (the map form always carries a
    data-parallel rank, 0 unless given)."""
    if fmt == "map":
        body: list[object] = [ts, [e.to_map() for e in events], data_parallel_rank or 0]
    elif fmt == "array":
        body = [ts, [e.to_list() for e in events]]
    else:
        known = ", ".join(KV_EVENTS_FORMATS)
        raise ValueError(f"KV events format {fmt!r}: expected one of {known}")
    if fmt == "array" and data_parallel_rank is not None:
        body.append(data_parallel_rank)
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return payload
