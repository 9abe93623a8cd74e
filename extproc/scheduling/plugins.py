"""Filter and scorer plugins.

A filter keeps the pods that may take a request; when it keeps none it explains why
(:meth:`Filter.error`). A scorer gives every remaining pod a score in 0..1 (1 = best); the
scheduler adds them up with the profile's weights. Scorers see all candidate pods at once (one call
per request, not per pod) because per-call overhead dominates at 8-16 pods.

Metrics that are missing or stale are *unknown*: a filter does not reject a pod on an unknown
signal, and a scorer gives such a pod the mean score of the pods it does know (neutral), or a
constant when it knows none.

Every plugin has a pydantic ``Args`` model (unknown arguments are rejected) and a registered name in
:data:`PLUGINS`.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel

from extproc.kvindex import KVBlockIndex, PromptHasher
from extproc.scheduling.pd_queue import PrefillQueue
from extproc.scheduling.prefix import BlockHashes, PendingPrefill, PrefixHomes, PrefixIndex
from extproc.scheduling.tokenizers import (
    AUTO,
    SIMULATOR,
    ChatTemplateError,
    ModelTokenizer,
    find_model_tokenizer,
    load_tokenizer,
)
from extproc.scheduling.types import (
    AllPodsSaturated,
    NoPodAvailable,
    NoPodReady,
    SchedulingRequest,
    SchedulingResult,
)
from fleet.plugins import (
    CATALOGUE,
    LeastLatencyArgs,
    LeastRequestArgs,
    LoraCapableArgs,
    PrecisePrefixArgs,
    PrefillQueueArgs,
    PrefixCacheArgs,
    SaturationArgs,
    SessionAffinityArgs,
)
from fleet.pods import Pod

log = logging.getLogger(__name__)

__all__ = [
    "PLUGINS",
    "Context",
    "Filter",
    "KvCacheScorer",
    "LeastLatencyScorer",
    "LeastRequestScorer",
    "LoraAffinityScorer",
    "LoraCapableFilter",
    "Plugin",
    "PluginInfo",
    "PrecisePrefixScorer",
    "PrefillQueueScorer",
    "PrefixCacheScorer",
    "RandomScorer",
    "ReadyFilter",
    "SaturationFilter",
    "Scorer",
    "SessionAffinityScorer",
    "lora_servable",
]


# Plugin arguments are written in the API's camelCase (``blockSize``); snake_case is accepted too.


@dataclass(slots=True)
class Context:
    """What one ``schedule`` call shares with its plugins."""

    request: SchedulingRequest
    now: float
    rng: random.Random
    server: str  # "ModelServer <name>" or "the ModelServer", for messages
    state: dict[str, object]  # per-request plugin data, returned in SchedulingResult.plugin_state


class Plugin:
    """Base of filters and scorers: a registered name, an args model and lifecycle hooks."""

    name: ClassVar[str]
    kind: ClassVar[str]
    key: str  # unique within a scheduler: "<name>#<position>"

    def __init__(self, args: BaseModel) -> None:
        self.args = args
        self.key = self.name

    def bind(self, kv_index: KVBlockIndex) -> None:
        """Shared state the scheduler's owner hands every plugin once it is built (the KV-block
        index the gateway keeps from the engines' events); most plugins need none."""

    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        """The gateway sent ``request`` to ``result.primary``."""

    def on_finished(self, request_id: str, pod_name: str) -> None:
        """The request ended."""

    def forget_pod(self, pod_name: str) -> None:
        """The pod is gone: drop what is kept about it."""


class Filter(Plugin):
    kind: ClassVar[str] = "filter"

    def filter(self, ctx: Context, pods: list[Pod]) -> list[Pod]:
        raise NotImplementedError

    def error(self, ctx: Context, pods: list[Pod]) -> NoPodAvailable:
        """Why no pod of ``pods`` passed this filter."""
        return NoPodAvailable(f"no pod of {ctx.server} passed the '{self.name}' filter")


class Scorer(Plugin):
    kind: ClassVar[str] = "scorer"

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        """Scores in 0..1 for ``pods`` (same order), or None when it prefers no pod over another."""
        raise NotImplementedError


def _neutral_fill(values: list[float | None], default: float = 0.5) -> list[float]:
    """Unknown entries get the mean of the known ones (or ``default`` when none is known)."""
    known = [v for v in values if v is not None]
    if len(known) == len(values):
        return known
    fill = sum(known) / len(known) if known else default
    return [fill if v is None else v for v in values]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pods_have(n: int) -> str:
    return "1 pod has" if n == 1 else f"{n} pods have"


# --------------------------------------------------------------------------------------- filters


class ReadyFilter(Filter):
    """Keeps pods that are Running and Ready."""

    name = "ready"

    def filter(self, ctx: Context, pods: list[Pod]) -> list[Pod]:
        return [p for p in pods if p.ready]

    def error(self, ctx: Context, pods: list[Pod]) -> NoPodAvailable:
        return NoPodReady(f"none of the {_plural(len(pods), 'pod')} of {ctx.server} is ready")


class SaturationFilter(Filter):
    """Drops pods whose engine queue (waiting >= max_waiting) or KV cache (usage >=
    max_kv_cache_usage) is full; ``waiting`` counts what was sent and finished since the scrape
    (:meth:`waiting`). Unknown or stale metrics never make a pod saturated."""

    name = "saturation"

    def __init__(self, args: BaseModel) -> None:
        super().__init__(args)
        assert isinstance(args, SaturationArgs)
        self.max_waiting = args.max_waiting
        self.max_kv = args.max_kv_cache_usage

    @staticmethod
    def waiting(pod: Pod) -> float | None:
        """The engine queue now, as far as this gateway knows: the last scrape's ``waiting`` plus
        the requests sent there since, minus those that finished (each frees a running slot for
        a queued one). Between scrapes (200 ms) this keeps a burst of dispatches from
        overfilling a pod that the last read showed with room."""
        waiting = pod.metrics.waiting
        if waiting is None:
            return None
        estimate = waiting + pod.since_scrape
        return estimate if estimate > 0.0 else 0.0

    def saturated(self, pod: Pod) -> bool:
        m = pod.metrics
        if m.stale:
            return False
        waiting = self.waiting(pod)
        if waiting is not None and waiting >= self.max_waiting:
            return True
        return m.kv_cache_usage is not None and m.kv_cache_usage >= self.max_kv

    def filter(self, ctx: Context, pods: list[Pod]) -> list[Pod]:
        max_waiting, max_kv = self.max_waiting, self.max_kv
        return [
            p
            for p in pods
            if (m := p.metrics).stale
            or (
                (m.waiting is None or m.waiting + p.since_scrape < max_waiting)
                and (m.kv_cache_usage is None or m.kv_cache_usage < max_kv)
            )
        ]

    def error(self, ctx: Context, pods: list[Pod]) -> NoPodAvailable:
        limit = self.max_waiting
        by_queue = sum(1 for p in pods if (self.waiting(p) or 0.0) >= limit)
        by_kv = len(pods) - by_queue
        why = []
        if by_queue:
            why.append(f"{by_queue} with waiting >= {self.max_waiting:g}")
        if by_kv:
            why.append(f"{by_kv} with KV cache usage >= {self.max_kv:.0%}")
        return AllPodsSaturated(
            f"all {_plural(len(pods), 'pod')} of {ctx.server} are saturated ({', '.join(why)})"
        )


class LoraCapableFilter(Filter):
    """For a LoRA request, keeps pods that have loaded the adapter (their ``/v1/models`` lists it)
    and run or queue it or have a free adapter slot (fewer running adapters than max_lora). When
    every pod that has the adapter has all its slots busy with others, those pods are kept: the
    engine queues the request until a slot frees, as vLLM does, rather than the gateway refusing
    it. With ``dynamicLoading`` a pod that has not loaded the adapter counts as having it. What is
    unknown never drops a pod: stale metrics, no adapter list read, no ``max_lora`` reported.
    Requests without an adapter pass unchanged."""

    name = "lora-capable"

    def __init__(self, args: BaseModel) -> None:
        super().__init__(args)
        assert isinstance(args, LoraCapableArgs)
        self.dynamic_loading = args.dynamic_loading

    @staticmethod
    def missing(pod: Pod, lora: str) -> bool:
        """True when the pod's fresh adapter list is known and lacks ``lora``."""
        m = pod.metrics
        loaded = m.loaded_loras
        return (
            not m.stale
            and loaded is not None
            and lora not in loaded
            and lora not in m.running_loras
            and lora not in m.waiting_loras
        )

    @staticmethod
    def capable(pod: Pod, lora: str, dynamic_loading: bool = False) -> bool:
        m = pod.metrics
        if m.stale:
            return True
        if lora in m.running_loras or lora in m.waiting_loras:
            return True
        if not dynamic_loading and LoraCapableFilter.missing(pod, lora):
            return False
        return m.max_loras is None or len(m.running_loras) < m.max_loras

    def filter(self, ctx: Context, pods: list[Pod]) -> list[Pod]:
        lora = ctx.request.lora
        if not lora:
            return pods
        capable, dynamic = self.capable, self.dynamic_loading
        free = [p for p in pods if capable(p, lora, dynamic)]
        if free:
            return free
        # every pod with the adapter is busy with others: they queue it (not a refusal)
        return pods if dynamic else [p for p in pods if not self.missing(p, lora)]

    def error(self, ctx: Context, pods: list[Pod]) -> NoPodAvailable:
        lora = ctx.request.lora or ""
        return NoPodAvailable(
            f"no pod of {ctx.server} can serve LoRA adapter '{lora}': "
            f"{_pods_have(len(pods))} not loaded it"
        )


def lora_servable(pods: Sequence[Pod], lora: str) -> bool:
    """True when some ready pod of ``pods`` may serve adapter ``lora``: it has loaded it, or what
    it has loaded is unknown (for listing a model only when some pod can serve it)."""
    return any(p.ready and not LoraCapableFilter.missing(p, lora) for p in pods)


# --------------------------------------------------------------------------------------- scorers


class LeastRequestScorer(Scorer):
    """Prefers the least loaded pod. A pod's load is max(gateway in-flight, engine waiting +
    running): the gateway's count is exact and current for its own requests, the engine's counts
    lag by a scrape but include other gateways' requests; the larger is the better estimate (adding
    them would count this gateway's requests twice). Score = (min_load + slack) / (load + slack):
    1 for the least loaded pod, relative (not min-max) so one extra request does not swing a score
    from 1 to 0."""

    name = "least-request"

    def __init__(self, args: BaseModel) -> None:
        super().__init__(args)
        assert isinstance(args, LeastRequestArgs)
        self.slack = args.slack

    @staticmethod
    def load(pod: Pod) -> float:
        m = pod.metrics
        if m.stale:
            return float(pod.in_flight)
        engine = (m.waiting or 0.0) + (m.running or 0.0)
        return engine if engine > pod.in_flight else float(pod.in_flight)

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        if PRECISE in ctx.state:
            return None  # the precise-prefix cost already counts the load
        loads = [
            p.in_flight
            if (m := p.metrics).stale
            or (e := (m.waiting or 0.0) + (m.running or 0.0)) < p.in_flight
            else e
            for p in pods
        ]
        slack = self.slack
        top = min(loads) + slack
        return [top / (x + slack) for x in loads]


class PrefillQueueScorer(Scorer):
    """For prefill pods (prefill/decode serving): prefers the pod with the fewest prompt tokens
    still to prefill (:class:`extproc.scheduling.pd_queue.PrefillQueue`: the prompts this gateway
    sent there since its last scrape, plus the last ``waiting + running`` sent before). Score =
    (min_queued + slack) / (queued + slack)."""

    name = "prefill-queue"

    def __init__(self, args: BaseModel) -> None:
        super().__init__(args)
        assert isinstance(args, PrefillQueueArgs)
        self.slack = args.slack
        self.queue = PrefillQueue()

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        ctx.state[self.key] = ctx.now
        queued = [self.queue.queued_tokens(p) for p in pods]
        slack = self.slack
        top = min(queued) + slack
        return [top / (q + slack) for q in queued]

    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        now = result.plugin_state.get(self.key)
        if isinstance(now, float):
            self.queue.routed(result.primary.name, request.estimated_input_tokens, now)

    def forget_pod(self, pod_name: str) -> None:
        self.queue.forget(pod_name)


class KvCacheScorer(Scorer):
    """Prefers pods with more free KV cache: score = 1 - usage (unknown = neutral)."""

    name = "kv-cache"

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        values: list[float | None] = [
            None
            if (m := p.metrics).stale or (u := m.kv_cache_usage) is None
            else 0.0
            if u >= 1.0
            else 1.0
            if u <= 0.0
            else 1.0 - u
            for p in pods
        ]
        return _neutral_fill(values)


class PrefixCacheScorer(Scorer):
    """Prefers the pod most likely to hold the prompt's prefix in its KV cache: score = matched
    leading blocks / prompt blocks, from an approximate per-pod index credited at routing time."""

    name = "prefix-cache"

    def __init__(self, args: BaseModel) -> None:
        super().__init__(args)
        assert isinstance(args, PrefixCacheArgs)
        self.block_size = args.block_size
        self.max_blocks = args.max_blocks
        self.index = PrefixIndex(args.capacity)
        self._hashes = BlockHashes(self.block_size, self.max_blocks)

    def hashes(self, request: SchedulingRequest) -> list[int]:
        return self._hashes(request.prompt)

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        if PRECISE in ctx.state:
            return None  # precise-prefix knows what the engines cache
        hashes = self.hashes(ctx.request)
        ctx.state[self.key] = hashes
        n = len(hashes)
        if n == 0:
            return None
        index = self.index
        held = index.holders(hashes[0])  # pods holding the first block: usually few
        if not held:
            return [0.0] * len(pods)
        matched = index.matched_blocks
        inv = 1.0 / n
        return [matched(p.name, hashes) * inv if p.name in held else 0.0 for p in pods]

    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        hashes = result.plugin_state.get(self.key)
        if not isinstance(hashes, list):
            hashes = self.hashes(request)
        self.index.credit(result.primary.name, hashes)

    def forget_pod(self, pod_name: str) -> None:
        self.index.forget(pod_name)


_SEGMENT = 256  # characters per cached prompt segment (cut at the next whitespace)
_SEGMENTS_KEPT = 65536  # ~16 MB of prompt text
_SPACE = re.compile(r"\s+")


@dataclass(slots=True)
class _Segment:
    """One cached piece of a prompt: its tokens' effect on the block chain."""

    serial: int
    parent: _Segment | None
    hashes: list[int]  # block hashes this segment completed
    digest: bytes  # chain digest after them (parent for the next block)
    tail: tuple[int, ...]  # token ids after the last full block
    n_tokens: int  # prompt tokens up to the end of this segment
    n_blocks: int


PRECISE = "precise-prefix:active"
"""``Context.state`` key set when precise-prefix scored the request: ``prefix-cache`` and
``least-request`` listed after it then abstain (the precise cost already holds both)."""

_Naming = tuple[str, str, int]  # hash algorithm, hash seed, block size

_HOME_BLOCK = 8  # a prefix's home is keyed by its 8th block (128 tokens at block size 16)
_TRIALS = 64  # unconfirmed requests before the simulator's files are given up for a model
_AUTO_RETRY = 600.0  # seconds before a model given up on is looked for again
_AUTO_MODELS = 1024  # models whose tokenizer is remembered


@dataclass(slots=True)
class _AutoTokenizer:
    """What ``tokenizer: auto`` found for one model name."""

    tokenizer: ModelTokenizer | None
    confirmed: bool  # the model's own files, or an engine's KV events matched these tokens
    trials: int = 0  # requests scored before confirmation in which no pod matched a block
    retry_at: float = 0.0  # when a model without a tokenizer is looked for again


@dataclass(frozen=True, slots=True)
class _Scored:
    """What :class:`PrecisePrefixScorer` hands its ``on_routed``: the prompt prefix's name and,
    per group of pods that name blocks alike, the pods, the prompt's block hashes and block
    size."""

    key: int
    groups: list[tuple[list[str], list[int], int]]


class PrecisePrefixScorer(Scorer):
    """Prefers the pod that costs least to serve the request, in one unit (prompt tokens):
    cost = prompt tokens the pod must still prefill (those past its cached prefix, as its own KV
    events report) + request_cost x its load (max of gateway in-flight and engine waiting +
    running) + copy_cost x the tokens to prefill on a pod that is not the prompt prefix's home
    (:class:`PrefixHomes`: where it was placed when cold, below; a prefix some pod holds without
    a home is homed on the pod homing the fewest; a copy elsewhere takes cache slots from other
    prefixes). A cold prefix (no pod holds it or is
    being sent it) pays no copy cost but the prefill still ahead on each pod
    (:class:`PendingPrefill`: tokens sent there that its events have not yet reported stored),
    and the pod it costs least on becomes its home. Score = (min cost + block) / (cost +
    block). How blocks are hashed comes from the
    ModelServer's kvEvents (hashAlgo, hashSeed) and the events (block size). When no candidate's
    events are followed it abstains; when it scores, the prefix-cache and least-request scorers
    listed after it abstain.

    ``tokenizer: auto`` finds the tokenizer by the request's model name
    (:func:`find_model_tokenizer`: a local path, the local Hugging Face cache). When the files
    are not there it tries the simulator's, but only trusts them once an engine's KV events
    confirm them: until some pod reports holding a block of a request hashed with them, the
    scorer abstains; after ``_TRIALS`` such requests with none matched (an engine that is not
    the simulator never will), it gives them up for that model (looked for again after
    ``_AUTO_RETRY`` seconds)."""

    name = "precise-prefix"

    def __init__(self, args: BaseModel, index: KVBlockIndex | None = None) -> None:
        super().__init__(args)
        assert isinstance(args, PrecisePrefixArgs)
        # until bound to the gateway's index (or given one), an empty index: the scorer abstains
        self.index = index if index is not None else KVBlockIndex()
        # None: the model's tokenizer files are not here; the scorer abstains (prefix-cache
        # decides) and looks for them again now and then (load_tokenizer)
        self.tokenizer_spec = args.tokenizer
        self.tokenizer: ModelTokenizer | None = (
            None if args.tokenizer == AUTO else load_tokenizer(args.tokenizer)
        )
        self._auto: OrderedDict[str, _AutoTokenizer] = OrderedDict()  # by model name
        self.max_blocks = args.max_blocks
        self.request_cost = args.request_cost
        self.copy_cost = args.copy_cost
        self.homes = PrefixHomes()
        self.pending = PendingPrefill()
        self._hashers: dict[_Naming, PromptHasher] = {}
        self._segments: OrderedDict[tuple[int, str], _Segment] = OrderedDict()
        self._prompts: OrderedDict[
            tuple[str, str | None, _Naming, str, str], tuple[int, list[int]]
        ] = OrderedDict()
        self._roots: dict[tuple[_Naming, str | None, tuple[int, ...], str], int] = {}
        self._serial = 0

    def hashes(
        self,
        request: SchedulingRequest,
        naming: _Naming,
        tokenizer: ModelTokenizer | None = None,
    ) -> tuple[int, list[int]]:
        """(prompt tokens, block hashes) of the request for engines that name blocks ``naming``.

        The engine's text is cut before whitespace about every ``_SEGMENT`` characters; each
        segment's tokens and block hashes are cached under (the segment before it, its text), so
        prompts that share a prefix (a system prompt, earlier chat turns) tokenize and hash only
        what follows it. Valid when the tokenizer concatenates at whitespace (probed when it is
        loaded; otherwise the prompt is one segment). Whole prompts are cached too (the last
        4096). ``tokenizer``: the model's (default: the scorer's configured one)."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        assert tok is not None  # score() abstains without one
        path = request.headers.get(":path", "")
        whole = (request.prompt, request.lora, naming, path, tok.source)
        hit = self._prompts.get(whole)
        if hit is not None:
            self._prompts.move_to_end(whole)
            return hit
        hit = self._hash_segments(request, naming, tok)
        self._prompts[whole] = hit
        if len(self._prompts) > 4096:
            self._prompts.popitem(last=False)
        return hit

    def _hash_segments(
        self, request: SchedulingRequest, naming: _Naming, tokenizer: ModelTokenizer
    ) -> tuple[int, list[int]]:
        hasher = self._hashers.get(naming)
        if hasher is None:
            hasher = self._hashers[naming] = PromptHasher(*naming)
        block_size = naming[2]
        text = tokenizer.engine_text(request.prompt, request.headers)
        lead = tokenizer.leading_ids(request.headers)
        segmented = tokenizer.concatenates_at_whitespace
        cache = self._segments
        root_key = (naming, request.lora, lead, tokenizer.source)
        parent_serial = self._roots.get(root_key)
        if parent_serial is None:
            self._serial -= 1
            parent_serial = self._roots[root_key] = self._serial
        node: _Segment | None = None
        pos, n = 0, len(text)
        max_blocks = self.max_blocks
        while pos < n:
            m = _SPACE.search(text, pos + _SEGMENT) if segmented else None
            end = m.start() if m else n
            key = (parent_serial, text[pos:end])
            found = cache.get(key)
            if found is None:
                ids = tokenizer.encode(key[1])
                tail = (node.tail + tuple(ids)) if node is not None else lead + tuple(ids)
                n_blocks = node.n_blocks if node is not None else 0
                digest = node.digest if node is not None else hasher.root
                new: list[int] = []
                if n_blocks < max_blocks:
                    full = min(len(tail) // block_size, max_blocks - n_blocks) * block_size
                    new, digest = hasher.extend(digest, tail[:full], request.lora)
                    tail = tail[full:]
                    n_blocks += len(new)
                self._serial += 1
                n_tokens = (node.n_tokens if node is not None else len(lead)) + len(ids)
                found = _Segment(self._serial, node, new, digest, tail, n_tokens, n_blocks)
                if n_blocks >= max_blocks:
                    found.tail = ()  # no more blocks are hashed past max_blocks
                cache[key] = found
                if len(cache) > _SEGMENTS_KEPT:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(key)
            node, parent_serial, pos = found, found.serial, end
        if node is None:
            return 0, []
        chain: list[list[int]] = []
        seg: _Segment | None = node
        while seg is not None:
            if seg.hashes:
                chain.append(seg.hashes)
            seg = seg.parent
        return node.n_tokens, [h for part in reversed(chain) for h in part]

    def bind(self, kv_index: KVBlockIndex) -> None:
        self.index = kv_index

    def forget_pod(self, pod_name: str) -> None:
        self.homes.forget_pod(pod_name)
        self.pending.forget_pod(pod_name)

    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        sent = result.plugin_state.get(self.key)
        if not isinstance(sent, _Scored):
            return  # the scorer abstained for this request
        pod = result.primary.name
        for names, hashes, block_size in sent.groups:
            if pod in names:
                self.pending.add(pod, request.request_id, sent.key, hashes, block_size)
                return

    def on_finished(self, request_id: str, pod_name: str) -> None:
        self.pending.finish(pod_name, request_id)

    def tokenizer_for(self, model: str) -> tuple[ModelTokenizer | None, _AutoTokenizer | None]:
        """The tokenizer for a request to ``model`` (and, with ``auto``, what is known of it)."""
        if self.tokenizer_spec != AUTO:
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.tokenizer_spec)
            return self.tokenizer, None
        auto = self._auto
        entry = auto.get(model)
        if entry is None or (entry.tokenizer is None and time.monotonic() >= entry.retry_at):
            own = find_model_tokenizer(model)
            if own is not None:
                entry = _AutoTokenizer(own, confirmed=True)
                log.info("precise-prefix: model %r tokenizes with %s", model, own.source)
            else:  # the simulator's files, until an engine's events confirm or refute them
                entry = _AutoTokenizer(load_tokenizer(SIMULATOR), confirmed=False)
            auto[model] = entry
            if len(auto) > _AUTO_MODELS:
                auto.popitem(last=False)
        return entry.tokenizer, entry

    def _unconfirmed(self, model: str, entry: _AutoTokenizer, matched: dict[str, int]) -> bool:
        """For the simulator's files tried for ``model``: True (abstain) until some pod matched
        a block hashed with them; gives them up after ``_TRIALS`` requests without a match."""
        if any(matched.values()):
            entry.confirmed = True
            log.info("precise-prefix: model %r tokenizes with the simulator's files (its "
                     "engines' KV events hold blocks hashed with them)", model)  # fmt: skip
            return False
        if len(self.index) == 0:
            return True  # the engines have reported nothing yet: no evidence either way
        entry.trials += 1
        if entry.trials >= _TRIALS:
            log.warning(
                "precise-prefix: model %r: no tokenizer files here (a local path or the Hugging "
                "Face cache) and its engines' KV events match none of %d requests tokenized with "
                "the simulator's; prefix-cache decides (looked for again in %.0f s)",
                model, entry.trials, _AUTO_RETRY,
            )  # fmt: skip
            entry.tokenizer = None
            entry.retry_at = time.monotonic() + _AUTO_RETRY
        return True

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        index = self.index
        model = ctx.request.model
        tokenizer, entry = self.tokenizer_for(model)
        if tokenizer is None:
            return None
        naming, sizes = index.naming, index.block_sizes
        if not naming or not sizes:
            return None  # no pod's KV events are followed (no group below)
        groups: dict[_Naming, list[str]] = {}
        for p in pods:
            nm = naming.get(p.name)
            bs = sizes.get(p.name)
            if nm is not None and bs is not None:
                groups.setdefault((nm[0], nm[1], bs), []).append(p.name)
        if not groups:
            return None
        matched: dict[str, int] = {}  # cached prompt tokens per pod
        n_tokens = 0
        key: int | None = None  # the prompt prefix's name for its home
        hashed: list[tuple[list[str], list[int], int]] = []
        try:
            for group, names in groups.items():
                n_tokens, hashes = self.hashes(ctx.request, group, tokenizer)
                if key is None and hashes:
                    key = hashes[min(_HOME_BLOCK, len(hashes)) - 1]
                hashed.append((names, hashes, group[2]))
                for name, blocks in index.prefix_blocks(hashes, names).items():
                    matched[name] = blocks * group[2]
        except ChatTemplateError as exc:  # e.g. the template rejects this conversation
            log.debug("precise-prefix abstains for request %s: %s", ctx.request.request_id, exc)
            return None
        if entry is not None and not entry.confirmed and self._unconfirmed(model, entry, matched):
            return None
        ctx.state[PRECISE] = True
        rc = self.request_cost
        load = LeastRequestScorer.load
        get = matched.get
        misses = [max(0, n_tokens - get(p.name, 0)) for p in pods]  # tokens to prefill
        costs = [m + rc * load(p) for p, m in zip(pods, misses, strict=True)]
        if key is not None:
            ctx.state[self.key] = _Scored(key, hashed)  # for on_routed: the prefill sent
            if not self.pending.sending(key) and not any(index.holds(n, key) for n in index.pods()):
                # a cold prefix: no pod holds it (its naming block) or is being sent it, so it
                # is prefilled wherever it goes; it goes where that prefill starts soonest
                # (behind the least prefill still ahead there), and that pod becomes its home
                pending, holds = self.pending.tokens, index.holds
                costs = [c + pending(p.name, holds) for p, c in zip(pods, costs, strict=True)]
                if self.copy_cost > 0:
                    best = min(range(len(pods)), key=costs.__getitem__)
                    self.homes.place(key, pods[best].name)
            elif self.copy_cost > 0:
                # a pod other than the prefix's home pays for the cache slots a copy would take
                home = self.homes.get(key)
                if home is None:  # no home yet: homed on the emptiest pod, the cheapest first
                    by_cost = sorted(range(len(pods)), key=costs.__getitem__)
                    home = self.homes.home(key, [pods[i].name for i in by_cost])
                cc = self.copy_cost
                costs = [
                    c if p.name == home else c + cc * m
                    for p, c, m in zip(pods, costs, misses, strict=True)
                ]
        slack = min(group[2] for group in groups)
        top = min(costs) + slack
        return [top / (c + slack) for c in costs]


class LeastLatencyScorer(Scorer):
    """Prefers pods with lower recent TTFT and TPOT (means over the last scrape interval with
    traffic). Each part scores fastest / own (1 for the fastest pod); unknown = neutral."""

    name = "least-latency"

    def __init__(self, args: BaseModel) -> None:
        super().__init__(args)
        assert isinstance(args, LeastLatencyArgs)
        total = args.ttft_weight + args.tpot_weight  # > 0: LeastLatencyArgs checks it
        self.w_ttft = args.ttft_weight / total
        self.w_tpot = args.tpot_weight / total

    @staticmethod
    def _relative(values: list[float | None]) -> list[float]:
        known = [v for v in values if v is not None and v > 0]
        if not known:
            return [1.0] * len(values)
        best = min(known)
        return _neutral_fill([None if v is None else (best / v if v > 0 else 1.0) for v in values])

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        ttft = self._relative([None if p.metrics.stale else p.metrics.ttft_seconds for p in pods])
        tpot = self._relative([None if p.metrics.stale else p.metrics.tpot_seconds for p in pods])
        a, b = self.w_ttft, self.w_tpot
        return [a * x + b * y for x, y in zip(ttft, tpot, strict=True)]


class LoraAffinityScorer(Scorer):
    """For a LoRA request: adapter running on the pod 1.0 > loaded with a free adapter slot 0.8 >
    adapter list unknown (not read since the pod turned ready, or an engine that does not list
    them) with a free slot 0.7 > adapter waiting 0.6 > not loaded, or no free slot, 0. Unknown
    metrics = neutral; requests without an adapter score 1 everywhere."""

    name = "lora-affinity"

    @staticmethod
    def affinity(pod: Pod, lora: str) -> float | None:
        m = pod.metrics
        if m.stale:
            return None
        if lora in m.running_loras:
            return 1.0
        if LoraCapableFilter.missing(pod, lora):
            return 0.0  # it must be loaded first
        if m.max_loras is not None and len(m.running_loras) < m.max_loras:
            return 0.8 if m.loaded_loras is not None else 0.7  # known to hold it > may hold it
        if lora in m.waiting_loras:
            return 0.6
        if m.max_loras is None and not m.running_loras and not m.waiting_loras:
            # no LoRA metrics: only the adapter list says something
            return 0.7 if m.loaded_loras is None else 0.8
        return 0.0

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        lora = ctx.request.lora
        if not lora:
            return None
        affinity = self.affinity
        return _neutral_fill([affinity(p, lora) for p in pods])


class SessionAffinityScorer(Scorer):
    """Sends a session back to the pod that served it last: 1 for that pod, 0 for the others. The
    session is the ``header`` value, else ``request.session_key``. When that pod is gone or filtered
    out (not ready, saturated) nobody scores 1, the others decide, and the session moves."""

    name = "session-affinity"

    def __init__(self, args: BaseModel) -> None:
        super().__init__(args)
        assert isinstance(args, SessionAffinityArgs)
        self.header = args.header.lower()
        self.capacity = args.capacity
        self.sessions: OrderedDict[str, str] = OrderedDict()

    def session(self, request: SchedulingRequest) -> str | None:
        return request.headers.get(self.header) or request.session_key

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        key = self.session(ctx.request)
        pod_name = self.sessions.get(key) if key else None
        if pod_name is None:
            return None
        return [1.0 if p.name == pod_name else 0.0 for p in pods]

    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        key = self.session(request)
        if not key:
            return
        self.sessions[key] = result.primary.name
        self.sessions.move_to_end(key)
        if len(self.sessions) > self.capacity:
            self.sessions.popitem(last=False)

    def forget_pod(self, pod_name: str) -> None:
        for key in [k for k, v in self.sessions.items() if v == pod_name]:
            del self.sessions[key]


class RandomScorer(Scorer):
    """A uniform random score per pod (from the scheduler's rng)."""

    name = "random"

    def score(self, ctx: Context, pods: list[Pod]) -> list[float] | None:
        r = ctx.rng.random
        return [r() for _ in pods]


# -------------------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """A registered plugin: its catalogue entry (:mod:`fleet.plugins`: kind, arguments, default
    weight) and the class that implements it."""

    name: str
    kind: str  # "filter" | "scorer"
    factory: Callable[[BaseModel], Plugin]
    args: type[BaseModel]
    default_weight: float | None
    doc: str


def _info(cls: type[Filter] | type[Scorer]) -> PluginInfo:
    entry = CATALOGUE[cls.name]
    if entry.kind != cls.kind:  # pragma: no cover - a programming error, caught at import
        raise TypeError(f"plugin {cls.name!r} is a {cls.kind} here, a {entry.kind} in fleet")
    doc = (cls.__doc__ or "").strip()
    return PluginInfo(cls.name, cls.kind, cls, entry.args, entry.default_weight, doc)


_CLASSES: Sequence[type[Filter] | type[Scorer]] = (
    ReadyFilter,
    SaturationFilter,
    LoraCapableFilter,
    LeastRequestScorer,
    PrefillQueueScorer,
    KvCacheScorer,
    PrefixCacheScorer,
    PrecisePrefixScorer,
    LeastLatencyScorer,
    LoraAffinityScorer,
    SessionAffinityScorer,
    RandomScorer,
)

PLUGINS: dict[str, PluginInfo] = {c.name: _info(c) for c in _CLASSES}
"""Every registered plugin by name."""
