"""The routing-quality gate in virtual time, and the fleet simulator's own behaviour.

Seeded workloads run through round-robin and our gateway's profiles on a virtual 8-pod fleet (the
suite's sim flags): the real Gateway, Datastore, scheduler plugins and metrics parser against
``sim.engine.Engine`` instances. Everything is deterministic for the seed; the checks are ratios
between contenders, never wall-clock timings. A change to a scorer or to the default weights
that makes routing worse fails here with the table of reference (before) and current (after)
numbers.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from bench.fleetsim import (
    FleetSpec,
    SimResult,
    TraceError,
    TraceSession,
    dump_jsonl,
    load_jsonl,
    make_workload,
    simulate,
)
from bench.fleetsim.core import (
    _PromptDigests,
    _Simulation,
    contender_named,
    engine_metrics,
    metrics_page,
)
from bench.fleetsim.report import comparison_table, summary_table
from bench.fleetsim.tune import apply, parse_param, tune
from fleet.engine_metrics import parse_metrics
from fleet.profile import DEFAULT_PROFILE, PluginSpec, SchedulerProfile
from sim.blockhash import ChainHasher, chain, hash_fn, root_hash
from sim.tokenizer import Tokenizer, apply_chat_template

ROOT = Path(__file__).resolve().parents[2]
CONTENDERS = ("envoy-rr", "ours-default", "ours-prefix", "ours-least-request")
SEED = 3
DURATION = 8.0

# the gate's workloads: name -> workload spec (bench.fleetsim.trace.make_workload)
WORKLOADS = {
    "shared-prefix": "shared_prefix:qps=30,groups=16,system_tokens=4000,question_tokens=24",
    "zipf-cache-pressure": "zipf_prefix:qps=30,groups=48,zipf=1.1,system_tokens=2000",
    "multi-turn": "multi_turn:qps=16",
    # 20 QPS: at 24 the default profile's lora-capable filter answers 503 for some requests (every
    # pod runs max_lora other adapters) - see bench/reports/fleetsim.md
    "lora-mix": "lora_mix:qps=20,prompt_tokens=600",
}

# what the code measured when the gate was written (seed 3): the "before" column of the failure
# table. Not asserted: the checks below are ratios; update these when a change is meant.
REFERENCE = {
    ("shared-prefix", "envoy-rr"): {"ttft_p90": 3.665, "cached_fraction": 0.22},
    ("shared-prefix", "ours-default"): {"ttft_p90": 0.306, "cached_fraction": 0.82},
    ("zipf-cache-pressure", "envoy-rr"): {"ttft_p50": 0.162, "cached_fraction": 0.41},
    ("zipf-cache-pressure", "ours-default"): {"ttft_p50": 0.020, "cached_fraction": 0.78},
    ("multi-turn", "envoy-rr"): {"ttft_p90": 0.083, "cached_fraction": 0.15},
    ("multi-turn", "ours-default"): {"ttft_p90": 0.052, "cached_fraction": 0.74},
    ("lora-mix", "envoy-rr"): {"ttft_p90": 0.078},
    ("lora-mix", "ours-default"): {"ttft_p90": 0.074},
}


@dataclass(frozen=True)
class Rule:
    """``metric(ours) <= factor x metric(baseline) + offset`` (or >= for ``higher_is_better``)."""

    metric: str
    factor: float
    offset: float = 0.0
    higher_is_better: bool = False
    ours: str = "ours-default"
    baseline: str = "envoy-rr"

    def check(self, results: dict[str, SimResult]) -> str | None:
        a = getattr(results[self.ours].summary(), self.metric)
        b = getattr(results[self.baseline].summary(), self.metric)
        bound = self.factor * b + self.offset
        ok = a >= bound if self.higher_is_better else a <= bound
        if ok:
            return None
        op = ">=" if self.higher_is_better else "<="
        return (
            f"{self.ours} {self.metric} {a:.4g} is not {op} {bound:.4g} "
            f"({self.factor:g} x {self.baseline}'s {b:.4g} + {self.offset:g})"
        )


RULES: dict[str, list[Rule]] = {
    "shared-prefix": [
        Rule("ttft_p90", 0.5),  # the example gate
        Rule("cached_fraction", 1.0, 0.4, higher_is_better=True),
        Rule("output_tok_per_s", 1.3, higher_is_better=True),
    ],
    "zipf-cache-pressure": [
        Rule("cached_fraction", 1.0, 0.3, higher_is_better=True),
        Rule("ttft_p50", 0.5),
        Rule("ttft_p90", 1.1),
    ],
    "multi-turn": [
        Rule("cached_fraction", 1.0, 0.4, higher_is_better=True),
        Rule("ttft_p90", 0.8),
    ],
    # at this load round-robin spreads the adapters well; the default profile must stay close to
    # it and far ahead of prefix-only placement, which piles requests up
    "lora-mix": [Rule("ttft_p90", 1.5), Rule("ttft_p90", 0.5, baseline="ours-prefix")],
}

_sessions: dict[str, list[TraceSession]] = {}


def sessions(name: str) -> list[TraceSession]:
    if name not in _sessions:
        _sessions[name] = make_workload(WORKLOADS[name], seed=SEED, duration=DURATION)
    return _sessions[name]


def run_case(
    name: str,
    contenders: tuple[str, ...] = CONTENDERS,
    default_profile: SchedulerProfile | None = None,
) -> dict[str, SimResult]:
    return {
        c: simulate(
            sessions(name),
            c,
            seed=SEED,
            workload=name,
            qps=30.0,
            default_profile=default_profile if c == "ours-default" else None,
        )
        for c in contenders
    }


def failures(name: str, results: dict[str, SimResult]) -> list[str]:
    out = [msg for rule in RULES[name] if (msg := rule.check(results)) is not None]
    expected = sum(s.requests for s in sessions(name))
    for c, res in results.items():
        s = res.summary()
        if s.errors or s.requests != expected:
            out.append(f"{c} lost requests: {s.ok} ok of {expected} ({s.error_kinds})")
    return out


def failure_report(name: str, results: dict[str, SimResult], problems: list[str]) -> str:
    rows = []
    for (case, contender), metrics in REFERENCE.items():
        if case == name and contender in results:
            summary = results[contender].summary()
            for metric, before in metrics.items():
                rows.append((f"{case} {contender}", metric, before, getattr(summary, metric)))
    return "\n".join(
        [
            f"routing got worse on '{name}':",
            *(f"- {p}" for p in problems),
            "",
            comparison_table(rows, ("reference (before)", "now (after)")),
            "",
            summary_table(list(results.values())),
        ]
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_routing_quality_gate(name: str) -> None:
    results = run_case(name)
    problems = failures(name, results)
    assert not problems, failure_report(name, results, problems)


@pytest.mark.timeout(60)
def test_gate_fails_a_default_profile_without_the_prefix_scorer() -> None:
    """The gate can fail: the default profile with prefix-cache weight 0 (or random-only scoring)
    misses the shared-prefix and multi-turn checks, and the report shows before and after."""
    no_prefix = apply(DEFAULT_PROFILE, {"prefix-cache.weight": 0})
    for name in ("shared-prefix", "multi-turn"):
        results = run_case(name, ("envoy-rr", "ours-default"), no_prefix)
        problems = failures(name, results)
        assert problems, name
        report = failure_report(name, results, problems)
        assert "reference (before)" in report and "| ours-default |" in report
    random_only = SchedulerProfile(
        filters=DEFAULT_PROFILE.filters, scorers=[PluginSpec(name="random")]
    )
    results = run_case("shared-prefix", ("envoy-rr", "ours-default"), random_only)
    assert any("ttft_p90" in p for p in failures("shared-prefix", results))


# ------------------------------------------------------------------------- the simulator itself


def test_deterministic_for_the_seed_in_any_process() -> None:
    """Same seed: the same pods, TTFTs and cache hits, whatever PYTHONHASHSEED says."""
    code = (
        "from bench.fleetsim import simulate, make_workload;"
        f"wl = make_workload({WORKLOADS['lora-mix']!r}, seed={SEED}, duration=4);"
        "r = simulate(wl, 'ours-default', seed=5);"
        "print(repr([(x.pod, x.ttft, x.e2e, x.cached_tokens) for x in r.records]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    wl = make_workload(WORKLOADS["lora-mix"], seed=SEED, duration=4)
    here = simulate(wl, "ours-default", seed=5)
    assert out == repr([(x.pod, x.ttft, x.e2e, x.cached_tokens) for x in here.records])
    other = simulate(wl, "ours-default", seed=6)  # the seed reaches the scheduler's tie-breaks
    assert [x.pod for x in other.records] != [x.pod for x in here.records]


def test_the_gateway_is_driven_as_the_extproc_drives_it() -> None:
    """In-flight counts return to zero (begin/finish paired), every pod was scraped into the
    datastore at the scrape interval, and the prefix scorer was credited (on_routed)."""
    wl = make_workload(WORKLOADS["shared-prefix"], seed=SEED, duration=3)
    sim = _Simulation(
        wl,
        FleetSpec(),
        contender_named("ours-default"),
        seed=SEED,
        duration=3,
        drain_timeout=30,
        concurrency=None,
        default_profile=None,
    )
    sim.run()
    assert sim.gateway is not None
    pods = sim.gateway.datastore.snapshot.pods
    assert len(pods) == 8 and all(p.in_flight == 0 for p in pods.values())
    assert all(not p.metrics.stale and p.metrics.scraped_at > 2.5 for p in pods.values())
    # 8 pods scraped every 0.2 virtual s for the whole run
    assert sim.scrapes >= 8 * int(sim.now / 0.2) - 8
    (scheduler,) = [s for _, s in sim.gateway._schedulers.values()]
    prefix = next(p for p, _ in scheduler.scorers if p.name == "prefix-cache")
    assert sum(prefix.index.size(n) for n in pods) > 0
    assert all(r.ok for r in sim.records) and len(sim.records) == len(wl)


def test_round_robin_spreads_evenly_and_records_every_metric() -> None:
    wl = make_workload("long_context:qps=8", seed=SEED, duration=4)
    res = simulate(wl, "envoy-rr", fleet=FleetSpec(envoy_workers=1))
    counts = res.summary().pods
    assert len(counts) == 8 and max(counts.values()) - min(counts.values()) <= 1
    seq = [r.pod for r in res.records]
    assert all(a != b for a, b in itertools.pairwise(seq))
    # Envoy's 2 workers: two interleaved cursors, so a pod may take two requests in a row
    two = [r.pod for r in simulate(wl, "envoy-rr").records]
    assert len(set(two)) == 8 and any(a == b for a, b in itertools.pairwise(two))
    for r in res.records:
        assert r.ttft is not None and r.e2e is not None and r.e2e >= r.ttft > 0
        assert r.queue is not None and r.queue >= 0
        assert len(r.itl) == r.output_tokens - 1 == 63
    assert {s.pod for s in res.load} == set(res.pods)
    assert max(s.in_flight for s in res.load) > 0


def test_minimal_metrics_page_parses_like_the_simulators_whole_page() -> None:
    """The cheap page gives the same PodMetrics as the sim's real /metrics page, and a run with
    either gives the same routing."""
    wl = make_workload(WORKLOADS["lora-mix"], seed=SEED, duration=3)
    sim = _Simulation(
        wl,
        FleetSpec(metrics_page="full"),
        contender_named("ours-default"),
        seed=SEED,
        duration=1.5,
        drain_timeout=30,
        concurrency=None,
        default_profile=None,
    )
    sim.run()
    busy = [p for p in sim.pods if p.engine.stats.ttft.count]
    assert busy
    for pod in busy:
        assert pod.page is not None
        full = pod.page(sim.now)
        mini = metrics_page(pod.engine, "bench-model", sim.cfg.engine.max_loras, sim.now)
        assert parse_metrics(full, "vLLM", None, sim.now) == parse_metrics(
            mini, "vLLM", None, sim.now
        )
    a = simulate(wl, "ours-default", fleet=FleetSpec(metrics_page="full"))
    b = simulate(wl, "ours-default")
    assert [r.pod for r in a.records] == [r.pod for r in b.records]


@pytest.mark.parametrize("spec", [WORKLOADS["lora-mix"], WORKLOADS["shared-prefix"]])
def test_engine_metrics_read_like_the_minimal_page(spec: str) -> None:
    """At every scrape of a run, the metrics taken from the engine equal the minimal page's
    parsed (with the same previous latency state), LoRA adapters and interval means included."""
    compared = []

    class Checked(_Simulation):
        def _scrape(self, pod: Any) -> None:
            now, max_loras = self.now, self.cfg.engine.max_loras
            if pod.ff_left:
                self._catch_up(pod, now)
            page = metrics_page(pod.engine, "bench-model", max_loras, now)
            want = parse_metrics(page, "vLLM", pod.latency, now)
            assert engine_metrics(pod.engine, max_loras, pod.latency, now) == want
            compared.append(want[0])
            super()._scrape(pod)

    sim = Checked(
        make_workload(spec, seed=SEED, duration=3),
        FleetSpec(),
        contender_named("ours-default"),
        seed=SEED,
        duration=3,
        drain_timeout=30,
        concurrency=None,
        default_profile=None,
    )
    sim.run()
    assert len(compared) == sim.scrapes > 100
    assert any(m.running_loras for m in compared) == ("lora" in spec)
    assert any(m.waiting for m in compared)
    assert any(m.ttft_seconds for m in compared) and any(m.tpot_seconds for m in compared)


def test_prompt_digests_are_the_engines_block_hashes() -> None:
    """A chat prompt's digests, a message at a time through the kept pieces, are ``chain``'s over
    the whole prompt: for a LoRA request, a conversation's later turn and a prompt shorter than a
    block."""
    algo, seed, bs = "sha256", "0", 16
    digests = _PromptDigests(ChainHasher(algo, seed, bs))
    fn, root = hash_fn(algo), root_hash(algo, seed)
    system = ("system", "You answer briefly. " * 60)
    turns = [
        [system, ("user", "what is a block?")],
        [system, ("user", "what is a block?"), ("assistant", "a page"), ("user", "and a pod?")],
        [system, ("user", "what is a pod?")],
        [("user", "hi")],
    ]
    for extra in (None, ("adapter-1",)):
        for messages in turns * 2:
            parts = _Simulation._chat_parts(messages)
            ids = [t for part, _raw in parts for t in part]
            got = digests.digests(messages, parts, extra)
            assert got == chain(fn, root, ids, bs, extra)
    # each message (and the generation prompt after it) kept once per extra: 3 + 3 + 2 + 2
    assert len(digests.pieces) == 2 * 10


def test_http_latency_delays_the_engine_arrival() -> None:
    one = [TraceSession(arrival=1.0, model="bench-model", max_tokens=4, turns=("hello there",))]
    for contender in ("envoy-rr", "ours-default"):
        base = simulate(one, contender).records[0]
        slow = simulate(one, contender, fleet=FleetSpec(http_latency=0.006)).records[0]
        assert base.ttft is not None and slow.ttft is not None
        assert slow.ttft == pytest.approx(base.ttft + 0.006)


def test_chat_prompts_tokenise_as_the_simulator_does() -> None:
    messages = [("system", "You are x. abcd efgh?"), ("user", "internationalization, ok")]
    ids = _Simulation._encode_chat(list(messages))
    assert ids == Tokenizer().encode(apply_chat_template(messages))


def test_multi_turn_history_hits_the_cache_and_closed_loop_runs_back_to_back() -> None:
    wl = make_workload("multi_turn:qps=4,turns=3", seed=SEED, duration=3)
    res = simulate(wl, "ours-default")
    later = [r for r in res.records if r.turn > 0]
    assert later and all(r.cached_tokens > 0.8 * r.prompt_tokens for r in later if r.ok)
    probe = simulate(wl[:3], "envoy-rr", concurrency=1, duration=100)
    sent = sorted((r.sent, r.sent + (r.e2e or 0)) for r in probe.records)
    assert len(sent) == 9 and all(b[0] >= a[1] for a, b in itertools.pairwise(sent))


def test_trace_jsonl_round_trip_and_token_id_prompts(tmp_path: Path) -> None:
    wl = make_workload("multi_turn:qps=2,turns=2", seed=SEED, duration=2)
    wl.append(TraceSession(arrival=1.0, model="bench-model", max_tokens=8, prompt_ids=(1500,) * 40))
    path = tmp_path / "trace.jsonl"
    dump_jsonl(wl, path)
    back = load_jsonl(path)
    assert back == sorted(wl, key=lambda s: s.arrival)
    res = simulate(back, "ours-default")
    ids = [r for r in res.records if r.tag == "" and r.prompt_tokens == 40]
    assert len(ids) == 1 and ids[0].ok and ids[0].output_tokens == 8


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"arrival": 0, "model": "m", "max_tokens": 4}', "either 'turns'"),
        ('{"arrival": -1, "model": "m", "max_tokens": 4, "turns": ["x"]}', "field 'arrival'"),
        ('{"arrival": 0, "model": "m", "max_tokens": 4, "turns": ["x"], "extra": 1}', "'extra'"),
        ("[1, 2", "not a JSON object"),
    ],
)
def test_bad_trace_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival": 0, "model": "m", "max_tokens": 4, "turns": ["ok"]}\n' + line)
    with pytest.raises(TraceError, match=rf"bad.jsonl:2: .*{message}"):
        load_jsonl(path)


def test_unknown_models_and_vllm_router_are_errors_not_crashes() -> None:
    unknown = [
        TraceSession(arrival=0.1, model="bench-lora-9", max_tokens=4, turns=("hi",)),
        TraceSession(arrival=0.2, model="bench-model", max_tokens=9000, turns=("hi",)),
    ]
    for contender, first in (("envoy-rr", "http 404"), ("ours-default", "http 404")):
        res = simulate(unknown, contender)
        assert [r.error.split(":")[0] for r in res.records] == [first, "http 400"], contender
    with pytest.raises(ValueError, match="no virtual-time model"):
        simulate([], "vllm-router-cache_aware")
    with pytest.raises(TraceError, match="unknown workload 'nope'"):
        make_workload("nope:qps=1", seed=1, duration=1)


def test_tune_ranks_settings_and_names_bad_parameters() -> None:
    wl = [("shared", make_workload(WORKLOADS["shared-prefix"], seed=SEED, duration=4))]
    params = [parse_param("prefix-cache.weight=0,2")]
    _, settings = tune(wl, params, seeds=(SEED,))
    assert [s.values for s in settings] == [
        {"prefix-cache.weight": 2},
        {"prefix-cache.weight": 0},
    ]
    assert settings[0].ratio == pytest.approx(1.0) and settings[1].ratio > 2
    with pytest.raises(ValueError, match="no plugin 'nope'"):
        apply(DEFAULT_PROFILE, {"nope.slack": 1})
    with pytest.raises(ValueError, match="filters have no weight"):
        apply(DEFAULT_PROFILE, {"saturation.weight": 1})
    with pytest.raises(ValueError, match="not a number"):
        parse_param("prefix-cache.weight=a")
    with pytest.raises(ValueError, match="max_waiting"):
        tune(wl, [parse_param("saturation.max_waiting=-1")])


def test_cli_run_prints_the_suite_table(tmp_path: Path) -> None:
    from bench.fleetsim.__main__ import main

    code = main(
        ["run", "--workload", "shared_prefix:qps=10,groups=4,system_tokens=500", "--duration",
         "2", "--contenders", "envoy-rr,ours-default", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    lines = (tmp_path / "fleetsim-ours-default-shared_prefix-10.requests.jsonl").read_text()
    first = json.loads(lines.splitlines()[0])
    assert {"ttft", "itl", "e2e", "queue", "cached_tokens", "pod"} <= set(first)
    assert (tmp_path / "fleetsim-load.png").read_bytes()[:4] == b"\x89PNG"
    trace = tmp_path / "recorded.jsonl"
    dump_jsonl(make_workload("lora_mix:qps=4", seed=1, duration=2), trace)
    out = tmp_path / "trace-out"
    assert main(["run", "--trace", str(trace), "--contenders", "envoy-rr,ours-default",
                 "--out", str(out)]) == 0  # fmt: skip
    assert (out / "fleetsim-ours-default-recorded.requests.jsonl").exists()
    assert main(["tune", "--workload", "nope", "--param", "a.weight=1"]) == 2


def test_calibrate_replays_the_suites_points_with_its_seeds() -> None:
    """A suite result (the smoke suite's config, made-up wall-clock summaries) is replayed point by
    point: the probe closed-loop with the probe's requests, sweep point i with seed + i."""
    from bench.fleetsim.calibrate import calibrate, format_calibration
    from bench.suite.config import SMOKE_SUITE
    from bench.workloads import WORKLOADS as GENERATORS

    cfg = SMOKE_SUITE.model_dump()

    def point(contender: str, workload: str, mode: str, qps: float) -> dict[str, object]:
        summary = {"ttft_p50": 0.05, "ttft_p90": 0.1, "cached_fraction": 0.5, "ok": 1}
        return {"contender": contender, "workload": workload, "mode": mode, "qps": qps,
                "summary": summary}  # fmt: skip

    points = [point(c, "shared_prefix", "probe", 0.0) for c in ("envoy-rr", "ours-default")]
    points += [point(c, "shared_prefix", "open", 8.0) for c in ("envoy-rr", "ours-default")]
    points += [point("vllm-router-cache_aware", "shared_prefix", "open", 8.0)]  # not simulated
    points += [point("ours-default", "lora_mix", "open", 4.0)]
    compared, _ = calibrate({"config": cfg, "points": points}, seeds=(0, 1))
    assert [(c.contender, c.mode, c.qps) for c in compared] == [
        ("envoy-rr", "probe", 0.0),
        ("ours-default", "probe", 0.0),
        ("envoy-rr", "open", 8.0),
        ("ours-default", "open", 8.0),
        ("ours-default", "open", 4.0),
    ]
    probe, sweep = compared[0].virtual[0], compared[2].virtual[0]
    assert len(probe.records) == cfg["probe_requests"] and probe.mode == "probe"
    expected = GENERATORS["shared_prefix"](
        qps=8.0, duration=cfg["duration"], seed=cfg["seed"] + 1, **cfg["sweep_args"]
    )
    assert [r.sent for r in sweep.records] == pytest.approx([c.arrival for c in expected])
    assert len(compared[2].virtual) == 2
    assert all(r.ok for c in compared for v in c.virtual for r in v.records)
    table = format_calibration(compared)
    assert "| shared_prefix @ 8 |" in table and "vllm-router" not in table


@pytest.mark.parametrize("concurrency", [None, 1])
def test_scrapes_go_on_while_sessions_think_or_wait(concurrency: int | None) -> None:
    """Between the turns of a session (think time) or the sessions of a closed loop nothing may be
    open, yet requests are still to come: the scraper keeps reading every pod."""
    wl = make_workload("multi_turn:qps=0.5,turns=3,think_time=3", seed=SEED, duration=4)
    sim = _Simulation(
        wl,
        FleetSpec(),
        contender_named("ours-default"),
        seed=SEED,
        duration=100,
        drain_timeout=30,
        concurrency=concurrency,
        default_profile=None,
    )
    sim.run()
    assert len(sim.records) == 3 * len(wl) and all(r.ok for r in sim.records)
    pods = sim.gateway.datastore.snapshot.pods.values() if sim.gateway else []
    last_send = max(r.sent for r in sim.records)
    assert all(p.metrics.scraped_at > last_send for p in pods)


def test_speed_times_each_suite_point_against_its_wall_clock(tmp_path: Path) -> None:
    """``speed SUITE_JSON``: one row per simulable point, its simulated requests and CPU time
    against the point's wall time; the CLI prints the table and the lowest ratio."""
    from bench.fleetsim.__main__ import main
    from bench.fleetsim.speed import format_speed, speed
    from bench.suite.config import SMOKE_SUITE

    cfg = SMOKE_SUITE.model_dump()

    def point(contender: str, mode: str, qps: float, wall: float) -> dict[str, object]:
        return {"contender": contender, "workload": "shared_prefix", "mode": mode, "qps": qps,
                "summary": {"wall": wall}}  # fmt: skip

    points = [point("envoy-rr", "probe", 0.0, 3.0), point("ours-default", "open", 8.0, 4.0)]
    points += [point("vllm-router-cache_aware", "open", 8.0, 4.0)]  # not simulated
    result = {"config": cfg, "points": points}
    rows = speed(result, repeat=2)
    assert [(r.contender, r.mode) for r in rows] == [
        ("envoy-rr", "probe"),
        ("ours-default", "open"),
    ]
    assert rows[0].requests == cfg["probe_requests"] and rows[1].requests > 0
    assert all(r.cpu > 0 and r.ratio == pytest.approx(r.wall_clock / r.cpu) for r in rows)
    assert rows[1].wall_clock == 4.0
    table = format_speed(rows)
    assert "vllm-router" not in table and "lowest" in table
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"result": result}))
    assert main(["speed", str(path), "--repeat", "1", "--warm"]) == 0
    with pytest.raises(ValueError, match="repeat"):
        speed(result, repeat=0)


def test_cold_runs_start_from_empty_caches() -> None:
    """``reset_caches`` forgets the chat pieces, output plans and block digests a run filled; the
    results stay the same either way (the caches only save work)."""
    from bench.fleetsim import core
    from sim import blockhash, tokenizer

    wl = make_workload("shared_prefix:qps=8,groups=2,system_tokens=300", seed=SEED, duration=2)
    first = simulate(wl, "ours-default")
    assert core._TEMPLATE and core._PLANS and blockhash._MEMOS["sha256"].blocks
    assert tokenizer._PIECES
    core.reset_caches()
    assert not core._TEMPLATE and not core._PLANS and not core._CONFIGS
    assert not blockhash._MEMOS["sha256"].blocks and not blockhash._MEMOS["sha256"].donors
    assert not tokenizer._PIECES
    again = simulate(wl, "ours-default")
    warm = simulate(wl, "ours-default")
    key = [(r.pod, r.ttft, r.e2e, r.cached_tokens, r.itl) for r in first.records]
    assert key == [(r.pod, r.ttft, r.e2e, r.cached_tokens, r.itl) for r in again.records]
    assert key == [(r.pod, r.ttft, r.e2e, r.cached_tokens, r.itl) for r in warm.records]


def test_a_run_pauses_the_collector_and_frees_its_fleet() -> None:
    """The cyclic collector is off during a run and as it was after; the run's engines (pools,
    requests' token ids) are freed by reference counts when it ends, not left to it."""
    import gc

    from sim.engine import Engine

    wl = make_workload("shared_prefix:qps=8,groups=2,system_tokens=300", seed=SEED, duration=2)
    seen: list[bool] = []
    run = _Simulation.run

    def spy(sim: _Simulation) -> None:
        seen.append(gc.isenabled())
        run(sim)

    gc.collect()
    was = gc.get_debug()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection finds, to look at it
        _Simulation.run = spy  # type: ignore[method-assign,assignment]
        assert gc.isenabled()
        simulate(wl, "ours-default")
        assert seen == [False] and gc.isenabled()
        gc.disable()
        simulate(wl, "ours-default")
        assert seen == [False, False] and not gc.isenabled()
        gc.enable()
        gc.collect()
        assert not [o for o in gc.garbage if isinstance(o, Engine)]
    finally:
        _Simulation.run = run  # type: ignore[method-assign]
        gc.set_debug(was)
        gc.garbage.clear()
        gc.enable()


def _ff_run(
    wl: list[TraceSession], contender: str, fleet: FleetSpec, **kw: object
) -> tuple[SimResult, int]:
    sim = _Simulation(
        wl,
        fleet,
        contender_named(contender),
        seed=SEED,
        duration=kw.pop("duration", 3.0),  # type: ignore[arg-type]
        drain_timeout=kw.pop("drain_timeout", 30.0),  # type: ignore[arg-type]
        concurrency=kw.pop("concurrency", None),  # type: ignore[arg-type]
        default_profile=None,
    )
    sim.run()
    res = SimResult(contender, "", 0.0, "", [], sim.records, sim.load, sim.now, 0.0, sim.scrapes)
    return res, sim.seq


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        (WORKLOADS["shared-prefix"], {}),
        (WORKLOADS["multi-turn"], {}),
        (WORKLOADS["lora-mix"], {}),
        ("long_context:qps=8", {"drain_timeout": 0.4}),  # requests cut at the deadline
        ("multi_turn:qps=2,turns=3", {"concurrency": 2, "duration": 6.0}),  # closed loop
    ],
)
def test_decode_fast_forward_changes_no_record(spec: str, options: dict[str, object]) -> None:
    """Runs of identical decode steps applied lazily (one event each) give the per-step loop's
    records, load samples, scrapes and end time, bit for bit, with fewer events."""
    wl = make_workload(spec, seed=SEED, duration=3)
    for contender in ("envoy-rr", "ours-default"):
        for latency in (0.0, 0.006):
            fleet = FleetSpec(http_latency=latency, fast_forward=False)
            slow, slow_events = _ff_run(wl, contender, fleet, **dict(options))
            fast, fast_events = _ff_run(
                wl, contender, replace(fleet, fast_forward=True), **dict(options)
            )
            assert fast.records == slow.records
            assert fast.load == slow.load
            assert (fast.scrapes, fast.sim_seconds) == (slow.scrapes, slow.sim_seconds)
            assert fast_events < 0.7 * slow_events
    if "drain_timeout" in options:
        assert any(r.error and "drain deadline" in r.error for r in slow.records)


def test_exactness_recordings_compare_field_by_field() -> None:
    from bench.fleetsim.exactness import compare, record

    a = record([], ["lora_mix:qps=4"], duration=1.5)
    b = record([], ["lora_mix:qps=4"], duration=1.5)
    assert len(a) == 4 and compare(a, b) == []
    key = next(iter(b))
    records, load, scrapes, end = b[key]
    b[key] = (records, load, scrapes + 1, end)
    assert compare(a, b) == [f"{key}: scrapes {scrapes} != {scrapes + 1}"]


def test_decode_fast_forward_orders_a_tie_as_the_per_step_loop() -> None:
    """Two pods start the same prompt at 0 (closed loop, 2 clients, round-robin over 2 pods) and
    step in lockstep; the shorter request ends at the very instant the other pod ends a decode
    step, and the next session goes to that pod. The per-step loop ends that pod's step first
    (its event was pushed a step earlier), then admits the new request: so must the fast path."""
    prompt = tuple(range(100, 400))
    wl = [
        TraceSession(0.0, "bench-model", n, prompt_ids=prompt, session=str(i))
        for i, n in enumerate((40, 10, 10))
    ]
    fleet = FleetSpec(replicas=2, envoy_workers=1, fast_forward=False)
    options = {"concurrency": 2, "duration": 1.0}
    slow, _ = _ff_run(wl, "envoy-rr", fleet, **dict(options))
    fast, _ = _ff_run(wl, "envoy-rr", replace(fleet, fast_forward=True), **dict(options))
    first, second, third = slow.records
    assert third.pod == first.pod != second.pod  # the third request joins the long one
    assert third.sent == second.sent + second.e2e  # type: ignore[operator]
    assert fast.records == slow.records


def test_kv_events_feed_the_precise_scorer() -> None:
    """With ``kv_events`` the engines' events reach the gateway's index and precise-prefix
    scores (the scorers it replaces abstain): the index holds exactly what the engines cache."""
    wl = make_workload(WORKLOADS["shared-prefix"], seed=SEED, duration=3)
    runs = {}
    for events in (False, True):
        sim = _Simulation(
            wl,
            FleetSpec(kv_events=events),
            contender_named("ours-default"),
            seed=SEED,
            duration=3,
            drain_timeout=30,
            concurrency=None,
            default_profile=None,
        )
        sim.run()
        runs[events] = sim
    off, on = runs[False], runs[True]
    assert off.kv_index is None
    assert on.kv_index is not None and len(on.kv_index) > 0
    on._feed_kv_events(on.kv_index)  # the events since the last decision
    for pod in on.pods:
        cached = {h if isinstance(h, int) else int.from_bytes(h[-8:], "big")
                  for h in pod.engine.kv.pool.cached}  # fmt: skip
        assert on.kv_index.blocks_of(pod.name) == frozenset(h & (2**64 - 1) for h in cached)
    assert all(r.ok for r in on.records) and len(on.records) == len(wl)
    # precise-prefix matched blocks the events reported (which confirms the simulator's
    # tokenizer for the model); without events it never scored
    for sim, scored in ((off, False), (on, True)):
        assert sim.gateway is not None
        (scheduler,) = [s for _, s in sim.gateway._schedulers.values()]
        precise = next(p for p, _ in scheduler.scorers if p.name == "precise-prefix")
        entry = precise._auto.get("bench-model")
        assert (entry is not None and entry.confirmed) == scored
