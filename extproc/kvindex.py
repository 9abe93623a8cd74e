"""Which pod holds which KV block: the gateway's index of the engines' prefix caches.

Pure: no ZMQ, no asyncio (the subscriber edge is :mod:`extproc.kvevents`). Fed with the engines'
own KV events, so it knows what they evicted. Also computes a prompt's block hashes the way vLLM
does (:func:`block_hashes`), so a request can be matched against it.

Memory is bounded: at most ``capacity`` distinct block hashes are kept; when a store would exceed
it, the least recently stored or matched hashes are forgotten (for every pod). Forgetting only
makes the index under-report a cache hit; it never reports a block that was evicted.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cbor2

__all__ = [
    "HASH_ALGOS",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "HashAlgo",
    "KVBlockIndex",
    "KVEvent",
    "PromptHasher",
    "block_hashes",
]

HashAlgo = Literal["sha256", "sha256_cbor"]
HASH_ALGOS: tuple[str, ...] = ("sha256", "sha256_cbor")


# ------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class BlockStored:
    """vLLM ``BlockStored``: the pod cached these full blocks (hashes in chain order)."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None = None
    block_size: int = 0


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """vLLM ``BlockRemoved``: the pod evicted these blocks."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """vLLM ``AllBlocksCleared``: the pod's prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


# ------------------------------------------------------------------------------------ the index


class KVBlockIndex:
    """block hash -> the pods holding it, bounded to ``capacity`` hashes (LRU)."""

    __slots__ = ("_blocks", "_pods", "block_sizes", "capacity", "evicted", "naming")

    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1:
            raise ValueError(f"KV block index capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._blocks: OrderedDict[int, set[str]] = OrderedDict()
        self._pods: dict[str, set[int]] = {}
        self.block_sizes: dict[str, int] = {}  # per pod, from its BlockStored events
        # per subscribed pod: (hash algorithm, hash seed) its engine names blocks with
        self.naming: dict[str, tuple[str, str]] = {}
        self.evicted = 0  # hashes forgotten for lack of room

    # ---- events
    def apply(self, pod: str, events: Iterable[KVEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self.stored(pod, event.block_hashes)
                if event.block_size:
                    self.block_sizes[pod] = event.block_size
            elif isinstance(event, BlockRemoved):
                self.removed(pod, event.block_hashes)
            else:
                self.clear_pod(pod)

    def register(self, pod: str, hash_algo: str, hash_seed: str) -> None:
        """``pod``'s events are followed; its engine hashes blocks with ``hash_algo``/``seed``."""
        if hash_algo not in HASH_ALGOS:
            raise ValueError(f"unknown KV block hash algorithm {hash_algo!r}")
        self.naming[pod] = (hash_algo, hash_seed)

    def forget_pod(self, pod: str) -> None:
        """The pod is no longer followed: drop its blocks and what is known about it."""
        self.clear_pod(pod)
        self.naming.pop(pod, None)
        self.block_sizes.pop(pod, None)

    def stored(self, pod: str, hashes: Iterable[int]) -> None:
        blocks = self._blocks
        mine = self._pods.get(pod)
        if mine is None:
            mine = self._pods[pod] = set()
        for h in hashes:
            holders = blocks.get(h)
            if holders is None:
                holders = blocks[h] = set()
            else:
                blocks.move_to_end(h)
            holders.add(pod)
            mine.add(h)
        while len(blocks) > self.capacity:
            h, holders = blocks.popitem(last=False)
            self.evicted += 1
            for p in holders:
                self._pods[p].discard(h)

    def removed(self, pod: str, hashes: Iterable[int]) -> None:
        mine = self._pods.get(pod)
        if not mine:
            return
        blocks = self._blocks
        for h in hashes:
            if h in mine:
                mine.discard(h)
                holders = blocks[h]
                holders.discard(pod)
                if not holders:
                    del blocks[h]

    def clear_pod(self, pod: str) -> None:
        """Drop every block of ``pod`` (its cache was cleared, or its events were lost)."""
        mine = self._pods.pop(pod, None)
        if not mine:
            return
        blocks = self._blocks
        for h in mine:
            holders = blocks[h]
            holders.discard(pod)
            if not holders:
                del blocks[h]

    # ---- queries
    def prefix_blocks(self, hashes: Sequence[int], pods: Iterable[str]) -> dict[str, int]:
        """For each of ``pods``: how many leading blocks of ``hashes`` it holds."""
        out = dict.fromkeys(pods, 0)
        blocks = self._blocks
        alive = set(out)
        for i, h in enumerate(hashes):
            holders = blocks.get(h)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            blocks.move_to_end(h)
            for p in alive:
                out[p] = i + 1
        return out

    def holds(self, pod: str, h: int) -> bool:
        return h in self._pods.get(pod, ())

    def pods(self) -> list[str]:
        return [p for p, hs in self._pods.items() if hs]

    def blocks_of(self, pod: str) -> frozenset[int]:
        return frozenset(self._pods.get(pod, ()))

    def __len__(self) -> int:
        return len(self._blocks)


"""The gateway process's index: fed by :class:`extproc.kvevents.KVEventsSubscriber` (started by
``extproc.main``), read by the ``precise-prefix`` scorer of every scheduler."""


# ------------------------------------------------------------------------------------ hashing


def _sha256_cbor(obj: Any) -> bytes:
    # vLLM's own definition (vllm/utils/hashing.py); cbor2's C encoder
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _hash_fn(algo: str) -> Callable[[Any], bytes]:
    if algo == "sha256_cbor":
        return _sha256_cbor
    if algo == "sha256":
        return lambda obj: hashlib.sha256(
            pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        ).digest()
    raise ValueError(f"unknown KV block hash algorithm {algo!r} (known: {', '.join(HASH_ALGOS)})")


class PromptHasher:
    """vLLM's prefix-cache block hashes for token ids (see docs/scheduling.md, precise-prefix).

    Block *i*: ``H((parent, tuple(block token ids), extra_keys))``, parent = block *i-1*'s digest
    or ``H(seed)`` for the first block; ``extra_keys`` = ``(lora_name,)`` or None. ``H`` is
    SHA-256 over canonical CBOR (``sha256_cbor``, cbor2's as in vLLM) or over pickle protocol 5
    (``sha256``). The result is each digest's low 64 bits, as the engines' KV events carry them.
    """

    __slots__ = ("_fn", "algo", "block_size", "root")

    def __init__(self, algo: str, seed: str, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        self._fn = _hash_fn(algo)
        self.algo = algo
        self.block_size = block_size
        self.root = self._fn(seed)

    def hashes(
        self, token_ids: Sequence[int], lora: str | None = None, max_blocks: int | None = None
    ) -> list[int]:
        return block_hashes(
            self._fn, self.root, token_ids, self.block_size, lora, max_blocks=max_blocks
        )

    def extend(
        self, parent: bytes, token_ids: Sequence[int], lora: str | None = None
    ) -> tuple[list[int], bytes]:
        """Continue a chain: the hashes of the full blocks of ``token_ids`` after ``parent`` (a
        digest, or :attr:`root`), and the digest of the last one (``parent`` when none)."""
        fn, bs = self._fn, self.block_size
        extra = (lora,) if lora is not None else None
        ids = tuple(token_ids)
        out: list[int] = []
        for i in range(0, len(ids) - bs + 1, bs):
            parent = fn((parent, ids[i : i + bs], extra))
            out.append(int.from_bytes(parent[-8:], "big"))
        return out, parent


def block_hashes(
    fn: Callable[[Any], bytes],
    root: bytes,
    token_ids: Sequence[int],
    block_size: int,
    lora: str | None = None,
    *,
    max_blocks: int | None = None,
) -> list[int]:
    """External (low 64-bit) hashes of the full blocks of ``token_ids``, chained from ``root``."""
    extra = (lora,) if lora is not None else None
    n = len(token_ids) // block_size
    if max_blocks is not None and n > max_blocks:
        n = max_blocks
    out: list[int] = []
    parent = root
    ids = tuple(token_ids)
    for i in range(0, n * block_size, block_size):
        parent = fn((parent, ids[i : i + block_size], extra))
        out.append(int.from_bytes(parent[-8:], "big"))
    return out
