"""Each filter and scorer on fake pods, with an injected clock and rng."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from extproc.scheduling import (
    AllPodsSaturated,
    NoPodAvailable,
    SchedulerProfile,
    SchedulingRequest,
    build_scheduler,
    lora_servable,
)
from extproc.scheduling.prefix import PrefixIndex, block_hashes
from fleet.pods import Pod, PodMetrics
from fleet.profile import PluginSpec


def metrics(**kw: object) -> PodMetrics:
    kw.setdefault("stale", False)
    return PodMetrics(**kw)  # type: ignore[arg-type]


def pod(name: str, *, ready: bool = True, in_flight: int = 0, **m: object) -> Pod:
    n = int(name.lstrip("p") or 0)
    return Pod(
        name=name,
        address=f"10.0.0.{n}:8000",
        ready=ready,
        in_flight=in_flight,
        metrics=metrics(**m) if m else PodMetrics(),
    )


def req(rid: str = "r1", **kw: object) -> SchedulingRequest:
    kw.setdefault("model", "llama")
    kw.setdefault("model_server", "llama-vllm")
    return SchedulingRequest(request_id=rid, **kw)  # type: ignore[arg-type]


def only(
    *filters: str, scorers: tuple[tuple[str, float, dict[str, object] | None], ...] = ()
) -> SchedulerProfile:
    return SchedulerProfile(
        filters=[PluginSpec(name=f) for f in filters],
        scorers=[PluginSpec(name=n, weight=w, args=a) for n, w, a in scorers],
    )


def sched(profile: SchedulerProfile | None = None, seed: int = 0, fallbacks: int | None = None):  # type: ignore[no-untyped-def]
    return build_scheduler(
        profile, clock=lambda: 100.0, rng=random.Random(seed), max_fallbacks=fallbacks
    )


# ----------------------------------------------------------------------------------- filters


def test_ready_filter_drops_not_ready_pods() -> None:
    s = sched(only("ready"))
    pods = [pod("p1", ready=False), pod("p2"), pod("p3", ready=False)]
    for i in range(20):
        assert s.schedule(req(f"r{i}"), pods).primary.name == "p2"


def test_ready_filter_reason_names_server() -> None:
    s = sched(only("ready"))
    with pytest.raises(NoPodAvailable) as e:
        s.schedule(req(), [pod("p1", ready=False), pod("p2", ready=False)])
    assert "ModelServer llama-vllm" in e.value.reason
    assert "none of the 2 pods" in e.value.reason


def test_no_pods_at_all() -> None:
    with pytest.raises(NoPodAvailable, match="ModelServer llama-vllm has no pods"):
        sched().schedule(req(), [])


def test_saturation_filter_queue_and_kv() -> None:
    s = sched(only("saturation", scorers=(("random", 1, None),)))
    pods = [
        pod("p1", waiting=8),  # queue full (>= 8)
        pod("p2", kv_cache_usage=0.96),  # KV full
        pod("p3", waiting=7, kv_cache_usage=0.94),
    ]
    for i in range(20):
        assert s.schedule(req(f"r{i}"), pods).primary.name == "p3"


def test_saturation_counts_what_was_sent_and_finished_since_the_scrape() -> None:
    """A pod the last scrape showed with room fills up as requests are sent to it before the next
    scrape; requests finishing make room again; fresh metrics replace the estimate."""
    from extproc.datastore import Datastore
    from tests.extproc.helpers import config, server_yaml

    ds = Datastore()
    ds.apply(config(server_yaml("s", {"app": "x"}), [("p1", "10.0.0.1:8000", {"app": "x"})]))
    p1 = ds.snapshot.pods["p1"]
    ds.publish_metrics("p1", metrics(waiting=2, running=4))
    s = sched(SchedulerProfile(filters=[PluginSpec(name="saturation", args={"max_waiting": 4})]))
    for _ in range(2):  # 2 + 2 sent = 4 queued as far as the gateway knows
        ds.begin(s.schedule(req(), [p1]).primary)
    with pytest.raises(AllPodsSaturated, match="1 with waiting >= 4"):
        s.schedule(req(), [p1])
    ds.finish("p1")  # one finished: a queued request took its running slot
    ds.begin(s.schedule(req(), [p1]).primary)
    with pytest.raises(AllPodsSaturated):
        s.schedule(req(), [p1])
    ds.publish_metrics("p1", metrics(waiting=1, running=4))  # a fresh read replaces the guess
    assert p1.since_scrape == 0 and p1.in_flight == 2
    assert s.schedule(req(), [p1]).primary is p1
    ds.publish_metrics("p1", metrics(waiting=9, stale=True))  # stale: unknown, not saturated
    assert s.schedule(req(), [p1]).primary is p1


def test_saturation_unknown_or_stale_is_not_saturated() -> None:
    s = sched(only("saturation"))
    pods = [
        pod("p1", waiting=50, stale=True),
        Pod(name="p2", address="10.0.0.2:8000"),  # never scraped
    ]
    result = s.schedule(req(), pods)
    assert {result.primary.name, *(p.name for p in result.fallbacks)} == {"p1", "p2"}


def test_saturation_all_saturated_raises_all_pods_saturated() -> None:
    s = sched(
        SchedulerProfile(
            filters=[
                PluginSpec(name="saturation", args={"max_waiting": 4, "max_kv_cache_usage": 0.9})
            ]
        )
    )
    pods = [
        pod("p1", waiting=4),
        pod("p2", waiting=9),
        pod("p3", kv_cache_usage=0.9),
        pod("p4", waiting=5),
    ]
    with pytest.raises(AllPodsSaturated) as e:
        s.schedule(req(), pods)
    assert e.value.reason == (
        "all 4 pods of ModelServer llama-vllm are saturated "
        "(3 with waiting >= 4, 1 with KV cache usage >= 90%)"
    )
    assert isinstance(e.value, NoPodAvailable)


def test_lora_capable_filter() -> None:
    s = sched(only("lora-capable", scorers=(("random", 1, None),)))
    pods = [
        pod("p1", running_loras=frozenset({"x", "y"}), max_loras=2),  # full, no "sql"
        pod("p2", running_loras=frozenset({"x"}), max_loras=2),  # free slot
        pod(
            "p3", running_loras=frozenset({"x", "y"}), waiting_loras=frozenset({"sql"}), max_loras=2
        ),
        pod("p4", running_loras=frozenset({"sql", "y"}), max_loras=2),
    ]
    picked = {s.schedule(req(f"r{i}", lora="sql"), pods).primary.name for i in range(60)}
    assert picked == {"p2", "p3", "p4"}
    # requests without an adapter are not filtered
    picked = {s.schedule(req(f"q{i}"), pods).primary.name for i in range(60)}
    assert picked == {"p1", "p2", "p3", "p4"}


def test_lora_capable_unknown_state_is_capable_and_none_qualifies_is_explained() -> None:
    s = sched(only("lora-capable"))
    assert s.schedule(req(lora="sql"), [pod("p1", stale=True)]).primary.name == "p1"
    assert s.schedule(req(lora="sql"), [pod("p1", waiting=1)]).primary.name == "p1"  # no max_lora
    # every adapter slot busy with others: the pods are kept, the engine queues the request
    full = [pod(f"p{i}", running_loras=frozenset({"a"}), max_loras=1) for i in range(3)]
    assert s.schedule(req(lora="sql"), full).primary.name in {"p0", "p1", "p2"}
    lacking = [pod(f"p{i}", max_loras=1, loaded_loras=frozenset({"a"})) for i in range(2)]
    with pytest.raises(NoPodAvailable) as e:
        s.schedule(req(lora="sql"), lacking)
    assert "LoRA adapter 'sql'" in e.value.reason and "ModelServer llama-vllm" in e.value.reason
    assert not isinstance(e.value, AllPodsSaturated)


def test_lora_capable_drops_pods_that_have_not_loaded_the_adapter() -> None:
    s = sched(only("lora-capable", scorers=(("random", 1, None),)))
    pods = [
        pod("p1", max_loras=2, loaded_loras=frozenset({"sql"})),
        pod("p2", max_loras=2, loaded_loras=frozenset({"other"})),  # free slot, no "sql"
        pod("p3", max_loras=2, loaded_loras=frozenset()),
        pod("p4", max_loras=2),  # adapter list not read yet: unknown, kept
        pod("p5", max_loras=2, loaded_loras=frozenset(), stale=True),  # stale: unknown, kept
    ]
    picked = {s.schedule(req(f"r{i}", lora="sql"), pods).primary.name for i in range(80)}
    assert picked == {"p1", "p4", "p5"}
    # a running or waiting adapter counts as loaded even if the list read predates its loading
    late = pod("p6", max_loras=2, loaded_loras=frozenset(), waiting_loras=frozenset({"sql"}))
    assert s.schedule(req(lora="sql"), [pods[1], late]).primary.name == "p6"
    # requests without an adapter go anywhere
    picked = {s.schedule(req(f"q{i}"), pods).primary.name for i in range(80)}
    assert picked == {"p1", "p2", "p3", "p4", "p5"}


def test_lora_capable_explains_missing_adapters_and_busy_slots() -> None:
    s = sched(only("lora-capable"))
    pods = [
        pod("p1", max_loras=1, loaded_loras=frozenset({"a"})),
        pod("p2", max_loras=1, loaded_loras=frozenset({"a"})),
        pod(
            "p3", max_loras=1, running_loras=frozenset({"a"}), loaded_loras=frozenset({"a", "sql"})
        ),
    ]
    # p3 has it but its one slot is busy: it queues the request there (p1, p2 lack it)
    assert {s.schedule(req(f"r{i}", lora="sql"), pods).primary.name for i in range(20)} == {"p3"}
    with pytest.raises(NoPodAvailable) as e:
        s.schedule(req(lora="sql"), pods[:2])
    assert e.value.reason == (
        "no pod of ModelServer llama-vllm can serve LoRA adapter 'sql': 2 pods have not loaded it"
    )


def test_lora_capable_dynamic_loading_keeps_pods_with_a_free_slot() -> None:
    s = sched(
        SchedulerProfile(
            filters=[PluginSpec(name="lora-capable", args={"dynamicLoading": True})],
            scorers=[PluginSpec(name="random", weight=1)],
        )
    )
    pods = [
        pod("p1", max_loras=1, loaded_loras=frozenset()),  # free slot: may load it
        pod("p2", max_loras=1, running_loras=frozenset({"x"}), loaded_loras=frozenset({"x"})),
    ]
    picked = {s.schedule(req(f"r{i}", lora="sql"), pods).primary.name for i in range(40)}
    assert picked == {"p1"}
    with pytest.raises(ValueError, match="unknown argument"):
        sched(only_with_args("lora-capable", {"dynamic": True}))


def only_with_args(name: str, args: dict[str, object]) -> SchedulerProfile:
    return SchedulerProfile(filters=[PluginSpec(name=name, args=args)])


def test_lora_servable_lists_a_model_only_when_a_ready_pod_can_serve_it() -> None:
    with_it = pod("p1", max_loras=2, loaded_loras=frozenset({"sql"}))
    without = pod("p2", max_loras=2, loaded_loras=frozenset())
    unknown = pod("p3", max_loras=2)
    assert lora_servable([without, with_it], "sql")
    assert not lora_servable([without], "sql")
    assert lora_servable([without, unknown], "sql")  # unknown is not "cannot"
    with_it.ready = False
    assert not lora_servable([with_it, without], "sql")


# ----------------------------------------------------------------------------------- scorers


def test_least_request_prefers_least_loaded() -> None:
    s = sched(only(scorers=(("least-request", 1, None),)))
    pods = [pod("p1", in_flight=5), pod("p2", in_flight=1), pod("p3", in_flight=3)]
    r = s.schedule(req(), pods)
    assert [r.primary.name, *(p.name for p in r.fallbacks)] == ["p2", "p3", "p1"]


def test_least_request_uses_engine_counts_when_larger() -> None:
    s = sched(only(scorers=(("least-request", 1, None),)))
    # p1: gateway has 1 in flight but the engine runs 10 (other gateways) -> load 10
    pods = [pod("p1", in_flight=1, waiting=2, running=8), pod("p2", in_flight=4, running=3)]
    assert s.schedule(req(), pods).primary.name == "p2"
    # stale engine counts are ignored: only in-flight counts
    pods = [pod("p1", in_flight=1, waiting=2, running=8, stale=True), pod("p2", in_flight=4)]
    assert s.schedule(req(), pods).primary.name == "p1"


def test_least_request_score_shape() -> None:
    s = sched(only(scorers=(("least-request", 1, {"slack": 4}),)))
    r = s.schedule(req(), [pod("p1", in_flight=0), pod("p2", in_flight=4), pod("p3", in_flight=12)])
    assert r.scores() == pytest.approx({"p1": 1.0, "p2": 0.5, "p3": 0.25})


def test_kv_cache_lower_usage_wins_and_unknown_is_neutral() -> None:
    s = sched(only(scorers=(("kv-cache", 1, None),)))
    r = s.schedule(req(), [pod("p1", kv_cache_usage=0.8), pod("p2", kv_cache_usage=0.2), pod("p3")])
    assert r.primary.name == "p2"
    assert r.scores() == pytest.approx({"p1": 0.2, "p2": 0.8, "p3": 0.5})


def test_prefix_cache_scores_matched_blocks() -> None:
    s = sched(only(scorers=(("prefix-cache", 1, {"block_size": 16}),)))
    system = "S" * 64  # 4 blocks
    pods = [pod("p1"), pod("p2"), pod("p3")]
    first = req("a", prompt=system + "A" * 64)
    r = s.schedule(first, pods)
    s.on_routed(first, r)
    owner = r.primary.name
    # same system prompt, different question: 4 of 8 blocks match on the owner
    second = req("b", prompt=system + "B" * 64)
    r2 = s.schedule(second, pods)
    assert r2.primary.name == owner
    assert r2.scores()[owner] == pytest.approx(0.5)
    assert all(v == 0 for k, v in r2.scores().items() if k != owner)
    # a prompt shorter than one block: no preference
    assert set(s.schedule(req("c", prompt="hi"), pods).scores().values()) == {0.0}


def test_prefix_cache_forget_pod() -> None:
    s = sched(only(scorers=(("prefix-cache", 1, {"block_size": 16}),)))
    pods = [pod("p1"), pod("p2")]
    r = req("a", prompt="x" * 256)
    result = s.schedule(r, pods)
    s.on_routed(r, result)
    assert s.schedule(r, pods).scores()[result.primary.name] == 1.0
    s.forget_pod(result.primary.name)
    assert s.schedule(r, pods).scores()[result.primary.name] == 0.0


def test_prefix_index_lru_and_binary_search() -> None:
    idx = PrefixIndex(capacity=6)
    h = block_hashes("abcdefgh" * 16, block_size=16, max_blocks=100)
    assert len(h) == 8
    idx.credit("p", h[:5])
    for k in range(9):
        assert idx.matched_blocks("p", h[:k]) == min(k, 5)
    assert idx.matched_blocks("p", h) == 5
    other = block_hashes("z" * 64, 16, 100)
    idx.credit("p", other)  # 4 more blocks: capacity 6 evicts the least recent (the tail of h)
    assert idx.size("p") == 6
    assert idx.matched_blocks("p", other) == 4
    assert idx.matched_blocks("p", h) == 2  # leading blocks were credited last, so they survive
    assert idx.matched_blocks("nobody", h) == 0


class _StampEveryCredit:
    """The index's rule without the repeated-chain shortcut: every credit stamps every block."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pods: dict[str, dict[int, int]] = {}
        self.stamp = 0

    def credit(self, pod: str, hashes: list[int]) -> None:
        if not hashes:
            return
        index = self.pods.setdefault(pod, {})
        for i, h in enumerate(hashes):
            index[h] = self.stamp + len(hashes) - i
        self.stamp += len(hashes) + 1
        if len(index) > self.capacity + (self.capacity >> 2):
            cut = sorted(index.values())[len(index) - self.capacity]
            self.pods[pod] = {h: t for h, t in index.items() if t >= cut}


def test_prefix_index_repeated_chain_keeps_what_every_stamp_would() -> None:
    rng = random.Random(5)
    chains = [block_hashes(f"{k}" * 16 * n, 16, 100) for k in range(6) for n in (3, 5, 9)]
    for capacity in (4, 8, 20):
        idx, ref = PrefixIndex(capacity), _StampEveryCredit(capacity)
        for _ in range(2_000):
            pod = rng.choice(("p1", "p2"))
            chain = rng.choice(chains[:4]) if rng.random() < 0.6 else rng.choice(chains)
            if rng.random() < 0.01:
                idx.forget(pod)
                ref.pods.pop(pod, None)
            idx.credit(pod, list(chain))
            ref.credit(pod, list(chain))
            for p in ("p1", "p2"):
                assert set(idx._pods.get(p, {})) == set(ref.pods.get(p, {}))
    # the repeat stamps nothing
    idx = PrefixIndex(100)
    idx.credit("p", chains[1])
    stamp = idx._stamp
    idx.credit("p", list(chains[1]))
    assert idx._stamp == stamp


def test_block_hashes_are_chained_and_capped() -> None:
    a = block_hashes("x" * 64 + "y" * 64, 64, 10)
    b = block_hashes("z" * 64 + "y" * 64, 64, 10)
    assert len(a) == 2 and a[1] != b[1]  # same second block, different prefix -> different hash
    assert len(block_hashes("x" * 10_000, 64, 8)) == 8
    assert block_hashes("x" * 63, 64, 8) == []
    assert block_hashes("é" * 64, 64, 8) == block_hashes("é" * 64, 64, 8)  # multi-byte ok


def test_least_latency_prefers_fast_pods_and_unknown_is_neutral() -> None:
    s = sched(only(scorers=(("least-latency", 1, None),)))
    pods = [
        pod("p1", ttft_seconds=0.4, tpot_seconds=0.02),
        pod("p2", ttft_seconds=0.1, tpot_seconds=0.02),
        pod("p3"),
    ]
    r = s.schedule(req(), pods)
    assert r.primary.name == "p2"
    sc = r.scores()
    assert sc["p2"] == pytest.approx(1.0)
    assert sc["p1"] == pytest.approx(0.5 * 0.25 + 0.5 * 1.0)
    assert sc["p3"] == pytest.approx((sc["p1"] + sc["p2"]) / 2)
    only_ttft = sched(only(scorers=(("least-latency", 1, {"tpot_weight": 0}),)))
    assert only_ttft.schedule(req(), pods).scores()["p1"] == pytest.approx(0.25)


def test_lora_affinity_order() -> None:
    s = sched(only(scorers=(("lora-affinity", 1, None),)))
    pods = [
        pod("p1", running_loras=frozenset({"sql"}), max_loras=2),  # active
        pod("p2", running_loras=frozenset({"x"}), max_loras=2),  # free slot
        pod(
            "p3", running_loras=frozenset({"x", "y"}), waiting_loras=frozenset({"sql"}), max_loras=2
        ),
        pod("p4", running_loras=frozenset({"x", "y"}), max_loras=2),  # none
    ]
    r = s.schedule(req(lora="sql"), pods)
    # p2's adapter list is unknown: it may hold the adapter (0.7), below a known holder (0.8)
    assert r.scores() == pytest.approx({"p1": 1.0, "p2": 0.7, "p3": 0.6, "p4": 0.0})
    assert [r.primary.name, *(p.name for p in r.fallbacks)] == ["p1", "p2", "p3"]


def test_lora_affinity_knows_loaded_adapters() -> None:
    s = sched(only(scorers=(("lora-affinity", 1, None),)))
    pods = [
        pod("p1", max_loras=2, loaded_loras=frozenset({"sql"})),  # loaded, free slot
        pod("p2", max_loras=2, loaded_loras=frozenset()),  # free slot but not loaded
        pod("p3", loaded_loras=frozenset({"sql"})),  # no LoRA metrics, list says loaded
        pod("p4", waiting=1),  # no adapter list: it may hold it, below the known holders
        pod("p5", stale=True),  # stale: the mean of the known scores (0.8 + 0 + 0.8 + 0.7) / 4
    ]
    r = s.schedule(req(lora="sql"), pods)
    assert r.scores() == pytest.approx({"p1": 0.8, "p2": 0.0, "p3": 0.8, "p4": 0.7, "p5": 2.3 / 4})


def test_a_pod_turning_ready_has_unknown_adapters_until_a_read_after_it() -> None:
    """The adapter list an engine gave while its pod was starting may lack adapters loaded
    before it turned ready: until a read that started after that, the datastore holds the list
    unknown, the LoRA filter keeps the pod and the scorer prefers pods known to hold it."""
    from extproc.datastore import Datastore
    from tests.extproc.helpers import config, server_yaml

    now = [100.0]
    ds = Datastore(clock=lambda: now[0])
    text = server_yaml("s", {"app": "x"})
    cfg = config(
        text, [("p1", "10.0.0.1:8000", {"app": "x"}), ("p2", "10.0.0.2:8000", {"app": "x"})]
    )
    starting = replace(cfg, endpoints=[replace(cfg.endpoints[0], ready=False), cfg.endpoints[1]])
    ds.apply(starting)
    p1, p2 = ds.snapshot.pods["p1"], ds.snapshot.pods["p2"]
    ds.publish_metrics("p2", metrics(loaded_loras=frozenset({"sql"}), loras_read_at=99.0))
    assert p2.metrics.loaded_loras is None  # read before p2 became ready (at 100)
    ds.publish_metrics("p2", metrics(loaded_loras=frozenset({"sql"}), loras_read_at=100.0))
    assert p2.metrics.loaded_loras == {"sql"}
    empty = metrics(loaded_loras=frozenset(), loras_read_at=101.0)  # read while starting
    ds.publish_metrics("p1", empty)
    assert p1.metrics.loaded_loras is None  # not ready: unknown
    now[0] = 102.0
    ds.apply(cfg)  # p1 turns ready; its adapters were loaded after the read at 101
    assert p1.ready and p1.metrics.loaded_loras is None
    ds.publish_metrics("p1", empty)  # metrics scrapes carry the old list: still unknown
    assert p1.metrics.loaded_loras is None
    s = sched(only("lora-capable", scorers=(("lora-affinity", 1, None),)))
    # unknown is not absent: p1 alone gets the request
    assert s.schedule(req(lora="sql"), [p1]).primary is p1
    # with a known holder beside it, the known holder is preferred, p1 stays a fallback
    r = s.schedule(req(lora="sql"), [p1, p2])
    assert r.primary is p2 and [p.name for p in r.fallbacks] == ["p1"]
    ds.publish_metrics("p1", metrics(loaded_loras=frozenset(), loras_read_at=102.0))
    assert p1.metrics.loaded_loras == frozenset()  # read since: known, and it lacks "sql"
    assert s.schedule(req(lora="sql"), [p1, p2]).primary is p2
    with pytest.raises(NoPodAvailable, match="1 pod has not loaded it"):
        s.schedule(req(lora="sql"), [p1])


def test_session_affinity_sticks_and_falls_back() -> None:
    profile = SchedulerProfile(
        filters=[PluginSpec(name="ready"), PluginSpec(name="saturation")],
        scorers=[
            PluginSpec(name="session-affinity", weight=10),
            PluginSpec(name="least-request", weight=1),
        ],
    )
    s = sched(profile)
    pods = [pod("p1", in_flight=0), pod("p2", in_flight=0), pod("p3", in_flight=0)]
    first = req("a", headers={"x-session-id": "chat-42"})
    r = s.schedule(first, pods)
    s.on_routed(first, r)
    home = r.primary
    for p in pods:
        p.in_flight = 0 if p is not home else 3  # home is busier, but the session sticks
    for i in range(10):
        assert s.schedule(req(f"n{i}", headers={"x-session-id": "chat-42"}), pods).primary is home
    # home saturated -> moves, and the session follows the new pod
    home.metrics = metrics(waiting=20)
    moved_req = req("m", headers={"x-session-id": "chat-42"})
    moved = s.schedule(moved_req, pods)
    assert moved.primary is not home
    s.on_routed(moved_req, moved)
    home.metrics = PodMetrics()
    assert s.schedule(req("z", headers={"x-session-id": "chat-42"}), pods).primary is moved.primary
    # gone -> the session is forgotten
    s.forget_pod(moved.primary.name)
    rest = [p for p in pods if p is not moved.primary]
    assert s.schedule(req("y", headers={"x-session-id": "chat-42"}), rest).primary in rest


def test_session_affinity_custom_header_and_session_key() -> None:
    s = sched(only(scorers=(("session-affinity", 1, {"header": "X-User"}),)))
    pods = [pod("p1"), pod("p2"), pod("p3"), pod("p4")]
    a = req("a", headers={"x-user": "alice"})
    ra = s.schedule(a, pods)
    s.on_routed(a, ra)
    assert s.schedule(req("b", headers={"x-user": "alice"}), pods).scores()[ra.primary.name] == 1
    k = req("c", session_key="tenant-1/bob")
    rk = s.schedule(k, pods)
    s.on_routed(k, rk)
    assert s.schedule(req("d", session_key="tenant-1/bob"), pods).scores()[rk.primary.name] == 1


def test_random_scorer_uses_injected_rng() -> None:
    pods = [pod(f"p{i}") for i in range(8)]
    a = [sched(only(scorers=(("random", 1, None),)), seed=7).schedule(req(), pods).primary.name]
    b = [sched(only(scorers=(("random", 1, None),)), seed=7).schedule(req(), pods).primary.name]
    assert a == b
    picks = {
        sched(only(scorers=(("random", 1, None),)), seed=i).schedule(req(), pods).primary.name
        for i in range(50)
    }
    assert len(picks) > 4


def test_weights_combine_scores() -> None:
    profile = only(scorers=(("kv-cache", 1, None), ("least-request", 3, None)))
    s = sched(profile)
    pods = [pod("p1", kv_cache_usage=0.0, in_flight=4), pod("p2", kv_cache_usage=0.9, in_flight=0)]
    r = s.schedule(req(), pods)
    # p1: 1*1.0 + 3*(4/8) = 2.5 ; p2: 1*0.1 + 3*1.0 = 3.1
    assert r.scores() == pytest.approx({"p1": 2.5, "p2": 3.1})
    assert r.primary.name == "p2"


def test_fallbacks_count_and_order() -> None:
    s = sched(only(scorers=(("least-request", 1, None),)), fallbacks=3)
    pods = [pod(f"p{i}", in_flight=i) for i in range(6)]
    r = s.schedule(req(), pods)
    assert [r.primary.name, *(p.name for p in r.fallbacks)] == ["p0", "p1", "p2", "p3"]
    assert r.endpoints() == ["10.0.0.0:8000", "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    assert sched(fallbacks=0).schedule(req(), pods).fallbacks == []
    assert len(sched().schedule(req(), pods).fallbacks) == 2  # default
    assert sched().schedule(req(), pods[:1]).fallbacks == []


def test_default_profile_runs_with_unknown_metrics() -> None:
    s = sched()
    pods = [Pod(name=f"p{i}", address=f"10.0.0.{i}:8000") for i in range(4)]
    r = s.schedule(req(prompt="hello " * 100, lora="sql"), pods)
    assert r.primary in pods
    s.on_routed(req(prompt="hello " * 100), r)
    s.on_finished("r1", r.primary.name)


@pytest.mark.parametrize("m", [0, 2, 5, 10])
def test_default_profile_prefix_stickiness_bound(m: int) -> None:
    """Default weights: a fully matched prompt stays on its pod while its load a < 3m + 8
    (m = least loaded pod's load); beyond that it spills to a less loaded pod."""
    prompt = "shared system prompt " * 50
    for a in range(m, 3 * m + 12):
        s = sched()
        pods = [pod("p1", in_flight=0), pod("p2", in_flight=0)]
        first = req("first", prompt=prompt)
        r = s.schedule(first, pods)
        s.on_routed(first, r)
        home = r.primary
        other = pods[1] if home is pods[0] else pods[0]
        home.in_flight, other.in_flight = a, m
        picked = s.schedule(req("again", prompt=prompt), pods).primary
        if a < 3 * m + 8:
            assert picked is home, (a, m)
        elif a > 3 * m + 8:
            assert picked is other, (a, m)
