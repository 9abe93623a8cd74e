"""The discrete-event fleet simulation: engines, the gateway and the clients in virtual time.

Nothing sleeps and nothing listens on a socket. One heap of events (arrivals, engine step ends,
metric scrapes, load samples) drives:

- **the engines**: one :class:`sim.engine.Engine` per pod, built from the same ``matrixinfer-sim``
  flags as the wall-clock suite (``sim.cli.serve_parser`` + ``build_config``), so the timing model,
  the KV cache and the continuous-batching scheduler are the simulator's own code. Each pod steps
  as ``sim.driver.EngineDriver`` steps it: a step starts when the previous one ends while there is
  work, or at once when an idle engine receives a request. The prompt is tokenised as the
  simulator's HTTP edge tokenises it (``sim.tokenizer``, the chat template), and the output plan is
  drawn from the same seed as ``SimServer._build``, so a multi-turn session resends the same
  answer text the wall-clock sim would have produced.
- **the gateway** (contenders of kind ``ours``): the real :class:`extproc.gateway.Gateway` over
  the real :class:`extproc.datastore.Datastore`, configured from the same ModelServer /
  ModelRoute / Endpoints YAML the suite writes (``bench.contenders.write_gateway_config`` read by
  ``fleet.files.load_directory``). Per request it calls what the ext_proc servicer calls, in its
  order: ``Gateway.start(headers)``, ``Gateway.decide(state, body)`` (parse, route, schedule with
  the profile's plugins, ``Datastore.begin``), ``Gateway.routed(state)`` (the scheduler's
  ``on_routed``: prefix index, sessions) and, when the stream ends, ``Gateway.finish(state)``
  (``Datastore.finish`` and ``on_finished``). The scheduler is ``build_scheduler`` with the
  virtual clock and a seeded rng; the gateway's own rng is seeded too.
- **the scraper**: every ``scrape_interval`` (virtual seconds, each pod at the scraper's stable
  phase ``extproc.scraper._phase``) each engine's Prometheus page is parsed by
  ``fleet.engine_metrics.parse_metrics`` and installed with ``Datastore.publish_metrics`` - the
  scheduler sees metrics exactly as stale as the real gateway does. ``metrics_page="full"``
  renders the simulator's whole page (``sim.metrics.VllmCollector``); the default ``"minimal"``
  renders only the series the parser reads (the same values; ~60x cheaper per scrape, see
  the report).
  Every adapter is loaded on every pod (as the suite does), so ``loaded_loras`` is that set.
- **the clients**: open loop (sessions start at their arrival; the next turn of a session is sent
  ``think_time`` after the previous answer ended, with the history) or closed loop; no new session
  after ``duration``; requests still open ``drain_timeout`` after the last session started are
  counted as errors, as ``bench.loadgen`` counts them.

Round-robin (``envoy-rr``) is modelled as the suite's Envoy runs it: ``envoy_workers`` worker
threads (``--concurrency 2``), each with its own ROUND_ROBIN cursor starting at a random pod, and
each request landing on a random worker (the kernel spreads the client's connections over them).
Two interleaved cursors spread load less evenly than one; the calibration
(``bench/reports/fleetsim.md``) shows this is what the wall-clock baseline does. It calls no
gateway code. Everything is deterministic for the seed.
"""

from __future__ import annotations

import array
import contextlib
import copy
import gc
import heapq
import itertools
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import xxhash

from bench.contenders import CONTENDERS, Contender, write_gateway_config
from bench.fleetsim.cache_aware import CacheAwareModel
from bench.fleetsim.trace import TraceSession
from bench.loadgen import LoadResult, RequestRecord, Summary, summarize
from bench.suite.config import DEFAULT_SUITE
from bench.workloads import adapter_names
from extproc import kvindex
from extproc.datastore import Datastore
from extproc.gateway import Gateway, Immediate, Routed
from extproc.kvindex import KVBlockIndex
from extproc.metrics import GatewayMetrics
from extproc.scheduling import build_scheduler
from extproc.scraper import _phase
from fleet.config import GatewayConfig
from fleet.engine_metrics import LatencyState, parse_metrics, pod_metrics
from fleet.files import load_directory
from fleet.plugins import check_profile
from fleet.pods import PodMetrics
from fleet.profile import SchedulerProfile
from sim import kvevents as sim_kvevents
from sim.blockhash import BlockHash, ChainHasher, clear_memos
from sim.config import SimConfig
from sim.engine import (
    FINISHED,
    SGLANG_BUCKETS,
    VLLM_BUCKETS,
    Batch,
    Engine,
    QueueFull,
    Request,
)
from sim.fleet import SimPod
from sim.metrics import LoraView, SglangCollector, VllmCollector, make_registry, render
from sim.tokenizer import OUTPUT_WORD_IDS, OUTPUT_WORDS, VOCAB_SIZE, Tokenizer
from sim.tokenizer import clear_cache as clear_tokenizer_cache

__all__ = [
    "MODEL_CONTENDERS",
    "FleetSpec",
    "LoadSample",
    "SimRecord",
    "SimResult",
    "contender_named",
    "metrics_page",
    "reset_caches",
    "simulate",
]

_WORD: dict[int, str] = {}
for _w, _i in zip(OUTPUT_WORDS, OUTPUT_WORD_IDS, strict=True):
    _WORD.setdefault(_i, _w)

_TOKENIZER = Tokenizer()
# token ids of one chat message in the simulator's template, and their bytes as the output plan's
# hash reads them (int32 array; converting a long prompt costs ~40 ns a token, so once per
# message), shared by every simulation of the process (contenders of one comparison see the same
# prompts); bounded
_Part = tuple[list[int], bytes]
_TEMPLATE: dict[tuple[str, str], _Part] = {}


# the output plan of a prompt (``random.Random(prompt hash).choices``, as ``SimServer._build``
# draws it: ~15 us a request) by (prompt hash, max_tokens), which decide it; bounded (8,192
# plans of max_tokens ids each: at most a few tens of MB)
_PLANS: dict[tuple[int, int], list[int]] = {}


def _part(ids: list[int]) -> _Part:
    return ids, array.array("i", ids).tobytes()


def reset_caches() -> None:
    """Empty the process-wide caches a simulation fills (chat messages' token ids, output plans,
    block-hash digests and prompts' digests, loaded gateway and engine configurations, the
    tokenizer's pieces): the next
    run starts cold, as a process's first run does."""
    _TEMPLATE.clear()
    _PLANS.clear()
    _CONFIGS.clear()
    _SIM_CONFIGS.clear()
    _PROMPT_DIGESTS.clear()
    clear_memos()
    clear_tokenizer_cache()


_GENERATION_PROMPT = _part(_TOKENIZER.encode("<|assistant|>\n"))


@dataclass(slots=True, eq=False)
class _Piece:
    """A chat prompt's block chain up to the end of one of its messages."""

    serial: int
    parent: _Piece | None
    digests: list[BlockHash]  # of the full blocks this message completed
    last: BlockHash  # the chain's last digest (the root before the first full block)
    tail: list[int]  # the tokens after the last full block


class _PromptDigests:
    """The block digests of chat prompts, computed as the engines' prefix cache computes them
    (``ChainHasher``: the same algorithm, seed and block size, so equal digests), a message at
    a time: the chain after a message depends only on the messages up to it, so each is kept
    under (the piece before it, the message) and a prompt that starts like an earlier one (a
    shared system prompt, a conversation's earlier turns) hashes only its new messages. Set on
    a request before the engine sees it, they spare the engine's first prefix lookup its hashing
    (where comparing a 4,000-token prompt with the last one that started alike cost ~20 us)."""

    __slots__ = ("hasher", "pieces", "roots", "serial")

    KEPT = 1 << 14  # pieces (cleared when full)

    def __init__(self, hasher: ChainHasher) -> None:
        self.hasher = hasher
        self.pieces: dict[tuple[int, tuple[str, str] | None], _Piece] = {}
        self.roots: dict[tuple[Any, ...] | None, _Piece] = {}
        self.serial = 0

    def digests(
        self,
        messages: list[tuple[str, str]],
        parts: list[_Part],
        extra: tuple[Any, ...] | None,
    ) -> list[BlockHash]:
        """The digests of the full blocks of the prompt ``parts`` (``_chat_parts(messages)``: a
        part per message, then the generation prompt) for a request with ``extra`` keys."""
        root = self.roots.get(extra)
        if root is None:
            self.serial += 1
            root = self.roots[extra] = _Piece(self.serial, None, [], self.hasher.root, [])
        pieces = self.pieces
        bs = self.hasher.block_size
        node = root
        for key, (ids, _raw) in zip([*messages, None], parts, strict=True):
            found = pieces.get((node.serial, key))
            if found is None:
                tokens = node.tail + ids if node.tail else ids
                new = self.hasher.chain_from(node.last, tokens, extra)
                last = new[-1] if new else node.last
                if len(pieces) >= self.KEPT:
                    pieces.clear()
                self.serial += 1
                found = _Piece(self.serial, node, new, last, tokens[len(new) * bs :])
                pieces[node.serial, key] = found
            node = found
        chunks: list[list[BlockHash]] = []
        while node is not root:
            if node.digests:
                chunks.append(node.digests)
            assert node.parent is not None
            node = node.parent
        out: list[BlockHash] = []
        for chunk in reversed(chunks):
            out += chunk
        return out


# the prompt digests of every fleet's engines, by (hash algorithm, seed, block size)
_PROMPT_DIGESTS: dict[tuple[str, str, int], _PromptDigests] = {}


# the engines' configuration by (model, sim flags, $PYTHONHASHSEED): FleetSpec.sim_config
_SIM_CONFIGS: dict[tuple[str, tuple[str, ...], str | None], SimConfig] = {}


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The simulated fleet: like ``bench.suite.SuiteConfig``'s fleet fields, plus the scraper's."""

    replicas: int = 8
    model: str = "bench-model"
    adapters: int = 6
    sim_args: tuple[str, ...] = tuple(DEFAULT_SUITE.sim_args)
    scrape_interval: float = 0.2  # extproc --scrape-interval default
    metrics_page: Literal["minimal", "full"] = "minimal"
    load_sample_interval: float = 0.5
    envoy_workers: int = 2  # envoy-rr: Envoy worker threads, each with its own round-robin
    # s from the client's send to the engine's arrival (the HTTP path: loadgen, Envoy, ext_proc,
    # the sim's event loop); 0 = the engines alone. The calibration measures it from the probes.
    http_latency: float = 0.0
    # apply a pod's runs of identical decode steps lazily, in one call, instead of one event per
    # step (``Engine.decode_repeats``); the records are the same either way
    fast_forward: bool = True
    # the engines record vLLM's KV events and ``ours`` contenders follow them (the precise-prefix
    # scorer): every pod's new events reach the gateway's index just before each routing
    # decision (no publishing lag); a fast-forwarded decode run's blocks arrive once it is
    # caught up
    kv_events: bool = False

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not self.scrape_interval > 0:
            raise ValueError(f"scrape_interval must be > 0, got {self.scrape_interval}")
        if not self.load_sample_interval > 0:
            raise ValueError(f"load_sample_interval must be > 0, got {self.load_sample_interval}")
        if not self.http_latency >= 0:
            raise ValueError(f"http_latency must be >= 0, got {self.http_latency}")
        if self.envoy_workers < 1:
            raise ValueError(f"envoy_workers must be >= 1, got {self.envoy_workers}")
        if self.metrics_page not in ("minimal", "full"):
            raise ValueError(f"metrics_page must be 'minimal' or 'full', got {self.metrics_page!r}")

    def sim_config(self) -> SimConfig:
        """The engines' configuration from ``sim_args`` (the ``matrixinfer-sim`` flags).

        Every engine of the fleet gets the same block-hash seed (``$PYTHONHASHSEED``, else
        ``"0"``) instead of a random one each: which blocks hit is the same either way (a block
        hash names its prefix), but the fleet's engines and runs then compute equal digests,
        which the process-wide hash memo (``sim.blockhash.memo``) computes once. Kept per
        process by the flags and ``$PYTHONHASHSEED`` (building the argument parser and the
        pydantic models cost ~1 ms a run); the configuration is never changed."""
        key = (self.model, self.sim_args, os.environ.get("PYTHONHASHSEED"))
        cfg = _SIM_CONFIGS.get(key)
        if cfg is None:
            cfg = _SIM_CONFIGS[key] = self._sim_config()
        return cfg

    def _sim_config(self) -> SimConfig:
        from sim.cli import build_config, serve_parser

        parser = serve_parser()
        parser.exit_on_error = False
        try:
            ns = parser.parse_args(["--model", self.model, *self.sim_args])
        except SystemExit:
            raise ValueError(f"sim_args {list(self.sim_args)} are not valid sim flags") from None
        cfg = build_config(ns)
        if cfg.engine.hash_seed is None:
            engine = cfg.engine.model_copy(update={"hash_seed": "0"})
            cfg = cfg.model_copy(update={"engine": engine})
        return cfg


def _index_event(e: sim_kvevents.KVEvent) -> kvindex.KVEvent:
    """A simulator KV event as the gateway's decoder hands it to the index."""
    if isinstance(e, sim_kvevents.BlockStored):
        parent = e.parent_block_hash
        return kvindex.BlockStored(
            tuple(_low64(h) for h in e.block_hashes),
            None if parent is None else _low64(parent),
            e.block_size,
        )
    if isinstance(e, sim_kvevents.BlockRemoved):
        return kvindex.BlockRemoved(tuple(_low64(h) for h in e.block_hashes))
    return kvindex.AllBlocksCleared()


def _low64(h: int | bytes) -> int:
    return h if isinstance(h, int) else int.from_bytes(h[-8:], "big")


MODEL_CONTENDERS: dict[str, Contender] = {
    "model-cache_aware": Contender(
        "model-cache_aware",
        "cache-aware-model",
        description="our model of vllm-router --policy cache_aware (bench.fleetsim.cache_aware)",
    ),
}
"""Contenders that exist only in virtual time: models of other routers' documented algorithms
(our own code, not theirs), to compare with our scheduler side by side."""


def contender_named(name: str) -> Contender:
    """A contender of ``bench.contenders.CONTENDERS`` that runs in virtual time, or one of
    :data:`MODEL_CONTENDERS`."""
    c = CONTENDERS.get(name) or MODEL_CONTENDERS.get(name)
    if c is None:
        known = ", ".join(sorted({*CONTENDERS, *MODEL_CONTENDERS}))
        raise ValueError(f"unknown contender {name!r}; known: {known}")
    if c.kind not in ("envoy-rr", "ours", "cache-aware-model"):
        raise ValueError(
            f"contender {name!r} ({c.description}) has no virtual-time model: only round-robin "
            "and our gateway's profiles are simulated"
        )
    return c


@dataclass(slots=True)
class SimRecord(RequestRecord):
    """``bench.loadgen.RequestRecord`` plus what only the simulation knows."""

    request_id: str = ""
    queue: float | None = None  # s from arrival at the engine to its first scheduling


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One pod at one instant: requests sent and not finished, the engine's queues and KV use."""

    t: float
    pod: str
    in_flight: int
    waiting: int
    running: int
    kv_usage: float


@dataclass(slots=True)
class SimResult:
    contender: str
    workload: str
    qps: float
    mode: str  # "open" | "probe" (closed loop, concurrency 1)
    pods: list[str]
    records: list[SimRecord]
    load: list[LoadSample]
    sim_seconds: float  # virtual time at the end
    wall_seconds: float  # CPU wall time the simulation took
    scrapes: int = 0

    def summary(self) -> Summary:
        ends = [r.sent + r.e2e for r in self.records if r.ok and r.e2e is not None]
        records: list[RequestRecord] = list(self.records)
        result = LoadResult(records, max(ends, default=1e-9), 0.0, self.mode, self.qps)
        return summarize(result)

    def point(self) -> dict[str, Any]:
        """The shape of ``bench.suite.run.PointResult`` (as JSON), for the suite's report code."""
        return {
            "contender": self.contender,
            "workload": self.workload,
            "mode": self.mode,
            "qps": self.qps,
            "summary": self.summary().as_dict(),
            "ttfts": sorted(r.ttft for r in self.records if r.ok and r.ttft is not None),
            "machine_busy": math.nan,
            "loadgen_cpu": 0.0,
            "cpu": {},
            "sim_state": {},
        }


# ------------------------------------------------------------------------------------ metrics


def metrics_page(engine: Engine, model: str, max_loras: int, now: float) -> str:
    """The series of the simulator's vLLM page that ``parse_metrics`` reads, same names, labels
    and values as ``sim.metrics.VllmCollector`` renders them (the rest of the page is skipped)."""
    s = engine.stats
    lab = f'{{model_name="{model}",engine="0"}}'
    return (
        f"vllm:num_requests_running{lab} {len(engine.running)}\n"
        f"vllm:num_requests_waiting{lab} {engine.num_waiting}\n"
        f"vllm:kv_cache_usage_perc{lab} {engine.kv_usage()!r}\n"
        f"vllm:time_to_first_token_seconds_sum{lab} {s.ttft.sum!r}\n"
        f"vllm:time_to_first_token_seconds_count{lab} {s.ttft.count}\n"
        f"vllm:inter_token_latency_seconds_sum{lab} {s.itl.sum!r}\n"
        f"vllm:inter_token_latency_seconds_count{lab} {s.itl.count}\n"
        f'vllm:lora_requests_info{{max_lora="{max_loras}",'
        f'waiting_lora_adapters="{",".join(engine.waiting_loras())}",'
        f'running_lora_adapters="{",".join(engine.running_loras())}"}} {now!r}\n'
    )


def engine_metrics(
    engine: Engine, max_loras: int, previous: LatencyState | None, now: float
) -> tuple[PodMetrics, LatencyState]:
    """What ``parse_metrics`` reads from :func:`metrics_page`, taken from the engine without the
    page (``fleet.engine_metrics.pod_metrics``): equal metrics and state, at a fifth of the cost
    of rendering and parsing the page."""
    s = engine.stats
    # Engine.running_loras and waiting_loras, unsorted
    running = frozenset({r.lora for r in engine.running if r.lora is not None})
    waiting = {r.lora for r in engine.waiting if r.lora is not None}
    if engine.transferring:
        waiting.update(r.lora for r in engine.transferring if r.lora is not None)
    return pod_metrics(
        float(engine.num_waiting),
        float(len(engine.running)),
        engine.kv_usage(),
        s.ttft.sum,
        float(s.ttft.count),
        s.itl.sum,
        float(s.itl.count),
        running,
        frozenset(waiting),
        max_loras,
        previous,
        now,
    )


# ------------------------------------------------------------------------------------ the fleet


@dataclass(slots=True, eq=False)
class _Pod:
    name: str
    engine: Engine
    batch: Batch | None = None
    in_flight: int = 0
    latency: LatencyState | None = None
    page: Callable[[float], str] | None = None  # full-page renderer ("full" mode)
    step_seq: int = 0  # heap sequence number of the pod's live step event (others are stale)
    # fast-forward: repeats of ``batch`` whose ends are not applied yet (``_catch_up``), the first
    # starting at ``ff_start`` and ending at ``ff_next``; the live step event is the end of the
    # repeat after them
    ff_left: int = 0
    ff_start: float = 0.0
    ff_next: float = 0.0


@dataclass(slots=True, eq=False)
class _Flight:
    """One request on its way: its record, its session, the gateway's state for it."""

    record: SimRecord
    session: TraceSession
    turn: int
    messages: list[tuple[str, str]]
    pod: _Pod | None = None
    state: Any = None  # extproc.gateway.RequestState (gateway contenders)
    last_token: float = 0.0


_ARRIVE, _STEP, _SCRAPE, _SAMPLE, _NEXT_SESSION, _AT_ENGINE = range(6)
_CLIENT_EVENTS = frozenset((_ARRIVE, _NEXT_SESSION, _AT_ENGINE))


def _settled(decision: Coroutine[Any, Any, Routed | Immediate]) -> Routed | Immediate:
    """Run ``Gateway.decide`` to its end without an event loop. Without policies no stage waits,
    so the coroutine finishes at its first step; a stage that would wait (the fair queue, Redis)
    is not simulated."""
    try:
        decision.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    decision.close()
    raise RuntimeError("gateway policies (decisions that wait) are not simulated")


# the gateway configuration of a fleet and contender, as the suite's YAML files load (writing and
# parsing them costs ~5 ms, a tenth of a short run); each simulation applies a deep copy
_CONFIGS: dict[tuple[Any, ...], GatewayConfig] = {}


def _gateway_config(
    hosts: list[SimPod], model: str, adapters: list[str], contender: Contender
) -> GatewayConfig:
    key = (
        tuple((h.name, h.host, h.port) for h in hosts),
        model,
        tuple(adapters),
        orjson.dumps(contender.profile, option=orjson.OPT_SORT_KEYS),
    )
    config = _CONFIGS.get(key)
    if config is None:
        with tempfile.TemporaryDirectory(prefix="fleetsim-") as tmp:
            directory = write_gateway_config(
                Path(tmp), hosts, model=model, adapters=adapters, profile=contender.profile
            )
            config = load_directory(directory)
        if len(_CONFIGS) >= 64:
            _CONFIGS.clear()
        _CONFIGS[key] = config
    return copy.deepcopy(config)


class _Simulation:
    def __init__(
        self,
        sessions: Sequence[TraceSession],
        fleet: FleetSpec,
        contender: Contender,
        *,
        seed: int,
        duration: float,
        drain_timeout: float,
        concurrency: int | None,
        default_profile: SchedulerProfile | None,
    ) -> None:
        self.default_profile = default_profile
        self.fleet = fleet
        self.contender = contender
        self.cfg = fleet.sim_config()
        self.engine_name = "SGLang" if self.cfg.engine_kind == "sglang" else "vLLM"
        self.sessions = list(sessions)
        self.duration = duration
        self.drain_timeout = drain_timeout
        self.concurrency = concurrency
        self.now = 0.0
        # (time, when pushed, sequence number, kind, data): events of one instant in the order
        # they were pushed (the sequence number alone would do, but a fast-forwarded step's event
        # is pushed early and carries the time the per-step loop would have pushed it at)
        self.events: list[tuple[float, float, int, int, Any]] = []
        self.pushed = 0.0  # when the event being handled was pushed
        self.seq = 0
        self.pending = 0  # client events (arrivals, sessions, HTTP hops) in the heap
        self.records: list[SimRecord] = []
        self.load: list[LoadSample] = []
        self.scrapes = 0
        self.adapters = frozenset(adapter_names(fleet.adapters))
        self.open: dict[str, _Flight] = {}
        self.queue: list[TraceSession] = []  # closed loop: sessions not started yet, last first
        self.rid = 0
        buckets = SGLANG_BUCKETS if self.cfg.engine_kind == "sglang" else VLLM_BUCKETS
        hosts = [SimPod(f"sim-{i}", f"127.0.0.{10 + i}", 8000) for i in range(fleet.replicas)]
        self.kv_index: KVBlockIndex | None = None
        if fleet.kv_events and contender.kind == "ours":
            self.kv_index = KVBlockIndex()
            for h in hosts:
                engine = self.cfg.engine
                self.kv_index.register(
                    h.name, engine.prefix_caching_hash_algo, engine.hash_seed or "0"
                )
        record = self.kv_index is not None
        self.pods = [
            _Pod(h.name, Engine(self.cfg.engine, buckets, record_events=record)) for h in hosts
        ]
        self.by_name = {p.name: p for p in self.pods}
        self.rr_rng = random.Random(f"envoy-rr/{seed}")
        self.rr_cursors = [
            self.rr_rng.randrange(fleet.replicas) for _ in range(fleet.envoy_workers)
        ]
        self.prompt_digests = self._prompt_digests()
        self.gateway: Gateway | None = None
        self.cache_aware: CacheAwareModel | None = None
        if contender.kind == "cache-aware-model":
            self.cache_aware = CacheAwareModel(fleet.replicas)
        elif contender.kind == "ours":
            self.gateway = self._gateway(hosts, seed)
            if fleet.metrics_page == "full" or self.engine_name != "vLLM":
                for p in self.pods:
                    p.page = self._renderer(p)
        elif contender.kind != "envoy-rr":
            raise ValueError(f"contender {contender.name!r} has no virtual-time model")

    # ---- set-up -------------------------------------------------------------------------------
    def _prompt_digests(self) -> _PromptDigests | None:
        """The fleet's prompt digests (None without prefix caching, or with a random hash seed:
        the engines' digests could not be computed here)."""
        engine = self.cfg.engine
        if not engine.enable_prefix_caching or engine.hash_seed is None:
            return None
        key = (engine.prefix_caching_hash_algo, engine.hash_seed, engine.block_size)
        found = _PROMPT_DIGESTS.get(key)
        if found is None:
            found = _PROMPT_DIGESTS[key] = _PromptDigests(ChainHasher(*key))
        assert found.hasher.root == self.pods[0].engine.kv.root
        return found

    def _gateway(self, hosts: list[SimPod], seed: int) -> Gateway:
        clock = self.clock
        config = _gateway_config(hosts, self.fleet.model, sorted(self.adapters), self.contender)
        if self.default_profile is not None:
            check_profile(self.default_profile)
            config.scheduler_profile = self.default_profile
        datastore = Datastore(clock=clock)
        datastore.apply(config)

        def factory(profile: Any) -> Any:
            rng = random.Random(f"scheduler/{seed}")
            return build_scheduler(profile, clock=clock, rng=rng, kv_index=self.kv_index)

        return Gateway(
            datastore,
            GatewayMetrics(),
            scheduler_factory=factory,
            rng=random.Random(f"gateway/{seed}"),
            clock=clock,
        )

    def _renderer(self, pod: _Pod) -> Callable[[float], str]:
        if self.engine_name == "SGLang":
            registry = make_registry(SglangCollector(pod.engine, self.fleet.model))
        else:
            collector = VllmCollector(
                pod.engine,
                self.fleet.model,
                LoraView(self.cfg.engine.max_loras),
                clock=self.clock,
            )
            registry = make_registry(collector)
        return lambda now: render(registry).decode()

    def clock(self) -> float:
        return self.now

    def close(self) -> None:
        """Drop the fleet and the gateway: the gateway holds this object's clock, so they are
        freed now (by reference counts) instead of by the next cyclic collection, which would
        first walk them all - engines, pools, open requests' token-id lists."""
        self.gateway = None
        self.pods = []
        self.by_name = {}
        self.events = []
        self.open = {}
        self.kv_index = None

    def push(self, t: float, kind: int, data: Any) -> None:
        self.seq += 1
        if kind in _CLIENT_EVENTS:
            self.pending += 1
        heapq.heappush(self.events, (t, self.now, self.seq, kind, data))

    def busy(self) -> bool:
        """Requests open or still to be sent: the periodic scrapes and samples go on."""
        return bool(self.open) or self.pending > 0

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        if self.concurrency is None:
            for s in self.sessions:
                if s.arrival <= self.duration:
                    self.push(s.arrival, _ARRIVE, (s, 0, []))
        else:
            self.queue = list(reversed(self.sessions))
            for _ in range(self.concurrency):
                self.push(0.0, _NEXT_SESSION, None)
        last_start = max((e[0] for e in self.events), default=0.0)
        self.deadline = (
            last_start + self.drain_timeout
            if self.concurrency is None
            else self.duration + self.drain_timeout
        )
        if self.gateway is not None:
            iv = self.fleet.scrape_interval
            for p in self.pods:
                self.push(_phase(p.name) * iv, _SCRAPE, p)
        self.push(0.0, _SAMPLE, None)
        events = self.events
        pop = heapq.heappop
        deadline = self.deadline
        step_end = self._step_end
        while events:
            t, pushed, seq, kind, data = pop(events)
            if t > deadline:
                break
            if kind == _STEP:  # most events by far
                if seq == data.step_seq:  # else cut short by a fast-forward's end (_cut)
                    self.now = t
                    step_end(data)
                continue
            self.now = t
            self.pushed = pushed
            if kind in _CLIENT_EVENTS:
                self.pending -= 1
            if kind == _ARRIVE:
                self._send(*data)
            elif kind == _SCRAPE:
                self._scrape(data)
                if self.busy():
                    self.push(t + self.fleet.scrape_interval, _SCRAPE, data)
            elif kind == _SAMPLE:
                self._sample()
                if self.busy():
                    self.push(t + self.fleet.load_sample_interval, _SAMPLE, None)
            elif kind == _AT_ENGINE:
                self._engine_add(*data)
            elif kind == _NEXT_SESSION:
                self._next_session()
        else:
            deadline = math.inf
        # the steps a per-step loop would have run up to the deadline
        for p in self.pods:
            if p.ff_left:
                last = self._catch_up(p, deadline, inclusive=True)
                if last > self.now:
                    self.now = last
        for flight in list(self.open.values()):
            flight.record.error = "cancelled: still open at the drain deadline"
            self._release(flight)

    def _next_session(self) -> None:
        if self.queue and self.now < self.duration:
            s = self.queue.pop()
            self._send(s, 0, [])

    # ---- a request ----------------------------------------------------------------------------
    def _send(self, session: TraceSession, turn: int, history: list[tuple[str, str]]) -> None:
        now = self.now
        self.rid += 1
        rid = f"req-{self.rid}"
        rec = SimRecord(session.session, turn, now, now, request_id=rid)
        self.records.append(rec)
        messages = history
        if session.prompt_ids is None:
            if turn == 0:
                messages = list(session.prefix)
            messages.append(("user", session.turns[turn]))
            path = "/v1/chat/completions"
            body: dict[str, Any] = {
                "model": session.model,
                "messages": [{"role": r, "content": c} for r, c in messages],
            }
        else:
            path = "/v1/completions"
            body = {"model": session.model, "prompt": list(session.prompt_ids)}
        body["max_tokens"] = session.max_tokens
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        flight = _Flight(rec, session, turn, messages)
        model = session.model
        if self.cache_aware is not None:
            if session.prompt_ids is None:
                text = "".join(c for _r, c in messages)
            else:
                text = " ".join(map(str, session.prompt_ids))
            pod = self.pods[self.cache_aware.choose(text, [p.in_flight for p in self.pods])]
        elif self.gateway is None:
            cursors = self.rr_cursors
            worker = self.rr_rng.randrange(len(cursors)) if len(cursors) > 1 else 0
            pod = self.pods[cursors[worker]]
            cursors[worker] = (cursors[worker] + 1) % len(self.pods)
        else:
            raw = orjson.dumps(body)
            headers = {
                ":method": "POST",
                ":path": path,
                ":authority": "gateway",
                "content-type": "application/json",
                "content-length": str(len(raw)),
                "x-request-id": rid,
            }
            gw = self.gateway
            if self.kv_index is not None:
                self._feed_kv_events(self.kv_index)
            state, immediate = gw.start(headers, False)
            flight.state = state
            decided = immediate if immediate is not None else _settled(gw.decide(state, raw))
            if isinstance(decided, Immediate):
                self._fail(flight, decided.status, decided.body.decode(errors="replace"))
                return
            gw.routed(state)
            pod = self.by_name[decided.pod.name]
            if decided.body is not None:
                model = orjson.loads(decided.body)["model"]
        flight.pod = pod
        pod.in_flight += 1
        self.open[rid] = flight
        rec.pod = pod.name
        if self.fleet.http_latency > 0:
            self.push(now + self.fleet.http_latency, _AT_ENGINE, (flight, pod, model))
        else:
            self._engine_add(flight, pod, model)

    def _feed_kv_events(self, index: KVBlockIndex) -> None:
        """Every pod's KV events since the last call into the gateway's index."""
        for pod in self.pods:
            events = pod.engine.kv.take_events()
            if events:
                index.apply(pod.name, [_index_event(e) for e in events])

    def _engine_add(self, flight: _Flight, pod: _Pod, model: str) -> None:
        """What ``SimServer._build`` and ``EngineDriver.submit`` do with the request."""
        session = flight.session
        if model == self.fleet.model:
            lora = None
        elif model in self.adapters:
            lora = model
        else:
            self._fail(flight, 404, f"The model `{model}` does not exist.")
            return
        digests: list[BlockHash] | None = None
        if session.prompt_ids is None:
            # the prompt and its output-plan hash, a message at a time (xxh64 streamed over the
            # parts is xxh64 of their concatenation)
            ids = []
            hasher = xxhash.xxh64(seed=self.cfg.seed)
            parts = self._chat_parts(flight.messages)
            for part, raw in parts:
                ids += part
                hasher.update(raw)
            h = hasher.intdigest()
            if self.prompt_digests is not None:
                extra = (lora,) if lora is not None else None
                digests = self.prompt_digests.digests(flight.messages, parts, extra)
        else:
            ids = list(session.prompt_ids)
            bad = [x for x in ids if not 0 <= x < VOCAB_SIZE]
            if bad:
                self._fail(flight, 400, f"invalid request: token id {bad[0]} out of vocabulary")
                return
            h = xxhash.xxh64_intdigest(array.array("i", ids).tobytes(), seed=self.cfg.seed)
        n = session.max_tokens
        if len(ids) + n > self.cfg.engine.max_model_len:
            self._fail(flight, 400, f"{len(ids)} + {n} tokens exceed the maximum context length")
            return
        out = _PLANS.get((h, n))
        if out is None:
            if len(_PLANS) >= 8192:
                _PLANS.clear()
            out = _PLANS[h, n] = random.Random(h).choices(OUTPUT_WORD_IDS, k=n)
        req = Request(flight.record.request_id, ids, out, self.now, "length", lora)
        req.waiter = flight
        if digests is not None:
            req.block_hashes = digests  # what the engine's first prefix lookup computes
        if pod.ff_left:
            self._catch_up(pod, self.now)
            self._cut(pod)
        try:
            pod.engine.add(req)
        except QueueFull as exc:
            self._fail(flight, 429, str(exc))
            return
        if pod.batch is None:
            self._schedule_step(pod)

    @staticmethod
    def _chat_parts(messages: list[tuple[str, str]]) -> list[_Part]:
        """``Tokenizer.encode(apply_chat_template(messages))`` in cached pieces, one per message
        and the generation prompt: the template ends every message with a newline, and
        whitespace never joins two tokens."""
        cache = _TEMPLATE
        parts: list[_Part] = []
        for m in messages:
            part = cache.get(m)
            if part is None:
                if len(cache) > 20_000:
                    cache.clear()
                part = cache[m] = _part(_TOKENIZER.encode(f"<|{m[0]}|>\n{m[1]}\n"))
            parts.append(part)
        parts.append(_GENERATION_PROMPT)
        return parts

    @staticmethod
    def _encode_chat(messages: list[tuple[str, str]]) -> list[int]:
        """The prompt's token ids (``_chat_parts`` joined)."""
        ids: list[int] = []
        for part, _raw in _Simulation._chat_parts(messages):
            ids += part
        return ids

    def _fail(self, flight: _Flight, status: int, text: str) -> None:
        flight.record.status = status
        flight.record.error = f"http {status}: {text[:200]}"
        self._release(flight)

    def _release(self, flight: _Flight) -> None:
        if self.gateway is not None and flight.state is not None:
            self.gateway.finish(flight.state)
            flight.state = None
        if flight.pod is not None:
            flight.pod.in_flight -= 1
            flight.pod = None
        self.open.pop(flight.record.request_id, None)
        if self.concurrency is not None and flight.record.error:
            self.push(self.now, _NEXT_SESSION, None)

    # ---- the engines --------------------------------------------------------------------------
    def _schedule_step(self, pod: _Pod) -> None:
        batch = pod.engine.schedule(self.now)
        pod.batch = batch
        if batch is not None:
            start = batch.start
            end = start + batch.duration
            if self.fleet.fast_forward and batch.duration > 0:
                # the next steps repeat this one until a request finishes or one is added: one
                # event at the end of the last repeat, the ones before applied when needed
                repeats = pod.engine.decode_repeats(batch)
                if repeats > 0:
                    pod.ff_left = repeats
                    pod.ff_start = start
                    pod.ff_next = end
                    duration = batch.duration
                    for _ in range(repeats):
                        start = end
                        end += duration  # as the per-step loop sums the ends: start + duration
            self.seq += 1  # self.push, inlined: a step is not a client event
            pod.step_seq = self.seq
            heapq.heappush(self.events, (end, start, self.seq, _STEP, pod))

    def _catch_up(self, pod: _Pod, t: float, *, inclusive: bool = False) -> float:
        """Apply the pod's fast-forwarded step ends that the per-step loop would have handled
        before the event being handled at ``t``, engine and records (at ``t`` too if
        ``inclusive``); the last end applied. A step ending at ``t`` came first if its event
        was pushed (at the step's start) before this event was."""
        batch = pod.batch
        assert batch is not None
        ends: list[float] = []
        start, nxt, left, duration = pod.ff_start, pod.ff_next, pod.ff_left, batch.duration
        pushed = self.pushed
        while left and (nxt < t or (nxt == t and (inclusive or start < pushed))):
            ends.append(nxt)
            start = nxt
            nxt += duration
            left -= 1
        pod.ff_start, pod.ff_next, pod.ff_left = start, nxt, left
        if not ends:
            return -math.inf
        pod.engine.repeat_decode(batch, ends)
        # each token's gap from the one before: the first from the request's last token, the
        # others from the step before (every request's)
        first, last = ends[0], ends[-1]
        gaps = [b - a for a, b in itertools.pairwise(ends)]
        for req in batch.reqs:
            flight: _Flight = req.waiter
            itl = flight.record.itl
            itl.append(first - flight.last_token)
            itl += gaps
            flight.last_token = last
        return last

    def _cut(self, pod: _Pod) -> None:
        """End the pod's fast-forward at the step now running (a request arrives): its end
        becomes the pod's live step event; the next steps are planned one by one again."""
        if not pod.ff_left:
            return
        batch = pod.batch
        assert batch is not None
        start, end = pod.ff_start, pod.ff_next
        pod.batch = Batch(start, batch.duration, batch.reqs, batch.num_new, 0, len(batch.reqs))
        pod.ff_left = 0
        self.seq += 1
        pod.step_seq = self.seq
        heapq.heappush(self.events, (end, start, self.seq, _STEP, pod))

    def _step_end(self, pod: _Pod) -> None:
        batch = pod.batch
        assert batch is not None
        now = self.now
        if pod.ff_left:
            self._catch_up(pod, now, inclusive=True)
        for req in pod.engine.finish_step(batch, now):
            flight: _Flight = req.waiter
            rec = flight.record
            if rec.ttft is None:
                rec.ttft = now - rec.sent
            else:
                rec.itl.append(now - flight.last_token)
            flight.last_token = now
            if req.status >= FINISHED:  # req.done, inlined
                self._done(flight, req)
        pod.batch = None
        if pod.engine.has_work():
            self._schedule_step(pod)

    def _done(self, flight: _Flight, req: Request) -> None:
        now = self.now
        rec = flight.record
        rec.status = 200
        rec.e2e = now - rec.sent
        rec.output_tokens = req.num_output
        rec.prompt_tokens = req.prompt_len
        rec.cached_tokens = req.num_cached_tokens
        if req.first_scheduled is not None:
            rec.queue = req.first_scheduled - req.arrival
        req.waiter = None
        self._release(flight)
        session = flight.session
        if flight.turn + 1 < session.requests:
            answer = " ".join(_WORD[t] for t in req.output_ids[: req.num_output])
            flight.messages.append(("assistant", answer))
            self.push(
                now + session.think_time, _ARRIVE, (session, flight.turn + 1, flight.messages)
            )
        elif self.concurrency is not None:
            self.push(now, _NEXT_SESSION, None)

    # ---- scrapes and samples ------------------------------------------------------------------
    def _scrape(self, pod: _Pod) -> None:
        now = self.now
        if pod.ff_left:
            self._catch_up(pod, now)
        if pod.page is not None:
            text = pod.page(now)
            metrics, pod.latency = parse_metrics(text, self.engine_name, pod.latency, now)
        else:
            metrics, pod.latency = engine_metrics(
                pod.engine, self.cfg.engine.max_loras, pod.latency, now
            )
        # loaded_loras stays unknown (None), as the datastore keeps it: a list without the time
        # of its read (loras_read_at) is one it drops (copying the metrics for that each scrape)
        assert self.gateway is not None
        self.gateway.datastore.publish_metrics(pod.name, metrics)
        self.scrapes += 1

    def _sample(self) -> None:
        now = self.now
        for p in self.pods:
            if p.ff_left:
                self._catch_up(p, now)
            e = p.engine
            self.load.append(
                LoadSample(now, p.name, p.in_flight, e.num_waiting, len(e.running), e.kv_usage())
            )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a simulation runs (collected after it, as usual).

    A run allocates a few hundred thousand short-lived objects (token-id lists, records, events),
    and each of the collector's passes it triggers walks the process's long-lived objects too -
    the warm token-id, plan and digest caches, lists of thousands of ids each: ~5 % of a loaded
    run. Nothing the simulation computes depends on when garbage is collected."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def simulate(
    sessions: Sequence[TraceSession],
    contender: str | Contender,
    *,
    fleet: FleetSpec | None = None,
    seed: int = 0,
    duration: float | None = None,
    drain_timeout: float = 30.0,
    concurrency: int | None = None,
    workload: str = "",
    qps: float = math.nan,
    default_profile: SchedulerProfile | None = None,
) -> SimResult:
    """Run ``sessions`` through ``contender`` on a virtual fleet; deterministic for ``seed``.

    ``duration``: no session starts after it (default: the last arrival). ``concurrency``: closed
    loop with that many clients (sessions back to back, arrivals ignored) instead of open loop.
    ``default_profile``: the gateway-wide default scheduler profile (the one a ModelServer without
    ``scheduler`` uses, as ``ours-default``'s does); unlike a ModelServer's, its weights may be
    fractional.
    """
    if isinstance(contender, str):
        contender = contender_named(contender)
    fleet = fleet or FleetSpec()
    if duration is None:
        duration = max((s.arrival for s in sessions), default=0.0)
    began = time.perf_counter()
    with _gc_paused():
        sim = _Simulation(
            sessions,
            fleet,
            contender,
            seed=seed,
            duration=duration,
            drain_timeout=drain_timeout,
            concurrency=concurrency,
            default_profile=default_profile,
        )
        sim.run()
        result = SimResult(
            contender=contender.name,
            workload=workload,
            qps=qps if concurrency is None else 0.0,
            mode="open" if concurrency is None else "probe",
            pods=[p.name for p in sim.pods],
            records=sim.records,
            load=sim.load,
            sim_seconds=sim.now,
            wall_seconds=time.perf_counter() - began,
            scrapes=sim.scrapes,
        )
        sim.close()
    return result
