"""Prefix-cache block hashes computed the way vLLM v1 computes them.

A full block's hash chains over its parent: ``hash_fn((parent_hash, tuple(block_token_ids),
extra_keys))`` where ``parent_hash`` is the previous block's hash (the *root* for the first
block) and ``extra_keys`` is ``None`` or a tuple (here: ``(lora_name,)`` for a LoRA request).
The root is ``hash_fn(seed)`` with ``seed`` the engine's ``PYTHONHASHSEED`` string (vLLM draws
32 random bytes when it is unset, and so does the simulator: then nobody else can recompute the
hashes).

``hash_fn`` (vLLM's ``--prefix-caching-hash-algo``):

- ``sha256``: SHA-256 of ``pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)`` (vLLM's default;
  stable for one Python version).
- ``sha256_cbor``: SHA-256 of the canonical CBOR encoding (RFC 8949 core deterministic: shortest
  integer heads, definite lengths; tuples are arrays, ``None`` is ``0xf6``). Reproducible in any
  language: the algorithm to use when a router recomputes the hashes.
- ``builtin``: Python's ``hash()`` (fast; only meaningful inside one process).

KV events carry the *external* form of a hash: the digest's low 64 bits as an unsigned integer
(``int.from_bytes(digest, "big") & (2**64 - 1)``), as vLLM sends with its default
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any, Literal

__all__ = [
    "HASH_ALGOS",
    "BlockHash",
    "HashAlgo",
    "cbor",
    "chain",
    "external",
    "hash_fn",
    "root_hash",
]

HashAlgo = Literal["sha256", "sha256_cbor", "builtin"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor", "builtin")
BlockHash = bytes | int
_MASK64 = (1 << 64) - 1


def _head(major: int, n: int, out: bytearray) -> None:
    m = major << 5
    if n < 24:
        out.append(m | n)
    elif n < 0x100:
        out += bytes((m | 24, n))
    elif n < 0x10000:
        out.append(m | 25)
        out += struct.pack(">H", n)
    elif n < 0x100000000:
        out.append(m | 26)
        out += struct.pack(">I", n)
    elif n <= _MASK64:
        out.append(m | 27)
        out += struct.pack(">Q", n)
    else:
        raise ValueError(f"cbor: integer {n} does not fit 64 bits")


def _encode(obj: Any, out: bytearray) -> None:
    if obj is None:
        out.append(0xF6)
    elif isinstance(obj, bool):
        out.append(0xF5 if obj else 0xF4)
    elif isinstance(obj, int):
        if obj >= 0:
            _head(0, obj, out)
        else:
            _head(1, -1 - obj, out)
    elif isinstance(obj, bytes):
        _head(2, len(obj), out)
        out += obj
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        _head(3, len(data), out)
        out += data
    elif isinstance(obj, tuple | list):
        _head(4, len(obj), out)
        for item in obj:
            _encode(item, out)
    else:
        raise TypeError(f"cbor: cannot encode {type(obj).__name__}")


def cbor(obj: Any) -> bytes:
    """Canonical CBOR of None, bool, int, bytes, str and tuples/lists of them."""
    out = bytearray()
    _encode(obj, out)
    return bytes(out)


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    return hashlib.sha256(cbor(obj)).digest()


def hash_fn(algo: str) -> Callable[[Any], BlockHash]:
    """The hash function of ``--prefix-caching-hash-algo``; ValueError names a bad one."""
    if algo == "sha256":
        return _sha256_pickle
    if algo == "sha256_cbor":
        return _sha256_cbor
    if algo == "builtin":
        return hash
    raise ValueError(f"unknown prefix-caching hash algorithm {algo!r} (known: {HASH_ALGOS})")


def root_hash(algo: str, seed: str | None) -> BlockHash:
    """The parent of every sequence's first block: ``hash_fn(seed)``, random when no seed."""
    fn = hash_fn(algo)
    if seed is None:
        return os.urandom(32) if algo != "builtin" else int.from_bytes(os.urandom(8), "big")
    return fn(seed)


def external(h: BlockHash) -> int:
    """A block hash as KV events carry it: the low 64 bits, unsigned."""
    if isinstance(h, bytes):
        return int.from_bytes(h, "big") & _MASK64
    return h & _MASK64


def chain(
    fn: Callable[[Any], BlockHash],
    parent: BlockHash,
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[Any, ...] | None,
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids``, chained from ``parent``."""
    out: list[BlockHash] = []
    for i in range(0, len(token_ids) - block_size + 1, block_size):
        parent = fn((parent, tuple(token_ids[i : i + block_size]), extra_keys))
        out.append(parent)
    return out
