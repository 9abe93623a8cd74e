"""Prefill/decode pairing (extproc.scheduling.pd): decode first, prefill from the same group."""

from __future__ import annotations

import random

import orjson
import pytest

from crds.networking import PDGroup
from extproc.datastore import Datastore
from extproc.gateway import Gateway, Routed
from extproc.metrics import GatewayMetrics
from extproc.scheduling import build_scheduler
from extproc.scheduling.pd import DECODE_PROFILE, PREFILL_PROFILE, PDScheduler
from extproc.scheduling.pd_queue import PrefillQueue
from extproc.scheduling.types import AllPodsSaturated, NoPodAvailable, SchedulingRequest
from fleet.pd import PREFILL_HEADER, parse_prefill
from fleet.pods import Pod, PodMetrics
from tests.extproc.helpers import config

GROUP = PDGroup.model_validate(
    {"groupKey": "group", "prefillLabels": {"role": "prefill"}, "decodeLabels": {"role": "decode"}}
)


def pod(name: str, role: str, group: str, *, ready: bool = True, in_flight: int = 0) -> Pod:
    p = Pod(name, f"10.0.{len(name)}.{abs(hash(name)) % 200}:8000", {"role": role, "group": group})
    p.ready = ready
    p.in_flight = in_flight
    return p


def saturated(p: Pod) -> Pod:
    p.metrics = PodMetrics(waiting=50, running=4, kv_cache_usage=0.5, stale=False)
    return p


def sched(seed: int = 1) -> PDScheduler:
    rng = random.Random(seed)
    return PDScheduler(
        GROUP,
        build_scheduler(DECODE_PROFILE, rng=rng),
        build_scheduler(PREFILL_PROFILE, rng=rng),
    )


def req(
    rid: str = "r1", prompt: str = "hello " * 50, session: str | None = None
) -> SchedulingRequest:
    return SchedulingRequest(rid, "m", prompt=prompt, session_key=session)


def test_the_prefill_pod_is_from_the_decode_pods_group() -> None:
    pods = [
        pod("d-a", "decode", "a"),
        pod("d-b", "decode", "b"),
        pod("p-a", "prefill", "a"),
        pod("p-b", "prefill", "b"),
        pod("p-b2", "prefill", "b"),
    ]
    s = sched()
    for i in range(40):
        r = s.schedule(req(f"r{i}", prompt=f"prompt {i} " * 30), pods)
        assert r.primary.labels["role"] == "decode"
        assert r.prefill is not None
        group = r.primary.labels["group"]
        assert r.prefill.primary.labels == {"role": "prefill", "group": group}
        assert all(p.labels["group"] == group for p in r.prefill.fallbacks)
        assert all(p.labels == {"role": "decode", "group": group} for p in r.fallbacks)


def test_decode_is_chosen_first_by_load_then_its_group_prefill() -> None:
    # group a's prefill pod is idle and b's busy, but decode d-a is loaded: the decode choice
    # decides the group, so the request goes to d-b and b's prefill pod
    pods = [
        pod("d-a", "decode", "a", in_flight=20),
        pod("d-b", "decode", "b"),
        pod("p-a", "prefill", "a"),
        pod("p-b", "prefill", "b", in_flight=5),
    ]
    r = sched().schedule(req(), pods)
    assert r.primary.name == "d-b"
    assert r.prefill is not None and r.prefill.primary.name == "p-b"


def test_decode_session_affinity_and_prefill_prefix_affinity() -> None:
    pods = [pod(f"d-{g}", "decode", g) for g in "ab"] + [
        pod(f"p-{g}{i}", "prefill", g) for g in "ab" for i in range(3)
    ]
    s = sched(seed=5)
    first = s.schedule(req("r1", prompt="shared system prompt " * 40, session="s1"), pods)
    s.on_routed(req("r1", session="s1"), first)
    assert first.prefill is not None
    for i in range(5):
        again = s.schedule(req(f"x{i}", prompt="shared system prompt " * 40, session="s1"), pods)
        assert again.primary.name == first.primary.name  # session affinity on the decode pod
        assert again.prefill is not None
        assert again.prefill.primary.name == first.prefill.primary.name  # prefix affinity


def test_a_group_without_ready_prefill_falls_back_to_the_next_decode_pod() -> None:
    pods = [
        pod("d-a", "decode", "a"),
        pod("d-b", "decode", "b", in_flight=3),
        pod("p-a", "prefill", "a", ready=False),
        pod("p-b", "prefill", "b"),
    ]
    r = sched().schedule(req(), pods)
    assert r.primary.name == "d-b" and r.prefill is not None and r.prefill.primary.name == "p-b"
    assert r.fallbacks == []  # d-a is in another group


def test_no_ready_prefill_pod_anywhere_serves_on_the_decode_pod_alone() -> None:
    pods = [pod("d-a", "decode", "a"), pod("p-a", "prefill", "a", ready=False)]
    r = sched().schedule(req(), pods)
    assert r.primary.name == "d-a" and r.prefill is None


def test_every_prefill_pod_saturated_waits_in_the_queue() -> None:
    pods = [pod("d-a", "decode", "a"), saturated(pod("p-a", "prefill", "a"))]
    with pytest.raises(AllPodsSaturated, match="prefill"):
        sched().schedule(req(), pods)


def test_no_decode_pod_is_an_error_naming_the_labels() -> None:
    with pytest.raises(NoPodAvailable, match=r"decode pods \(pdGroup.decodeLabels role=decode\)"):
        sched().schedule(req(), [pod("p-a", "prefill", "a")])


def test_prefill_pods_are_never_decode_candidates() -> None:
    pods = [pod("d-a", "decode", "a", in_flight=50), pod("p-a", "prefill", "a")]
    for i in range(10):
        assert sched(i).schedule(req(f"r{i}"), pods).primary.name == "d-a"


def test_finished_request_reaches_both_schedulers() -> None:
    s = sched()
    pods = [pod("d-a", "decode", "a"), pod("p-a", "prefill", "a")]
    r = s.schedule(req(), pods)
    s.on_routed(req(), r)
    assert s._prefill_of == {"r1": "p-a"}
    s.on_finished("r1", "d-a")
    assert s._prefill_of == {}


# ---- the gateway sets the prefill header --------------------------------------------------------
PD_TEXT = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: pd}
spec:
  inferenceEngine: vLLM
  workloadSelector:
    matchLabels: {app: pd}
    pdGroup: {groupKey: group, prefillLabels: {role: prefill}, decodeLabels: {role: decode}}
  workloadPort: {port: 8000}
  kvConnector: {type: nixl}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: plain}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: plain}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: pd}
spec:
  modelName: pd-model
  rules: [{targets: [{modelServerName: pd}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: plain}
spec:
  modelName: plain-model
  rules: [{targets: [{modelServerName: plain}]}]
"""
PD_PODS = [
    ("d0", "10.1.0.1:9000", {"app": "pd", "role": "decode", "group": "g0"}),
    ("p0", "10.1.0.2", {"app": "pd", "role": "prefill", "group": "g0"}),
    ("p1", "10.1.0.3", {"app": "pd", "role": "prefill", "group": "g0"}),
    ("q0", "10.1.1.2", {"app": "pd", "role": "prefill", "group": "g1"}),
    ("x0", "10.2.0.1", {"app": "plain"}),
]


async def decide(gw: Gateway, model: str, forged: str) -> Routed:
    headers = {":method": "POST", ":path": "/v1/completions", PREFILL_HEADER: forged}
    state, early = gw.start(headers, end_of_stream=False)
    assert early is None
    routed = await gw.decide(state, orjson.dumps({"model": model, "prompt": "hi there"}))
    assert isinstance(routed, Routed), routed
    gw.routed(state)
    gw.finish(state)
    return routed


async def test_gateway_sends_decode_pod_with_its_groups_prefill_pods_in_the_header() -> None:
    ds = Datastore()
    ds.apply(config(PD_TEXT, PD_PODS))
    gw = Gateway(ds, GatewayMetrics(), rng=random.Random(2))
    routed = await decide(gw, "pd-model", "6.6.6.6:1")
    assert routed.endpoints == ["10.1.0.1:9000"]
    chosen = parse_prefill(routed.headers[PREFILL_HEADER])
    # group g0 only, the forged address gone
    assert sorted(chosen) == ["10.1.0.2:8000", "10.1.0.3:8000"]
    plain = await decide(gw, "plain-model", "6.6.6.6:1")
    assert plain.headers[PREFILL_HEADER] == ""  # a client's copy is removed everywhere


def test_prefill_header_values_are_checked() -> None:
    assert parse_prefill("1.2.3.4:80, 5.6.7.8:90") == ["1.2.3.4:80", "5.6.7.8:90"]
    assert parse_prefill("") == []
    with pytest.raises(ValueError, match="'nope' is not an ip:port"):
        parse_prefill("1.2.3.4:80,nope")


# ---- prefill pods by queued prompt tokens (prefill-queue) ---------------------------------------


def scraped(p: Pod, waiting: float, running: float, at: float) -> Pod:
    p.metrics = PodMetrics(waiting=waiting, running=running, scraped_at=at, stale=False)
    return p


def test_prefill_queue_counts_prompts_sent_since_the_scrape_and_the_engines_queue() -> None:
    q = PrefillQueue()
    p = scraped(pod("p-a", "prefill", "a"), waiting=1, running=1, at=10.0)
    for at, tokens in ((8.0, 4000), (9.0, 3000), (9.5, 2000), (10.5, 100), (11.0, 50)):
        q.routed("p-a", tokens, at)
    # after the scrape: 100 + 50; the engine held 2 then: the last two sent before it
    assert q.queued_tokens(p) == 150 + 3000 + 2000
    # a later scrape with an empty engine: nothing sent since, nothing queued
    scraped(p, waiting=0, running=0, at=12.0)
    assert q.queued_tokens(p) == 0
    # stale metrics: only what was sent since the last scrape
    p.metrics = PodMetrics(waiting=5, running=1, scraped_at=12.0, stale=True)
    q.routed("p-a", 700, 12.5)
    assert q.queued_tokens(p) == 700
    assert q.queued_tokens(pod("p-b", "prefill", "a")) == 0


def test_prefill_queue_counts_other_gateways_requests_at_the_mean_prompt() -> None:
    q = PrefillQueue()
    q.routed("p-a", 1000, 1.0)
    q.routed("p-a", 3000, 2.0)
    p = scraped(pod("p-a", "prefill", "a"), waiting=3, running=1, at=5.0)
    assert q.queued_tokens(p) == 4000 + 2 * 2000


def test_a_burst_between_scrapes_spreads_over_the_prefill_pods_by_prompt_tokens() -> None:
    # every prefill pod scraped idle just before a burst: without counting what the gateway sent
    # since, the least-loaded pick would repeat; by queued tokens, long prompts spread and a short
    # one goes where the least prefill work waits
    now = [100.0]
    pre = build_scheduler(PREFILL_PROFILE, rng=random.Random(3), clock=lambda: now[0])
    s = PDScheduler(GROUP, build_scheduler(DECODE_PROFILE, rng=random.Random(3)), pre)
    pods = [pod("d-a", "decode", "a")] + [
        scraped(pod(f"p-{i}", "prefill", "a"), 0, 0, at=99.0) for i in range(3)
    ]
    picks = []
    for i, tokens in enumerate((4000, 4000, 4000, 4000, 100)):
        now[0] += 0.01
        r = SchedulingRequest(f"r{i}", "m", prompt=f"doc {i} " * 20, estimated_input_tokens=tokens)
        result = s.schedule(r, pods)
        s.on_routed(r, result)
        assert result.prefill is not None
        picks.append(result.prefill.primary.name)
    assert sorted(picks[:3]) == ["p-0", "p-1", "p-2"]
    # the fourth long prompt joins one queue; the short one goes to a pod with a single prompt
    assert picks[4] != picks[3]
