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

Pure (msgpack only): the ZMQ sockets are :mod:`sim.kvpublisher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "END_SEQ",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventsConfig",
    "encode_batch",
]

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
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return payload
