"""Paged KV cache with automatic prefix caching (the vLLM v1 model, written for the simulator).

``num_blocks`` blocks of ``block_size`` token slots. A *full* block whose KV is computed is
registered under a chained hash computed as vLLM does (:mod:`sim.blockhash`), so a block hash
names its whole prefix. Blocks whose reference count drops to zero go to the tail of a free
queue but keep their hash: a later request with the same prefix takes them back (a hit) unless
they were evicted first; allocation evicts from the head (least recently freed).

With ``record_events`` the pool records vLLM's KV events (:mod:`sim.kvevents`) as blocks are
registered (``BlockStored``), evicted (``BlockRemoved``) or all dropped (``AllBlocksCleared``);
the engine's driver takes them after each step (:meth:`KVCacheManager.take_events`). Their block
hashes are the digests' low 64 bits (vLLM's default), or the whole digests with
``int_block_hashes=False`` (vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import islice
from operator import itemgetter
from typing import Any, Protocol, cast

from sim.blockhash import BlockHash, ChainHasher, external
from sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, ExternalBlockHash, KVEvent

__all__ = ["BlockPool", "KVCacheManager", "SeqLike"]


def _whole(h: BlockHash) -> ExternalBlockHash:
    """The whole digest (``builtin`` hashes are integers already)."""
    return h


class SeqLike(Protocol):
    """What the cache manager reads and writes on a sequence (see engine.Request)."""

    all_ids: list[int]
    lora: str | None
    num_computed: int
    block_ids: list[int]
    block_hashes: list[Any]
    num_cached_blocks: int


class BlockPool:
    """Block ids, reference counts, the LRU free queue and the hash -> block map."""

    __slots__ = (
        "block_hash",
        "cached",
        "events",
        "evictions",
        "external",
        "free",
        "num_blocks",
        "ref",
    )

    def __init__(
        self, num_blocks: int, record_events: bool = False, int_block_hashes: bool = True
    ) -> None:
        self.num_blocks = num_blocks
        # a block hash as the events carry it (vLLM's maybe_convert_block_hash)
        self.external: Callable[[BlockHash], ExternalBlockHash] = (
            external if int_block_hashes else _whole
        )
        self.ref = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockHash, int] = {}
        self.events: list[KVEvent] | None = [] if record_events else None
        self.evictions = 0  # cached hashes dropped so far (by take or reset)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def touch(self, blocks: list[int]) -> None:
        free, ref = self.free, self.ref
        for b in blocks:
            r = ref[b]
            if not r:
                del free[b]
            ref[b] = r + 1

    def take(self, n: int) -> list[int]:
        """Pop ``n`` free blocks (evicting their cached hashes); caller checked ``num_free``."""
        out: list[int] = []
        removed: list[ExternalBlockHash] = []
        dropped = 0
        free, cached, bh, ref = self.free, self.cached, self.block_hash, self.ref
        events = self.events
        external = self.external
        for _ in range(n):
            b, _v = free.popitem(last=False)
            h = bh[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                    dropped += 1
                    if events is not None:
                        removed.append(external(h))
                bh[b] = None
            ref[b] = 1
            out.append(b)
        if dropped:
            self.evictions += dropped
            if events is not None:
                events.append(BlockRemoved(removed))
        return out

    def release(self, blocks: list[int]) -> None:
        # tail blocks of a sequence are the least likely to be shared: free them first so that
        # they are evicted first
        free, ref = self.free, self.ref
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                free[b] = None

    def register(self, block: int, h: BlockHash) -> bool:
        """Cache ``block`` under ``h``; False when another block already holds that hash."""
        if h in self.cached:
            return False
        self.cached[h] = block
        self.block_hash[block] = h
        return True

    def reset(self) -> bool:
        """Drop every cached hash (vLLM's reset_prefix_cache); refused while blocks are in use."""
        if len(self.free) != self.num_blocks:
            return False
        self.evictions += len(self.cached)
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        if self.events is not None:
            self.events.append(AllBlocksCleared())
        return True


class KVCacheManager:
    """Per-sequence view over a BlockPool: prefix lookup, slot allocation, caching, freeing."""

    __slots__ = (
        "_hasher",
        "_last_lookup",
        "_lora_ids",
        "block_size",
        "caching",
        "pool",
        "root",
    )

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        *,
        hash_algo: str = "sha256",
        hash_seed: str | None = None,
        record_events: bool = False,
        int_block_hashes: bool = True,
    ) -> None:
        self.pool = BlockPool(num_blocks, record_events, int_block_hashes)
        self.block_size = block_size
        self.caching = enable_prefix_caching
        self._hasher = ChainHasher(hash_algo, hash_seed, block_size)
        self.root = self._hasher.root
        self._lora_ids: dict[str, int] = {}
        # the last lookup: (sequence, pool.evictions then, its cached prefix before trimming,
        # the hash of that prefix's last block)
        self._last_lookup: tuple[SeqLike, int, list[int], BlockHash | None] | None = None

    def _hashes(self, seq: SeqLike, num_tokens: int) -> list[BlockHash]:
        """Chained hashes of the full blocks among the first ``num_tokens`` tokens (computed once
        per sequence, the new ones appended to ``seq.block_hashes``)."""
        hs = seq.block_hashes
        want = num_tokens // self.block_size
        if len(hs) < want:
            extra = (seq.lora,) if seq.lora is not None else None
            self._hasher.extend(seq.all_ids, extra, hs, want)
        return hs

    def block_hashes(self, seq: SeqLike, first: int, last: int) -> list[BlockHash]:
        """The chained hashes of the sequence's full blocks ``first`` to ``last - 1``, without
        adding to the ones kept on it (a sequence holds those of its blocks computed or looked
        up so far: a lookup reads all it holds)."""
        hs = seq.block_hashes
        if last <= len(hs):
            return hs[first:last]
        bs = self.block_size
        extra = (seq.lora,) if seq.lora is not None else None
        known = len(hs)
        more = self._hasher.chain_from(
            hs[-1] if hs else self.root, seq.all_ids[known * bs : last * bs], extra
        )
        return hs[first:] + more[first - known :] if first > known else hs[first:] + more

    def take_events(self) -> list[KVEvent]:
        """The KV events recorded since the last call (empty when not recording)."""
        events = self.pool.events
        if not events:
            return []
        self.pool.events = []
        return events

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset()

    def lora_id(self, lora: str | None) -> int | None:
        """A stable integer per adapter name (vLLM's ``lora_int_id``), 1 for the first seen."""
        if lora is None:
            return None
        return self._lora_ids.setdefault(lora, len(self._lora_ids) + 1)

    def lookup(self, seq: SeqLike, num_tokens: int) -> list[int]:
        """Cached blocks holding a prefix of the sequence's first ``num_tokens`` tokens.

        At least one token is always left to compute (its logits give the next token).
        """
        if not self.caching:
            return []
        pool = self.pool
        hs = self._hashes(seq, num_tokens)
        # A waiting request is looked up again at every engine step until it is admitted, and
        # requests that share a prompt's start follow each other. If no cached hash was dropped
        # since the last lookup, the prefix it found still hits (a hash, once cached, keeps its
        # block until evicted) for any sequence whose hashes start with the same ones — whose
        # hash of the prefix's last block is the same, since a block's hash chains over every
        # block before it: only the hashes after it are looked up.
        last = self._last_lookup
        prefix: list[int] = []
        start = 0
        if last is not None and last[1] == pool.evictions:
            m = len(last[2])
            if last[0] is seq or (m and len(hs) >= m and hs[m - 1] == last[3]):
                prefix = last[2]
                start = m
        cached = pool.cached
        if start < len(hs) and hs[start] in cached:
            # the hit is the prefix before the first miss: every hash looked up and the first
            # None found in C passes (~2x cheaper per hash than stopping at the miss with
            # takewhile, and most lookups of a loaded fleet hit most of their blocks)
            found = list(map(cached.get, islice(hs, start, None) if start else hs))
            found.append(None)  # (when all hit)
            del found[found.index(None) :]
            prefix = prefix + cast("list[int]", found) if start else cast("list[int]", found)
        self._last_lookup = (seq, pool.evictions, prefix, hs[len(prefix) - 1] if prefix else None)
        # (a copy: the prefix is kept for the next lookup)
        if prefix and len(prefix) * self.block_size >= num_tokens:
            return prefix[:-1]
        return prefix[:]

    def blocks_needed(self, seq: SeqLike, total_tokens: int) -> int:
        return max(0, -(-total_tokens // self.block_size) - len(seq.block_ids))

    def fits(self, seq: SeqLike, num_new: int, hits: list[int] | None = None) -> bool:
        """Whether :meth:`allocate` with these arguments would succeed (it changes nothing)."""
        pool = self.pool
        if hits:
            need = -(-(len(hits) * self.block_size + num_new) // self.block_size) - len(hits)
            free = len(pool.free)
            # hit blocks in the free queue are not free for the rest: count them only when the
            # answer depends on it (a waiting request retries this every step)
            if need > free:
                return False
            if need <= free - len(hits):
                return True  # even if every hit block were in the free queue
            if len(hits) == 1:
                return need <= free - (pool.ref[hits[0]] == 0)
            # (one C call reads every count: itemgetter of the hit blocks)
            counts: tuple[int, ...] = itemgetter(*hits)(pool.ref)
            return need <= free - counts.count(0)
        return self.blocks_needed(seq, seq.num_computed + num_new) <= pool.num_free

    def allocate(self, seq: SeqLike, num_new: int, hits: list[int] | None = None) -> bool:
        """Make room for ``num_new`` more tokens (after taking ``hits``); False if it cannot."""
        pool = self.pool
        if hits:
            if not self.fits(seq, num_new, hits):
                return False
            need = -(-(len(hits) * self.block_size + num_new) // self.block_size) - len(hits)
            pool.touch(hits)
            seq.block_ids = list(hits)
            seq.num_cached_blocks = len(hits)
            seq.block_ids.extend(pool.take(need))
            return True
        need = self.blocks_needed(seq, seq.num_computed + num_new)
        if need > pool.num_free:
            return False
        if need:
            seq.block_ids.extend(pool.take(need))
        return True

    def cache_computed(self, seq: SeqLike) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        if not self.caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_cached_blocks:
            return
        hs = self._hashes(seq, seq.num_computed)
        blocks = seq.block_ids
        pool = self.pool
        events = pool.events
        if events is None:
            # pool.register, inlined (a prefill registers every block of its prompt)
            cached, block_hash = pool.cached, pool.block_hash
            for i in range(seq.num_cached_blocks, full):
                h = hs[i]
                if h not in cached:
                    b = blocks[i]
                    cached[h] = b
                    block_hash[b] = h
        else:
            run: list[int] = []  # consecutive newly cached blocks: one BlockStored each
            for i in range(seq.num_cached_blocks, full + 1):
                if i < full and pool.register(blocks[i], hs[i]):
                    run.append(i)
                    continue
                if run:
                    self._stored(seq, hs, run, events)
                    run = []
        seq.num_cached_blocks = full

    def _stored(self, seq: SeqLike, hs: list[BlockHash], run: list[int], events: list[Any]) -> None:
        bs = self.block_size
        first, last = run[0], run[-1]
        ext = self.pool.external
        events.append(
            BlockStored(
                block_hashes=[ext(hs[i]) for i in run],
                parent_block_hash=ext(hs[first - 1]) if first else None,
                token_ids=list(seq.all_ids[first * bs : (last + 1) * bs]),
                block_size=bs,
                lora_id=self.lora_id(seq.lora),
                lora_name=seq.lora,
            )
        )

    def free(self, seq: SeqLike) -> None:
        if seq.block_ids:
            self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.num_cached_blocks = 0
