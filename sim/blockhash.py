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
- ``sha256_cbor``: SHA-256 of ``cbor2.dumps(obj, canonical=True)``, as vLLM computes it (RFC 8949
  core deterministic encoding: shortest integer heads, definite lengths; tuples are arrays,
  ``None`` is ``0xf6``). Reproducible in any language: the algorithm to use when a router
  recomputes the hashes.
- ``builtin``: Python's ``hash()`` (fast; only meaningful inside one process).

A simulated engine hashes every block of every request it admits, and the same blocks come again
and again (a system prompt sent to every pod, a chat history resent each turn): hashing was most
of an engine step's cost. :class:`ChainHasher` computes the same digests cheaper, exactly:

- a process-wide memo per algorithm maps a block's whole argument to its digest (a block seen
  before costs a dict lookup instead of SHA-256 over pickle);
- a sequence whose first block another recent sequence started with takes that sequence's
  digests for the leading blocks whose tokens are equal (compared a span at a time), since a
  block's digest depends only on the root, the extra keys and the tokens up to its end.

KV events carry the *external* form of a hash: the digest's low 64 bits as an unsigned integer
(``int.from_bytes(digest, "big") & (2**64 - 1)``), as vLLM sends with its default
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cbor2

__all__ = [
    "HASH_ALGOS",
    "BlockHash",
    "ChainHasher",
    "HashAlgo",
    "chain",
    "clear_memos",
    "external",
    "hash_fn",
    "root_hash",
]

HashAlgo = Literal["sha256", "sha256_cbor", "builtin"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor", "builtin")
BlockHash = bytes | int
_MASK64 = (1 << 64) - 1


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    # vLLM's own definition (vllm/utils/hashing.py); cbor2's C encoder
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def hash_fn(algo: str) -> Callable[[Any], BlockHash]:
    """The hash function of ``--prefix-caching-hash-algo``; ValueError names a bad one."""
    if algo == "sha256":
        return _sha256_pickle
    if algo == "sha256_cbor":
        return _sha256_cbor
    if algo == "builtin":
        return hash
    raise ValueError(f"unknown prefix-caching hash algorithm {algo!r} (known: {HASH_ALGOS})")


class _Memo:
    """What a process remembers of one algorithm's digests (bounded; see ChainHasher)."""

    __slots__ = ("blocks", "donors")

    BLOCKS = 1 << 15  # entries: a block's ~0.5-1 kB (its token-id tuple and digest)
    DONORS = 128  # sequences: their token ids and digests (a few 10 kB each)

    def __init__(self) -> None:
        # (parent, block token ids, extra keys) -> digest
        self.blocks: dict[tuple[Any, ...], BlockHash] = {}
        # (root, first block's token ids, extra keys) -> (token ids, digests) of the latest
        # sequence that started so
        self.donors: OrderedDict[tuple[Any, ...], tuple[Sequence[int], list[BlockHash]]] = (
            OrderedDict()
        )


_MEMOS: dict[str, _Memo] = {}


def clear_memos() -> None:
    """Forget every digest the process remembers (benchmarks measuring a cold start)."""
    for memo in _MEMOS.values():
        memo.blocks.clear()
        memo.donors.clear()


_SPAN = 16  # blocks compared at once when matching a donor's tokens


class ChainHasher:
    """The chained block digests of sequences: ``hash_fn(algo)`` from ``root_hash(algo, seed)``,
    with the process-wide memo of the algorithm (no block memo for ``builtin``, whose ``hash()``
    costs what a lookup would). Every digest is the one ``chain`` computes."""

    __slots__ = ("_memo", "_memo_blocks", "block_size", "fn", "root")

    def __init__(self, algo: str, seed: str | None, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        self.fn = hash_fn(algo)
        self.root = root_hash(algo, seed)
        self.block_size = block_size
        memo = _MEMOS.get(algo)
        if memo is None:
            memo = _MEMOS[algo] = _Memo()
        self._memo = memo
        self._memo_blocks = algo != "builtin"

    def extend(
        self, ids: Sequence[int], extra: tuple[Any, ...] | None, hs: list[BlockHash], want: int
    ) -> None:
        """Append to ``hs`` (the digests of the first ``len(hs)`` full blocks of ``ids``) those
        of the blocks up to ``want``."""
        have = len(hs)
        if have >= want:
            return
        bs = self.block_size
        memo = self._memo
        if not have:
            donors = memo.donors
            key = (self.root, tuple(ids[:bs]), extra)
            donor = donors.get(key)
            if donor is not None:
                have = _common_blocks(ids, donor[0], min(want, len(donor[1])), bs)
                hs.extend(donor[1][:have])
                donors.move_to_end(key)
            elif len(donors) >= memo.DONORS:
                donors.popitem(last=False)
            donors[key] = (ids, hs)
            if have >= want:
                return
        hs += self.chain_from(hs[-1] if hs else self.root, ids[have * bs : want * bs], extra)

    def chain_from(
        self, parent: BlockHash, ids: Sequence[int], extra: tuple[Any, ...] | None
    ) -> list[BlockHash]:
        """The digests of the full blocks of ``ids`` chained after ``parent`` (a digest, or
        ``root`` for a sequence's first block): what ``chain`` computes, through the memo."""
        bs = self.block_size
        fn = self.fn
        t = tuple(ids[: len(ids) // bs * bs])
        out: list[BlockHash] = []
        if not self._memo_blocks:
            for i in range(0, len(t), bs):
                parent = fn((parent, t[i : i + bs], extra))
                out.append(parent)
            return out
        memo = self._memo
        blocks = memo.blocks
        get = blocks.get
        for i in range(0, len(t), bs):
            k = (parent, t[i : i + bs], extra)
            h = get(k)
            if h is None:
                h = fn(k)
                if len(blocks) >= memo.BLOCKS:
                    blocks.clear()
                blocks[k] = h
            parent = h
            out.append(h)
        return out


def _common_blocks(a: Sequence[int], b: Sequence[int], n: int, bs: int) -> int:
    """How many of the first ``n`` blocks of ``a`` and ``b`` hold equal tokens, leading."""
    s = 0
    while s < n:
        e = min(n, s + _SPAN)
        if a[s * bs : e * bs] != b[s * bs : e * bs]:
            while a[s * bs : (s + 1) * bs] == b[s * bs : (s + 1) * bs]:
                s += 1
            return s
        s = e
    return n


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
