"""Profile building errors and scheduler properties (hypothesis)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.scheduling import (
    DEFAULT_PROFILE,
    PLUGINS,
    NoPodAvailable,
    SchedulerProfile,
    SchedulingRequest,
    build_scheduler,
)
from extproc.scheduling.plugins import LoraCapableFilter
from fleet.pods import Pod, PodMetrics
from fleet.profile import PluginSpec

# the property tests spend their time in Hypothesis' data generation (21 s for 200 examples on a
# starved machine, once past the default 120 s with three suites at once): room, not a bound
pytestmark = pytest.mark.timeout(600)

# ------------------------------------------------------------------------------ profile building


@dataclass
class CrdLikeSpec:  # the shape of crds' ModelServer.spec.scheduler items
    name: str
    weight: int | float | None = None
    args: dict[str, Any] | None = None


@dataclass
class CrdLikeProfile:
    filters: list[CrdLikeSpec] = field(default_factory=list)
    scorers: list[CrdLikeSpec] = field(default_factory=list)


def test_registry_lists_every_plugin() -> None:
    assert {n for n, i in PLUGINS.items() if i.kind == "filter"} == {
        "ready",
        "saturation",
        "lora-capable",
    }
    assert {n for n, i in PLUGINS.items() if i.kind == "scorer"} == {
        "least-request",
        "prefill-queue",
        "kv-cache",
        "prefix-cache",
        "precise-prefix",
        "least-latency",
        "lora-affinity",
        "session-affinity",
        "random",
    }


def test_default_profile_builds() -> None:
    s = build_scheduler()
    assert [f.name for f in s.filters] == [f.name for f in DEFAULT_PROFILE.filters]
    assert build_scheduler(DEFAULT_PROFILE).max_fallbacks == 2


def test_crd_shaped_profile_builds() -> None:
    profile = CrdLikeProfile(
        filters=[CrdLikeSpec("ready"), CrdLikeSpec("saturation", args={"max_waiting": 3})],
        scorers=[CrdLikeSpec("prefix-cache", 5, {"block_size": 64}), CrdLikeSpec("random")],
    )
    s = build_scheduler(profile)
    assert [(sc.name, w) for sc, w in s.scorers] == [("prefix-cache", 5.0), ("random", 1.0)]


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (
            CrdLikeProfile(scorers=[CrdLikeSpec("prefix-cash")]),
            "scheduler scorers[0]: unknown scorer plugin 'prefix-cash' (known scorers: ",
        ),
        (
            CrdLikeProfile(filters=[CrdLikeSpec("least-request")]),
            "scheduler filters[0]: plugin 'least-request' is a scorer, not a filter",
        ),
        (
            CrdLikeProfile(
                filters=[CrdLikeSpec("ready"), CrdLikeSpec("saturation", args={"max_waitng": 3})]
            ),
            "scheduler filters[1]: plugin 'saturation': argument 'max_waitng': unknown argument",
        ),
        (
            CrdLikeProfile(filters=[CrdLikeSpec("saturation", args={"max_kv_cache_usage": 1.5})]),
            "scheduler filters[0]: plugin 'saturation': argument 'max_kv_cache_usage': "
            "Input should be less than or equal to 1",
        ),
        (
            CrdLikeProfile(scorers=[CrdLikeSpec("prefix-cache", args={"block_size": "big"})]),
            "plugin 'prefix-cache': argument 'block_size': Input should be a valid integer",
        ),
        (
            CrdLikeProfile(scorers=[CrdLikeSpec("random", weight=-1)]),
            "scheduler scorers[0]: plugin 'random': 'weight' must be a finite number >= 0, got -1",
        ),
        (
            CrdLikeProfile(scorers=[CrdLikeSpec("random", weight="heavy")]),  # type: ignore[arg-type]
            "plugin 'random': 'weight' must be a number",
        ),
        (
            CrdLikeProfile(
                scorers=[CrdLikeSpec("least-latency", args={"ttft_weight": 0, "tpot_weight": 0})]
            ),
            "plugin 'least-latency': ttft_weight + tpot_weight must be > 0",
        ),
        (
            CrdLikeProfile(scorers=[CrdLikeSpec("session-affinity", args={"header": ""})]),
            "plugin 'session-affinity': argument 'header': String should have at least 1 character",
        ),
        (
            CrdLikeProfile(scorers=[CrdLikeSpec("")]),
            "scheduler scorers[0]: a plugin needs a 'name'",
        ),
    ],
)
def test_bad_profiles_name_plugin_and_argument(profile: CrdLikeProfile, message: str) -> None:
    with pytest.raises(ValueError) as e:
        build_scheduler(profile)
    assert message in str(e.value)


def test_pydantic_profile_from_config_dict() -> None:
    profile = SchedulerProfile.model_validate(
        {
            "filters": [{"name": "ready"}],
            "scorers": [{"name": "least-request", "weight": 2, "args": {"slack": 1}}],
            "fallbacks": 1,
        }
    )
    s = build_scheduler(profile)
    assert s.max_fallbacks == 1
    with pytest.raises(ValueError, match="weight"):
        SchedulerProfile.model_validate({"scorers": [{"name": "random", "weight": -2}]})


# ------------------------------------------------------------------------------------ properties

metric_values = st.builds(
    PodMetrics,
    waiting=st.none() | st.integers(0, 20).map(float),
    running=st.none() | st.integers(0, 64).map(float),
    kv_cache_usage=st.none() | st.floats(0, 1),
    ttft_seconds=st.none() | st.floats(0.001, 5),
    tpot_seconds=st.none() | st.floats(0.001, 0.5),
    running_loras=st.frozensets(st.sampled_from(["a", "b", "c"]), max_size=3),
    waiting_loras=st.frozensets(st.sampled_from(["a", "b", "c"]), max_size=2),
    max_loras=st.none() | st.integers(1, 3),
    stale=st.booleans(),
)


@st.composite
def pod_lists(draw: st.DrawFn) -> list[Pod]:
    n = draw(st.integers(1, 12))
    return [
        Pod(
            name=f"p{i}",
            address=f"10.0.0.{i}:8000",
            ready=draw(st.booleans()),
            in_flight=draw(st.integers(0, 30)),
            metrics=draw(metric_values),
        )
        for i in range(n)
    ]


requests = st.builds(
    SchedulingRequest,
    request_id=st.just("r"),
    model=st.just("m"),
    lora=st.none() | st.sampled_from(["a", "b", "c"]),
    prompt=st.text(max_size=600),
    session_key=st.none() | st.sampled_from(["s1", "s2"]),
)

ALL_SCORERS = SchedulerProfile(
    filters=[
        PluginSpec(name="ready"),
        PluginSpec(name="saturation"),
        PluginSpec(name="lora-capable"),
    ],
    scorers=[
        PluginSpec(name=n, weight=w)
        for n, w in zip(
            [
                "least-request",
                "kv-cache",
                "prefix-cache",
                "least-latency",
                "lora-affinity",
                "session-affinity",
                "random",
            ],
            [3, 1, 2, 1, 1, 5, 0.1],
            strict=True,
        )
    ],
    fallbacks=3,
)


def _passes(p: Pod, r: SchedulingRequest) -> bool:
    """Ready, not saturated, and (for a LoRA request) running or queueing the adapter or with a
    free adapter slot."""
    m = p.metrics
    if not p.ready:
        return False
    if not m.stale and ((m.waiting or 0) >= 8 or (m.kv_cache_usage or 0) >= 0.95):
        return False
    if r.lora and not m.stale and m.max_loras is not None:
        return (
            r.lora in m.running_loras
            or r.lora in m.waiting_loras
            or len(m.running_loras) < m.max_loras
        )
    return True


def _allowed_set(pods: list[Pod], r: SchedulingRequest) -> list[Pod]:
    """The pods the profile may pick: those that pass; for a LoRA request none of which has a
    free slot, the ready, unsaturated pods that may hold the adapter (they queue it)."""
    allowed = [p for p in pods if _passes(p, r)]
    if allowed or not r.lora:
        return allowed
    unsaturated = [
        p
        for p in pods
        if p.ready
        and (
            p.metrics.stale
            or ((p.metrics.waiting or 0) < 8 and (p.metrics.kv_cache_usage or 0) < 0.95)
        )
    ]
    return [p for p in unsaturated if not LoraCapableFilter.missing(p, r.lora)]


@settings(max_examples=200, deadline=None)
@given(pods=pod_lists(), request=requests, seed=st.integers(0, 2**32))
def test_never_picks_a_filtered_pod_and_fallbacks_are_distinct(
    pods: list[Pod], request: SchedulingRequest, seed: int
) -> None:
    s = build_scheduler(ALL_SCORERS, rng=random.Random(seed), clock=lambda: 0.0)
    allowed = _allowed_set(pods, request)
    try:
        result = s.schedule(request, pods)
    except NoPodAvailable as e:
        assert not allowed
        assert e.reason
        return
    chosen = [result.primary, *result.fallbacks]
    assert all(p in allowed for p in chosen)
    assert len({p.name for p in chosen}) == len(chosen)
    assert len(chosen) == min(len(allowed), 4)
    # ranked best first
    totals = result.scores()
    assert [totals[p.name] for p in chosen] == sorted(
        (totals[p.name] for p in chosen), reverse=True
    )
    assert totals[result.primary.name] == max(totals.values())


@settings(max_examples=100, deadline=None)
@given(pods=pod_lists(), request=requests, seed=st.integers(0, 2**32))
def test_deterministic_for_a_seeded_rng(
    pods: list[Pod], request: SchedulingRequest, seed: int
) -> None:
    def run() -> list[str] | str:
        s = build_scheduler(ALL_SCORERS, rng=random.Random(seed), clock=lambda: 0.0)
        out: list[str] = []
        try:
            for i in range(5):
                r = s.schedule(request, pods)
                s.on_routed(request, r)
                out.extend(p.name for p in [r.primary, *r.fallbacks])
                out.append(str(i))
        except NoPodAvailable as e:
            return e.reason
        return out

    assert run() == run()


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(2, 16),
    loads=st.lists(st.integers(0, 6), min_size=16, max_size=16),
    prompt=st.text(min_size=2048, max_size=4096),
    seed=st.integers(0, 2**32),
)
def test_prefix_affinity_same_prompt_same_pod(
    n: int, loads: list[int], prompt: str, seed: int
) -> None:
    """With the default profile, a long prompt keeps going to the pod that served it while that
    pod is not saturated (requests finish between sends; other pods carry steady load)."""
    pods = [
        Pod(
            name=f"p{i}",
            address=f"10.0.0.{i}:8000",
            in_flight=loads[i],
            metrics=PodMetrics(
                waiting=0.0, running=float(loads[i]), kv_cache_usage=0.3, stale=False
            ),
        )
        for i in range(n)
    ]
    s = build_scheduler(None, rng=random.Random(seed), clock=lambda: 0.0)
    first = SchedulingRequest(request_id="0", model="m", prompt=prompt)
    r = s.schedule(first, pods)
    s.on_routed(first, r)
    home = r.primary.name
    for i in range(1, 10):
        again = SchedulingRequest(request_id=str(i), model="m", prompt=prompt)
        r = s.schedule(again, pods)
        assert r.primary.name == home
        s.on_routed(again, r)
    # saturate home: the prompt moves elsewhere
    next(p for p in pods if p.name == home).metrics = PodMetrics(waiting=50, stale=False)
    moved = s.schedule(SchedulingRequest(request_id="x", model="m", prompt=prompt), pods)
    assert moved.primary.name != home


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 16),
    count=st.integers(1, 200),
    seed=st.integers(0, 2**32),
    prefix_weight=st.sampled_from([0.0, 2.0]),
)
def test_least_request_balances_a_stream(
    n: int, count: int, seed: int, prefix_weight: float
) -> None:
    """Distinct prompts, nothing finishes: in-flight counts never differ by more than one."""
    pods = [Pod(name=f"p{i}", address=f"10.0.0.{i}:8000") for i in range(n)]
    profile = SchedulerProfile(
        filters=[PluginSpec(name="ready")],
        scorers=[
            PluginSpec(name="least-request", weight=3),
            PluginSpec(name="prefix-cache", weight=prefix_weight),
            PluginSpec(name="kv-cache", weight=1),
        ],
    )
    s = build_scheduler(profile, rng=random.Random(seed), clock=lambda: 0.0)
    for i in range(count):
        r_ = SchedulingRequest(
            request_id=str(i), model="m", prompt=f"{i:08d} unique question " * 30
        )
        res = s.schedule(r_, pods)
        s.on_routed(r_, res)
        res.primary.in_flight += 1
        loads = [p.in_flight for p in pods]
        assert max(loads) - min(loads) <= 1


def test_every_catalogued_plugin_is_implemented_and_the_other_way_round() -> None:
    """fleet.plugins lists what a profile may name; extproc implements exactly that."""
    from fleet.plugins import CATALOGUE

    assert set(PLUGINS) == set(CATALOGUE)
    for name, info in PLUGINS.items():
        entry = CATALOGUE[name]
        assert (info.kind, info.args, info.default_weight) == (
            entry.kind,
            entry.args,
            entry.default_weight,
        )
