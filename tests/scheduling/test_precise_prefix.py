"""The precise-prefix scorer: the engines' own KV events against the approximate index."""

from __future__ import annotations

import random
from unittest import mock

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.kvevents import decode_batch
from extproc.kvindex import KVBlockIndex, PromptHasher
from extproc.parsing import parse_body
from extproc.scheduling import DEFAULT_PROFILE, build_scheduler, plugins
from extproc.scheduling.plugins import (
    PRECISE,
    Context,
    LeastRequestArgs,
    LeastRequestScorer,
    PrecisePrefixArgs,
    PrecisePrefixScorer,
    PrefixCacheArgs,
    PrefixCacheScorer,
)
from extproc.scheduling.tokenizers import ModelTokenizer, load_tokenizer
from extproc.scheduling.types import SchedulingRequest, SchedulingResult
from fleet.pods import Pod, PodMetrics
from sim.config import EngineConfig
from sim.engine import Engine, Request
from sim.kvevents import encode_batch
from sim.tokenizer import WORDS, Tokenizer, apply_chat_template

COMPLETIONS = {":path": "/v1/completions"}


def sim_tokenizer() -> ModelTokenizer:
    """The simulator's shipped files, loaded by the gateway's generic code."""
    tok = load_tokenizer("simulator")
    assert tok is not None
    return tok


CHAT = {":path": "/v1/chat/completions"}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_simulator_tokenizer_matches_the_simulator(text: str) -> None:
    assert sim_tokenizer().encode(text) == Tokenizer().encode(text)


def test_chat_prompt_is_tokenized_with_the_simulators_template() -> None:
    messages = [("system", "Be brief."), ("user", "What is a KV cache?\nExplain: slowly.")]
    body = {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}
    flattened = parse_body("chat", orjson.dumps(body)).prompt
    ids = sim_tokenizer().prompt_ids(flattened, CHAT)
    assert ids == Tokenizer().encode(apply_chat_template(messages))
    assert sim_tokenizer().prompt_ids("user: hi", COMPLETIONS) == Tokenizer().encode("user: hi")


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet="ab cd\n,é", max_size=1500),
    st.lists(st.text(alphabet="ab cd\n,é", max_size=700), min_size=1, max_size=4),
    st.sampled_from([None, "ad"]),
    st.integers(1, 40),
)
def test_prefix_segment_cache_equals_hashing_the_whole_prompt(
    prefix: str, suffixes: list[str], lora: str | None, max_blocks: int
) -> None:
    scorer = PrecisePrefixScorer(
        PrecisePrefixArgs(tokenizer="simulator", maxBlocks=max_blocks), index=KVBlockIndex()
    )
    naming = ("sha256", "0", 4)
    hasher = PromptHasher("sha256", "0", 4)
    with mock.patch.object(plugins, "_SEGMENT", 16):  # many segments per prompt
        for suffix in suffixes:  # later prompts reuse the cached segments of the shared prefix
            request = SchedulingRequest("r", "m", lora=lora, prompt=prefix + suffix, headers=CHAT)
            ids = Tokenizer().encode(sim_tokenizer().chat_text(prefix + suffix))
            want = (len(ids), hasher.hashes(ids, lora, max_blocks))
            assert scorer.hashes(request, naming) == want


def engine() -> Engine:
    cfg = EngineConfig(
        block_size=16, num_gpu_blocks=64, max_model_len=1024, hash_seed="0",
        max_num_batched_tokens=4096,
    )  # fmt: skip
    return Engine(cfg, record_events=True)


def run(eng: Engine, text: str, rid: str) -> None:
    eng.add(Request(rid, Tokenizer().encode(text), [1], 0.0))
    eng.run_until_idle()


def feed(index: KVBlockIndex, pod: str, eng: Engine) -> None:
    """The engine's events through vLLM's wire format into the index."""
    index.register(pod, "sha256", "0")  # the ModelServer's kvEvents (the engines' settings)
    _, events = decode_batch(encode_batch(0.0, eng.kv.take_events()))
    index.apply(pod, events)


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))  # one token each


def pods() -> list[Pod]:
    m = PodMetrics(waiting=0, running=0, stale=False)
    return [Pod("a", "10.0.0.1:8000", metrics=m), Pod("b", "10.0.0.2:8000", metrics=m)]


def ctx(prompt: str) -> Context:
    request = SchedulingRequest("r", "m", prompt=prompt, headers=COMPLETIONS)
    return Context(request, 0.0, random.Random(0), "the ModelServer", {})


def test_precise_scorer_sees_the_eviction_the_approximate_index_cannot() -> None:
    shared = words(300, 1)  # ~19 blocks of 16 tokens
    a, b = engine(), engine()
    index = KVBlockIndex()
    approx = PrefixCacheScorer(PrefixCacheArgs(block_size=64))
    precise = PrecisePrefixScorer(PrecisePrefixArgs(), index=index)
    pa, pb = pods()

    # the prefix was served by pod a first (the approximate index credits a) ...
    run(a, shared, "1")
    approx.on_routed(SchedulingRequest("1", "m", prompt=shared), SchedulingResult(pa))
    # ... later by pod b too, which the approximate index never credited (another gateway)
    run(b, shared, "2")
    # then other prompts fill pod a's cache and evict the shared prefix
    for i in range(3):
        run(a, words(500, 100 + i), f"x{i}")
    feed(index, "a", a)
    feed(index, "b", b)

    assert approx.score(ctx(shared), [pa, pb]) == [1.0, 0.0]  # still believes pod a
    sa, sb = precise.score(ctx(shared), [pa, pb]) or []
    assert sb == 1.0 and sa < 0.3  # pod b really holds it
    assert a.kv.lookup(Request("q", Tokenizer().encode(shared), [1], 0.0), 300) == []


def test_load_outweighs_a_cached_prefix_in_prompt_tokens() -> None:
    shared = words(200, 2)
    a = engine()
    index = KVBlockIndex()
    run(a, shared, "1")
    feed(index, "a", a)
    feed(index, "b", engine())  # b is subscribed but holds nothing
    index.block_sizes["b"] = 16  # (learned from its first BlockStored)
    pa, pb = pods()
    # no prefix homes here: the exchange rate between load and a miss alone
    precise = PrecisePrefixScorer(PrecisePrefixArgs(request_cost=100, copy_cost=0), index=index)
    n = len(Tokenizer().encode(shared))
    left = n - (n // 16) * 16  # pod a must still prefill the partial last block
    assert precise.score(ctx(shared), [pa, pb]) == [1.0, (left + 16) / (n + 16)]
    pa.in_flight = 5  # 5 x 100 prompt-token equivalents queued > the ~400 tokens saved
    sa, sb = precise.score(ctx(shared), [pa, pb]) or []
    assert sb == 1.0 and sa < 1.0


def test_a_held_prefix_stays_on_its_home_while_load_is_within_its_copy_cost() -> None:
    """A prefix some pod holds is homed on the pod homing the fewest prefixes (ties: the
    cheapest); another pod pays ``copy_cost`` x prompt tokens for the cache slot a copy would
    take, so it stays on its home until the home's load outweighs that."""
    shared = words(1000, 7)
    a = engine()
    run(a, shared, "1")
    index = KVBlockIndex()
    feed(index, "a", a)
    feed(index, "b", engine())
    index.block_sizes["b"] = 16
    pa, pb = pods()
    args = PrecisePrefixArgs(tokenizer="simulator", request_cost=100)  # no pod confirms "auto"
    precise = PrecisePrefixScorer(args, index=index)
    n = len(Tokenizer().encode(shared))
    left = n - (n // 16) * 16  # pod a must still prefill the partial last block
    assert (precise.score(ctx(shared), [pa, pb]) or [])[0] == 1.0
    assert precise.homes.homed("a") == 1
    # without homes b would win once a carries (n - left) / 100 more requests; with them, a
    # keeps it until its load outweighs a copy too (2 n - left tokens)
    pa.in_flight = (n - left) // 100 + 1
    sa, sb = precise.score(ctx(shared), [pa, pb]) or []
    assert sa == 1.0 and sb < 1.0
    pa.in_flight = (2 * n - left) // 100 + 1
    sa, sb = precise.score(ctx(shared), [pa, pb]) or []
    assert sb == 1.0 and sa < 1.0
    precise.forget_pod("a")
    assert precise.homes.homed("a") == 0 and len(precise.homes) == 0


def route(precise: PrecisePrefixScorer, prompt: str, candidates: list[Pod], rid: str) -> Pod:
    """Score ``prompt``, send it to the best pod (as the gateway does) and return that pod."""
    c = ctx(prompt)
    c.request.request_id = rid
    scores = precise.score(c, candidates) or []
    best = candidates[scores.index(max(scores))]
    precise.on_routed(c.request, SchedulingResult(best, plugin_state=c.state))
    return best


def test_a_cold_prefix_goes_where_the_least_prefill_is_ahead_and_is_homed_there() -> None:
    """No pod holds the prefix: it is prefilled wherever it goes, so it goes to the pod where
    that starts soonest - the prefill still ahead there (sent, its blocks not yet reported
    stored) counts with the load - and that pod becomes its home. A prefix on its way to a pod
    is not cold: the next request of it follows it there."""
    a, b = engine(), engine()
    index = KVBlockIndex()
    for name, eng in (("a", a), ("b", b)):
        feed(index, name, eng)
        index.block_sizes[name] = 16
    pa, pb = pods()
    args = PrecisePrefixArgs(tokenizer="simulator", request_cost=100)
    precise = PrecisePrefixScorer(args, index=index)
    v, w, x, y = (words(500, seed) for seed in (11, 12, 13, 14))
    pa.in_flight, pb.in_flight = 5, 0
    assert route(precise, v, [pa, pb], "v") is pb
    run(b, v, "v")  # b computed v: its events say so, nothing is ahead there
    feed(index, "b", b)
    pa.in_flight, pb.in_flight = 0, 1
    assert route(precise, w, [pa, pb], "w") is pa  # w's prefill is now ahead on a
    assert (precise.homes.homed("a"), precise.homes.homed("b")) == (1, 1)
    pa.in_flight = pb.in_flight = 1
    assert route(precise, w, [pa, pb], "w2") is pa  # on its way to a: follows it
    pa.in_flight, pb.in_flight = 2, 3
    # a carries fewer requests and homes as many prefixes, but w's ~500 tokens are ahead there
    assert route(precise, x, [pa, pb], "x") is pb
    assert (precise.homes.homed("a"), precise.homes.homed("b")) == (1, 2)
    run(a, w, "w")  # a reports w stored: nothing ahead there any more
    feed(index, "a", a)
    pb.in_flight = 4
    assert route(precise, y, [pa, pb], "y") is pa


def test_a_pod_that_holds_the_prefix_pays_no_copy_cost() -> None:
    """The copy cost is for the blocks a pod would newly cache: when the home lost the prefix
    and another pod really holds it (its events say so), that pod wins at equal load."""
    shared = words(1000, 9)
    a, b = engine(), engine()
    index = KVBlockIndex()
    feed(index, "a", a)
    feed(index, "b", b)
    index.block_sizes["a"] = index.block_sizes["b"] = 16
    pa, pb = pods()
    precise = PrecisePrefixScorer(PrecisePrefixArgs(tokenizer="simulator"), index=index)
    assert (precise.score(ctx(shared), [pa, pb]) or [])[0] == 1.0  # homed on a
    run(b, shared, "1")  # b gets the prompt from elsewhere; a never held it
    feed(index, "b", b)
    sa, sb = precise.score(ctx(shared), [pa, pb]) or []
    assert sb == 1.0 and sa < 0.6


def test_abstains_without_kv_events() -> None:
    precise = PrecisePrefixScorer(PrecisePrefixArgs(), index=KVBlockIndex())
    assert precise.score(ctx(words(100, 3)), pods()) is None


def test_default_profile_routes_on_events_when_they_are_followed() -> None:
    shared = words(300, 5)
    a, b = engine(), engine()
    run(a, shared, "1")
    run(b, shared, "2")
    for i in range(3):
        run(a, words(300, 200 + i), f"x{i}")  # evicts the shared prefix on pod a
    index = KVBlockIndex()
    feed(index, "a", a)
    feed(index, "b", b)
    sched = build_scheduler(DEFAULT_PROFILE, rng=random.Random(0))
    precise = next(s for s, _ in sched.scorers if isinstance(s, PrecisePrefixScorer))
    approx = next(s for s, _ in sched.scorers if isinstance(s, PrefixCacheScorer))
    pa, pb = pods()
    approx.index.credit("a", approx.hashes(SchedulingRequest("0", "m", prompt=shared)))
    request = SchedulingRequest("r", "m", prompt=shared, headers=COMPLETIONS)

    precise.index = KVBlockIndex()  # no events followed: the approximate scorers decide
    result = sched.schedule(request, [pa, pb])
    assert result.primary is pa and PRECISE not in result.plugin_state

    precise.index = index  # events followed: the engines' truth, in one unit
    result = sched.schedule(request, [pa, pb])
    assert result.primary is pb and result.plugin_state[PRECISE] is True


def test_prefix_cache_and_least_request_abstain_when_precise_scored() -> None:
    c = ctx("some prompt words " * 40)
    c.state[PRECISE] = True
    assert PrefixCacheScorer(PrefixCacheArgs()).score(c, pods()) is None
    assert LeastRequestScorer(LeastRequestArgs()).score(c, pods()) is None
