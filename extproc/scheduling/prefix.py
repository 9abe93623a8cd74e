"""Approximate prefix-cache index: chained xxhash over fixed-size prompt blocks, one LRU per pod.

The prompt's UTF-8 bytes are cut into ``block_size``-byte blocks (only whole blocks count, at most
``max_blocks`` of them); block *i*'s hash is xxh3-64 of its bytes seeded with block *i-1*'s hash,
so a hash stands for the whole prefix up to and including that block. When a request is routed,
its pod is credited with all its block hashes; the per-pod approximate LRU keeps between
``capacity`` and 1.25 x ``capacity`` hashes. A pod's match for a new prompt is the number of
leading blocks it holds, found by binary search: a chain's leading blocks are credited as the most
recent, so they are evicted last and "holds block i" implies "holds blocks < i" (up to hash
collisions and interleaved evictions, which only make the estimate approximate).
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
_xxh3_128 = xxhash.xxh3_128_intdigest


def _hashed_bytes(prompt: str, block_size: int, max_blocks: int) -> bytes:
    """The UTF-8 bytes of the prompt's leading whole blocks (at most ``max_blocks``). Only the
    first ``max_blocks * block_size`` characters are encoded: each is at least one byte."""
    data = prompt[: max_blocks * block_size].encode("utf-8", "surrogatepass")
    n = min(len(data) // block_size, max_blocks)
    return data[: n * block_size] if n * block_size < len(data) else data


def _chain(data: bytes, block_size: int) -> list[int]:
    out: list[int] = []
    append = out.append
    h = 0
    for i in range(0, len(data), block_size):
        h = _xxh3(data[i : i + block_size], h)
        append(h)
    return out


def block_hashes(prompt: str, block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's leading whole blocks (at most ``max_blocks``)."""
    return _chain(_hashed_bytes(prompt, block_size, max_blocks), block_size)


class BlockHashes:
    """:func:`block_hashes` for one ``block_size`` and ``max_blocks``, keeping the chains of the
    last prompts (``kept``; cleared when full): prompts that share their hashed bytes (a long
    system prompt fills all ``max_blocks``) reuse one chain. A chain is found by the 128-bit
    xxh3 digest of those bytes (~1 µs for 16 kB, where hashing 128 blocks costs ~17 µs); a
    digest collision is as unlikely as the 64-bit block hashes' own."""

    __slots__ = ("_chains", "block_size", "kept", "max_blocks")

    def __init__(self, block_size: int, max_blocks: int, kept: int = 1024) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.kept = kept
        self._chains: dict[int, tuple[int, ...]] = {}

    def __call__(self, prompt: str) -> list[int]:
        data = _hashed_bytes(prompt, self.block_size, self.max_blocks)
        if not data:
            return []
        key = _xxh3_128(data)
        chain = self._chains.get(key)
        if chain is None:
            if len(self._chains) >= self.kept:
                self._chains.clear()
            chain = self._chains[key] = tuple(_chain(data, self.block_size))
        return list(chain)


class PrefixIndex:
    """Per-pod approximate-LRU sets of prefix block hashes.

    Each pod's set is a dict ``hash -> recency stamp``; crediting is one C-level ``dict.update``
    (no per-block Python work). When a pod holds more than ``capacity`` + 25% hashes, the oldest
    are dropped in one pass down to ``capacity`` (amortised well under a microsecond per block).
    Within one credit the leading blocks get the newer stamps, so a chain's leading blocks are
    always evicted last. Crediting a pod again with the chain it was last credited with is a
    no-op: that chain already holds the pod's newest stamps in the same order (only the order
    within a pod decides its evictions).
    """

    __slots__ = ("_last", "_pods", "_stamp", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pods: dict[str, dict[int, int]] = {}
        self._last: dict[str, Sequence[int]] = {}  # per pod: the chain of its last credit
        self._stamp = 0

    def matched_blocks(self, pod_name: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the pod holds."""
        index = self._pods.get(pod_name)
        n = len(hashes)
        if not index or n == 0 or hashes[0] not in index:
            return 0
        if hashes[-1] in index:
            return n
        lo, hi = 1, n - 1  # hashes[lo-1] held, hashes[hi] not held
        while lo < hi:
            mid = (lo + hi) >> 1
            if hashes[mid] in index:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def credit(self, pod_name: str, hashes: Sequence[int]) -> None:
        """Record that the pod now caches these blocks (the first block ends most recent)."""
        n = len(hashes)
        if not n:
            return
        index = self._pods.get(pod_name)
        if index is None:
            index = self._pods[pod_name] = {}
        elif self._last.get(pod_name) == hashes:  # equal ints are mostly the same objects
            return
        base = self._stamp
        self._stamp = base + n + 1
        index.update(zip(hashes, range(base + n, base, -1), strict=False))  # n of each
        self._last[pod_name] = list(hashes)
        if len(index) > self.capacity + (self.capacity >> 2):
            self._evict(pod_name, index)

    def _evict(self, pod_name: str, index: dict[int, int]) -> None:
        keep = self.capacity
        threshold = sorted(index.values())[len(index) - keep]
        self._pods[pod_name] = {h: t for h, t in index.items() if t >= threshold}
        self._last.pop(pod_name, None)  # a chain longer than ``capacity`` lost blocks

    def holders(self, first_hash: int) -> set[str]:
        """Names of the pods that hold ``first_hash`` (one dict probe per known pod)."""
        return {name for name, index in self._pods.items() if first_hash in index}

    def forget(self, pod_name: str) -> None:
        self._pods.pop(pod_name, None)
        self._last.pop(pod_name, None)

    def size(self, pod_name: str) -> int:
        index = self._pods.get(pod_name)
        return len(index) if index else 0

    def pods(self) -> list[str]:
        return list(self._pods)


class PrefixHomes:
    """One home pod per prompt prefix, spreading prefixes evenly over the pods.

    A prefix is named by one block hash (the caller's choice, e.g. the hash of a prompt's 8th
    block, which stands for everything before it). The first time a prefix is seen it is homed on
    the candidate pod homing the fewest prefixes (ties: the caller's order, best first); it stays
    there until the pod is forgotten or ``capacity`` newer prefixes push it out (least recently
    used first). The model of ``vllm-router``'s ``cache_aware`` "smallest tree" placement, kept
    as a map: the scorer charges pods other than the home for the cache slot a second copy of
    the prefix would take."""

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError(f"PrefixHomes: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._home: dict[int, str] = {}  # insertion order = LRU order (oldest first)
        self._count: dict[str, int] = {}

    def get(self, key: int) -> str | None:
        """The prefix's home, if it has one (it becomes the most recently used)."""
        home = self._home.pop(key, None)
        if home is not None:
            self._home[key] = home  # most recently used last
        return home

    def home(self, key: int, candidates: Sequence[str]) -> str | None:
        """The prefix's home, homing it on the emptiest of ``candidates`` if it has none
        (None without candidates)."""
        home = self.get(key)
        if home is not None or not candidates:
            return home
        count = self._count
        home = min(candidates, key=lambda name: count.get(name, 0))
        count[home] = count.get(home, 0) + 1
        if len(self._home) >= self.capacity:
            old = next(iter(self._home))
            self._drop(old, self._home.pop(old))
        self._home[key] = home
        return home

    def _drop(self, key: int, pod: str) -> None:
        left = self._count[pod] - 1
        if left:
            self._count[pod] = left
        else:
            del self._count[pod]

    def forget_pod(self, pod: str) -> None:
        """The pod is gone: its prefixes are homed again when next seen."""
        for key in [k for k, p in self._home.items() if p == pod]:
            del self._home[key]
        self._count.pop(pod, None)

    def homed(self, pod: str) -> int:
        """How many prefixes ``pod`` homes."""
        return self._count.get(pod, 0)

    def __len__(self) -> int:
        return len(self._home)
