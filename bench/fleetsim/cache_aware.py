"""A model of ``vllm-router --policy cache_aware`` for the virtual-time fleet (bench only).

This is **not** vllm-router's code: it is our own re-statement of the algorithm its ``--help``
and the SGLang router's documentation describe, so that the fleet simulation can compare our
scheduler with it side by side in virtual time (the wall-clock suite runs the real router):

- The router keeps, per worker, an approximate prefix tree of the request texts it sent there
  (characters, not tokens; it never hears what the engine evicted). Here a tree is the set of
  chained hashes of the text's leading ``CHUNK``-character pieces, which gives the same longest
  match rounded down to ``CHUNK`` characters.
- Imbalanced fleet: ``max_load - min_load > balance_abs`` **and** ``max_load > balance_rel x
  min_load`` (load = requests the router has in flight per worker): the least loaded worker.
- Otherwise the worker with the longest prefix match, if the match covers more than
  ``cache_threshold`` of the text; else the worker with the smallest tree.
- The chosen worker's tree gets the text. vllm-router trims trees to ``--max-tree-size``
  characters every ``--eviction-interval-secs`` (120 s); with 32 Mi characters per worker and
  runs shorter than that interval, trimming never happens here and is not modelled.

Defaults are vllm-router 0.1.17's (``vllm-router --help``): ``--cache-threshold 0.3``,
``--balance-abs-threshold 64``, ``--balance-rel-threshold 1.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

__all__ = ["CHUNK", "CacheAwareModel"]

CHUNK = 64
"""Characters per hashed piece of a request's text (the match granularity of the model)."""


@dataclass(frozen=True, slots=True)
class CacheAwareArgs:
    cache_threshold: float = 0.3
    balance_abs: int = 64
    balance_rel: float = 1.5


class CacheAwareModel:
    """Picks a worker index per request; ``loads`` are the router's in-flight counts."""

    def __init__(self, workers: int, args: CacheAwareArgs | None = None) -> None:
        if workers < 1:
            raise ValueError(f"cache_aware model: workers must be >= 1, got {workers}")
        self.args = args or CacheAwareArgs()
        self.trees: list[set[int]] = [set() for _ in range(workers)]
        self.sizes = [0] * workers  # characters in each worker's tree

    @staticmethod
    def chain(text: str) -> list[int]:
        """Chained hashes of the text's leading ``CHUNK``-character pieces (last piece partial)."""
        out: list[int] = []
        h = 0
        for i in range(0, len(text), CHUNK):
            h = xxhash.xxh3_64_intdigest(text[i : i + CHUNK].encode(), seed=h)
            out.append(h)
        return out

    def _matched(self, tree: set[int], chain: list[int]) -> int:
        """Leading pieces of ``chain`` in ``tree`` (trees are prefix-closed: binary search)."""
        lo, hi = 0, len(chain)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if chain[mid - 1] in tree:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def choose(self, text: str, loads: Sequence[int]) -> int:
        """The worker for a request with ``text``; records the text in its tree."""
        a = self.args
        chain = self.chain(text)
        lo_load, hi_load = min(loads), max(loads)
        if hi_load - lo_load > a.balance_abs and hi_load > a.balance_rel * lo_load:
            pick = loads.index(lo_load)
        else:
            matches = [self._matched(t, chain) for t in self.trees]
            best = max(matches)
            chars = min(best * CHUNK, len(text))
            if text and chars / len(text) > a.cache_threshold:
                pick = matches.index(best)
            else:
                pick = self.sizes.index(min(self.sizes))
        tree = self.trees[pick]
        for i, h in enumerate(chain):
            if h not in tree:
                tree.add(h)
                self.sizes[pick] += min(CHUNK, len(text) - i * CHUNK)
        return pick
