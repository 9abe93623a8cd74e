"""The load generator against one real simulator: what it records, per request and per turn."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import loadgen, workloads
from bench.loadgen import Conversation
from matrixinfer.process import free_port
from sim.fleet import Fleet, SimPod


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[SimPod]:
    fleet = Fleet(
        1,
        model="m",
        port=free_port("127.0.0.10"),
        args=("--time-scale", "0.02", "--seed", "3"),
        log_dir=tmp_path,
    )
    with fleet:
        yield fleet.pods[0]


def test_open_loop_records_streams_and_multi_turn_history(pod: SimPod) -> None:
    convs = [
        Conversation(0.0, "m", (("system", "be brief"),), ("hello there",), 12, "a"),
        Conversation(0.05, "m", (), ("first " + workloads.words(_rng(), 100), "second"), 6, "b"),
        Conversation(0.1, "missing-model", (), ("x",), 5, "c"),
    ]
    result = loadgen.run(
        loadgen.run_open_loop(f"{pod.url}/v1", convs, duration=5, drain_timeout=20, qps=1)
    )
    recs = {(r.tag, r.turn): r for r in result.records}
    assert set(recs) == {("a", 0), ("b", 0), ("b", 1), ("c", 0)}
    a = recs[("a", 0)]
    assert a.ok and a.status == 200 and a.pod == "sim-0"
    assert a.output_tokens == 12 and len(a.itl) == 11
    assert a.ttft is not None and a.e2e is not None and a.e2e >= a.ttft
    b0, b1 = recs[("b", 0)], recs[("b", 1)]
    assert b0.ok and b1.ok and b1.sent >= b0.sent + (b0.e2e or 0)
    # turn 2 resends turn 1 and its answer: a longer prompt, mostly from the prefix cache
    assert b1.prompt_tokens > b0.prompt_tokens + b0.output_tokens
    assert b1.cached_tokens >= (b0.prompt_tokens // 16) * 16  # every full block of turn 1
    c = recs[("c", 0)]
    assert not c.ok and c.error.startswith("http 404")

    s = loadgen.summarize(result)
    assert (s.requests, s.ok, s.errors) == (4, 3, 1)
    assert s.error_kinds == {"http 404": 1}
    assert s.pods == {"sim-0": 3}
    assert s.output_tok_per_s > 0 and 0 < s.cached_fraction < 1


def test_closed_loop_runs_one_at_a_time(pod: SimPod) -> None:
    convs = workloads.long_context(qps=50, duration=1, seed=1, model="m", max_tokens=4)[:6]
    result = loadgen.run(
        loadgen.run_closed_loop(f"{pod.url}/v1", convs, concurrency=1, duration=30)
    )
    assert len(result.records) == 6 and all(r.ok for r in result.records)
    for prev, nxt in zip(result.records, result.records[1:], strict=False):
        assert nxt.sent >= prev.sent + (prev.e2e or 0)


def _rng() -> random.Random:
    return random.Random(5)


def test_workloads_are_deterministic_per_seed() -> None:
    for name, gen in workloads.WORKLOADS.items():
        a = gen(qps=5, duration=4, seed=1)
        b = gen(qps=5, duration=4, seed=1)
        c = gen(qps=5, duration=4, seed=2)
        assert a == b and a, name
        assert a != c, name
        assert all(x.arrival <= y.arrival for x, y in itertools.pairwise(a)), name


def test_shared_prefix_shape() -> None:
    convs = workloads.shared_prefix(qps=20, duration=5, seed=0, groups=3, system_tokens=50)
    systems = {c.prefix[0][1] for c in convs}
    assert len(systems) == 3
    assert all(len(s.split()) >= 50 for s in systems)
    assert len({c.turns[0] for c in convs}) == len(convs)  # unique questions


def test_percentile() -> None:
    assert loadgen.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert loadgen.percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert loadgen.percentile([], 50) != loadgen.percentile([], 50)  # NaN


def test_only_loopback_targets() -> None:
    for url in ("http://127.0.0.1:1/v1", "http://127.0.0.12:8000/v1", "http://localhost/v1"):
        loadgen.check_loopback(url)
    for url in ("http://10.0.0.5:8000/v1", "https://example.com/v1", "not a url"):
        with pytest.raises(ValueError, match="not a loopback address"):
            loadgen.check_loopback(url)
    convs = workloads.lora_mix(qps=5, duration=1, seed=0)
    with pytest.raises(ValueError, match=r"10\.1\.2\.3"):
        loadgen.run(loadgen.run_open_loop("http://10.1.2.3:80/v1", convs, duration=1))
