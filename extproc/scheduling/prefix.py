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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    block, which stands for everything before it). The caller homes it on a pod of its choice
    (:meth:`place`), or, asking for a prefix without a home (:meth:`home`), it is homed on the
    candidate pod homing the fewest prefixes (ties: the caller's order, best first); it stays
    there until it is placed again, the pod is forgotten or ``capacity`` newer prefixes push it
    out (least recently used first). Kept as a map: the scorer charges pods other than the home
    for the cache slot a second copy of the prefix would take."""

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

    def place(self, key: int, pod: str) -> None:
        """Home the prefix on ``pod``, moving it from its home if it had one."""
        old = self._home.pop(key, None)
        if old is not None:
            self._drop(key, old)
        elif len(self._home) >= self.capacity:
            oldest = next(iter(self._home))
            self._drop(oldest, self._home.pop(oldest))
        self._count[pod] = self._count.get(pod, 0) + 1
        self._home[key] = pod

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


@dataclass(slots=True)
class _Sent:
    """A request sent to a pod whose prompt blocks its KV events have not all reported stored."""

    key: int  # the prompt prefix's name (as PrefixHomes names it)
    hashes: Sequence[int]  # the prompt's block hashes
    block_size: int
    stored: int = 0  # leading blocks seen stored so far (never goes back)


class PendingPrefill:
    """The prefill still ahead on each pod: the prompt blocks of the requests this gateway sent
    it that the pod's KV events have not yet reported stored, in tokens; requests that share a
    prefix (named as :class:`PrefixHomes` names it) count it once, as the engine computes it once.

    A request's blocks are stored as the engine computes them (a chunk per step), so its count
    falls as its prefill runs, without waiting for its answer to end; a request leaves when its
    last block is seen stored or when it finishes. ``holds(pod, hash)`` (the KV-block index) is
    asked when a pod's count is read. Also tells whether a prefix is on its way to some pod
    (:meth:`sending`): sent there, not yet stored."""

    __slots__ = ("_keys", "_pods")

    def __init__(self) -> None:
        self._pods: dict[str, dict[str, _Sent]] = {}
        self._keys: dict[int, int] = {}  # prefix name -> requests of it not yet stored

    def add(
        self, pod: str, request_id: str, key: int, hashes: Sequence[int], block_size: int
    ) -> None:
        """``request_id``, whose prompt has ``hashes``, was sent to ``pod``."""
        sent = self._pods.setdefault(pod, {})
        if request_id in sent:
            self._remove(sent, request_id)
        sent[request_id] = _Sent(key, hashes, block_size)
        self._keys[key] = self._keys.get(key, 0) + 1

    def finish(self, pod: str, request_id: str) -> None:
        """The request ended (its prefill is over, or never happened)."""
        sent = self._pods.get(pod)
        if sent is not None and request_id in sent:
            self._remove(sent, request_id)

    def _remove(self, sent: dict[str, _Sent], request_id: str) -> None:
        self._unkey(sent.pop(request_id).key)

    def _unkey(self, key: int) -> None:
        left = self._keys[key] - 1
        if left:
            self._keys[key] = left
        else:
            del self._keys[key]

    def tokens(self, pod: str, holds: Callable[[str, int], bool]) -> int:
        """Prompt tokens sent to ``pod`` that it has not yet reported stored."""
        sent = self._pods.get(pod)
        if not sent:
            return 0
        ahead: dict[int, int] = {}  # per prefix: the most of its tokens a request still has
        done: list[str] = []
        for request_id, s in sent.items():
            hashes = s.hashes
            n = len(hashes)
            if not n or holds(pod, hashes[-1]):
                done.append(request_id)
                continue
            lo, hi = s.stored, n - 1  # blocks before lo seen stored; block hi not stored
            while lo < hi:
                mid = (lo + hi) >> 1
                if holds(pod, hashes[mid]):
                    lo = mid + 1
                else:
                    hi = mid
            s.stored = lo
            tokens = (n - lo) * s.block_size
            if tokens > ahead.get(s.key, 0):
                ahead[s.key] = tokens
        for request_id in done:
            self._remove(sent, request_id)
        return sum(ahead.values())

    def sending(self, key: int) -> bool:
        """Whether a request of the prefix ``key`` was sent to some pod that has not yet reported
        its blocks stored."""
        return key in self._keys

    def forget_pod(self, pod: str) -> None:
        """The pod is gone: what was sent there is no longer ahead of anything."""
        for s in self._pods.pop(pod, {}).values():
            self._unkey(s.key)
