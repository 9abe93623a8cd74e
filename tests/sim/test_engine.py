"""The pure engine core on simulated time only: deterministic, no sleeps, no sockets."""

from __future__ import annotations

import pytest

from sim.blockhash import BlockHash, ChainHasher, chain, hash_fn, root_hash
from sim.config import EngineConfig, TimingModel
from sim.engine import FINISHED, RUNNING, Engine, QueueFull, Request
from sim.kvcache import KVCacheManager

PROMPT_1K = [2000 + i for i in range(1000)]


def req(
    rid: str,
    prompt: list[int],
    out: int = 10,
    t: float = 0.0,
    **kw: object,
) -> Request:
    return Request(rid, list(prompt), [7] * out, arrival=t, **kw)  # type: ignore[arg-type]


def run_one(engine: Engine, r: Request, now: float = 0.0) -> float:
    engine.add(r)
    return engine.run_until_idle(now)


def test_defaults_look_like_an_8b_model_on_one_h100() -> None:
    e = Engine(EngineConfig())
    r = req("a", PROMPT_1K, out=20)
    run_one(e, r)
    assert r.first_token is not None
    assert 0.060 <= r.first_token <= 0.100  # TTFT of a 1k prompt at low load
    assert 0.010 <= e.stats.itl.mean() <= 0.020  # ITL at batch size 1
    assert r.status == FINISHED and r.num_output == 20 and r.finish_reason == "length"
    assert e.kv.pool.num_free == e.cfg.num_gpu_blocks  # everything released
    assert e.stats.prompt_tokens == 1000 and e.stats.generation_tokens == 20


def test_step_time_formula() -> None:
    t = TimingModel(step_base=0.01, prefill_per_token=0.001, decode_per_seq=0.002)
    e = Engine(EngineConfig(timing=t))
    e.add(req("a", [5] * 100, out=3))
    b = e.schedule(0.0)
    assert b is not None and b.prefill_tokens == 100 and b.decode_seqs == 0
    assert b.duration == pytest.approx(0.01 + 100 * 0.001)
    e.finish_step(b, b.end)
    b2 = e.schedule(b.end)
    assert b2 is not None and b2.prefill_tokens == 0 and b2.decode_seqs == 1
    assert b2.duration == pytest.approx(0.01 + 0.002)


def test_repeated_prompt_hits_prefix_cache_and_lowers_ttft() -> None:
    e = Engine(EngineConfig())
    a = req("a", PROMPT_1K)
    t = run_one(e, a)
    computed_first = e.stats.prefill_computed_tokens
    b = req("b", PROMPT_1K, t=t)
    run_one(e, b, t)
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 992  # 62 full blocks; the tail block is recomputed
    assert e.stats.prefix_queries == 2000 and e.stats.prefix_hits == 992
    assert e.stats.prefill_computed_tokens - computed_first == 1000 - 992
    assert a.first_token is not None and b.first_token is not None
    assert b.first_token - b.arrival < (a.first_token - a.arrival) / 3


def test_shared_prefix_with_different_tail() -> None:
    e = Engine(EngineConfig())
    t = run_one(e, req("a", PROMPT_1K))
    b = req("b", PROMPT_1K[:500] + [9] * 500, t=t)
    run_one(e, b, t)
    assert b.num_cached_tokens == 496  # 31 whole blocks of the shared 500 tokens


def test_lora_requests_do_not_share_the_base_models_cache() -> None:
    e = Engine(EngineConfig())
    t = run_one(e, req("a", PROMPT_1K))
    b = req("b", PROMPT_1K, t=t, lora="sql")
    run_one(e, b, t)
    assert b.num_cached_tokens == 0


def test_no_prefix_caching_when_disabled() -> None:
    e = Engine(EngineConfig(enable_prefix_caching=False))
    t = run_one(e, req("a", PROMPT_1K))
    b = req("b", PROMPT_1K, t=t)
    run_one(e, b, t)
    assert b.num_cached_tokens == 0 and e.stats.prefix_hits == 0


def itl_at(concurrency: int) -> float:
    e = Engine(EngineConfig(max_num_seqs=512))
    for i in range(concurrency):
        e.add(req(str(i), [3000 + i] * 32, out=64))
    e.run_until_idle()
    return e.stats.itl.mean()


def test_itl_grows_with_concurrency() -> None:
    one, many, lots = itl_at(1), itl_at(64), itl_at(256)
    assert one < many < lots
    assert lots > 2 * one


def test_chunked_prefill_respects_the_token_budget() -> None:
    e = Engine(EngineConfig(max_num_batched_tokens=2048))
    r = req("a", [11 + i % 5000 for i in range(5000)], out=2)
    e.add(r)
    chunks = []
    now = 0.0
    while r.first_token is None:
        b = e.schedule(now)
        assert b is not None
        chunks.append(b.prefill_tokens)
        now = b.end
        e.finish_step(b, now)
    assert chunks == [2048, 2048, 904]


def test_decodes_are_batched_with_a_prefill_chunk() -> None:
    e = Engine(EngineConfig(max_num_batched_tokens=512))
    e.add(req("a", [5] * 16, out=50))
    b = e.schedule(0.0)
    assert b is not None
    e.finish_step(b, b.end)
    e.add(req("b", [6] * 2000, out=5))
    b2 = e.schedule(b.end)
    assert b2 is not None
    assert b2.decode_seqs == 1 and b2.prefill_tokens == 511  # budget shared: 1 decode + chunk


def test_max_num_seqs_bounds_the_running_batch() -> None:
    e = Engine(EngineConfig(max_num_seqs=4))
    for i in range(10):
        e.add(req(str(i), [100 + i] * 20, out=5))
    now = 0.0
    peak = 0
    while e.has_work():
        b = e.schedule(now)
        assert b is not None
        peak = max(peak, len(e.running))
        assert e.num_waiting == 10 - e.stats.success["length"] - len(e.running)
        now = b.end
        e.finish_step(b, now)
    assert peak == 4


def test_fcfs_order_of_first_tokens() -> None:
    e = Engine(EngineConfig(max_num_seqs=2))
    rs = [req(str(i), [100 + i] * 20, out=5) for i in range(6)]
    for r in rs:
        e.add(r)
    e.run_until_idle()
    firsts = [r.first_token for r in rs]
    assert firsts == sorted(firsts)  # type: ignore[type-var]


def test_kv_exhaustion_preempts_and_everything_still_finishes() -> None:
    e = Engine(EngineConfig(num_gpu_blocks=64, max_model_len=1024))  # 1024 token slots
    rs = [req(str(i), [500 + i] * 100, out=200) for i in range(8)]  # 8 x 300 tokens
    for r in rs:
        e.add(r)
    e.run_until_idle()
    assert e.stats.preemptions > 0
    assert sum(r.num_preemptions for r in rs) == e.stats.preemptions
    assert all(r.status == FINISHED and r.num_output == 200 for r in rs)
    assert e.stats.generation_tokens == 8 * 200  # recompute emits nothing twice
    assert e.kv.pool.num_free == 64


def test_waiting_queue_bound() -> None:
    e = Engine(EngineConfig(max_waiting=2))
    e.add(req("a", [1] * 10))
    e.add(req("b", [2] * 10))
    with pytest.raises(QueueFull):
        e.add(req("c", [3] * 10))


def test_abort_frees_blocks_and_counts() -> None:
    e = Engine(EngineConfig())
    r = req("a", PROMPT_1K, out=100)
    e.add(r)
    b = e.schedule(0.0)
    assert b is not None
    e.finish_step(b, b.end)
    assert r.status == RUNNING and e.kv.pool.num_free < e.cfg.num_gpu_blocks
    e.abort(r, b.end)
    assert e.kv.pool.num_free == e.cfg.num_gpu_blocks
    assert e.stats.success["abort"] == 1 and not e.has_work()
    w = req("w", [1] * 10)
    e.add(w)
    e.abort(w, 0.0)
    assert not e.waiting


def test_max_loras_limits_adapters_per_batch() -> None:
    e = Engine(EngineConfig(max_loras=1))
    rs = [req(f"{i}", [40 + i] * 20, out=10, lora=name) for i, name in enumerate("abab")]
    for r in rs:
        e.add(r)
    now = 0.0
    while e.has_work():
        b = e.schedule(now)
        assert b is not None
        assert len({r.lora for r in e.running}) <= 1
        assert len(e.running_loras()) <= 1
        now = b.end
        e.finish_step(b, now)
    assert all(r.status == FINISHED for r in rs)


def test_remote_prefill_pays_transfer_not_compute() -> None:
    t = TimingModel(kv_transfer_base=0.002, kv_transfer_per_token=1e-5)
    e = Engine(EngineConfig(timing=t))
    r = req("d", PROMPT_1K, out=5, remote_prefill=True)
    e.add(r)
    b = e.schedule(0.0)
    assert b is None  # only a transfer in flight
    assert e.num_waiting == 1 and e.stats.kv_transfers == 1
    ready = e.next_transfer_time()
    assert ready == pytest.approx(0.002 + 999 * 1e-5)
    e.run_until_idle(0.0)
    assert r.status == FINISHED and r.num_output == 5
    assert e.stats.prefill_computed_tokens == 1  # only the last prompt token was computed here
    assert r.first_token is not None and r.first_token < 0.078  # cheaper than computing 1k


def test_remote_decode_stops_after_prefill_and_reports_blocks() -> None:
    e = Engine(EngineConfig())
    r = Request("p", PROMPT_1K, [7], arrival=0.0, remote_decode=True)
    run_one(e, r)
    assert r.num_output == 1 and r.finish_reason == "length"
    assert len(r.kv_block_ids) == 63  # ceil(1000 / 16)


def test_lookup_always_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(8)))
    assert kv.allocate(a, 8)
    a.num_computed = 8
    kv.cache_computed(a)
    kv.free(a)
    b = req("b", list(range(8)))
    hits = kv.lookup(b, 8)
    assert len(hits) == 1  # both blocks cached, but the last must be recomputed


def test_lru_eviction_of_free_cached_blocks() -> None:
    e = Engine(EngineConfig(num_gpu_blocks=80, max_model_len=1024))
    t = run_one(e, req("a", PROMPT_1K[:640]))  # 40 blocks cached, then freed
    t = run_one(e, req("b", [9000 + i for i in range(1000)], t=t), t)  # needs 63: evicts
    again = req("c", PROMPT_1K[:640], t=t)
    run_one(e, again, t)
    assert again.num_cached_tokens < 640 - 16


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "builtin"])
def test_chain_hasher_gives_the_digests_of_the_plain_chain(algo: str) -> None:
    """Memo and donor prefixes are exact: every digest equals what ``chain`` computes, whatever
    earlier sequences of the process shared (a prefix, a whole span, nothing, another LoRA)."""
    fn, root = hash_fn(algo), root_hash(algo, "7")
    hasher = ChainHasher(algo, "7", 4)
    base = list(range(1000, 1200))
    seqs = [
        base,  # first: nothing to share
        base[:101] + [5] * 99,  # shares 25 blocks, then differs inside a span
        base[:64] + [6] * 136,  # differs exactly at a span boundary (16 blocks of 4)
        list(base),  # all of it
        [9, *base[1:]],  # differs in the first block: no donor
        base[:3],  # shorter than a block
    ]
    for ids in seqs:
        for extra in (None, ("adapter-a",)):
            hs: list[BlockHash] = []
            hasher.extend(ids, extra, hs, len(ids) // 4 - 3)  # a lookup, then more blocks
            hasher.extend(ids, extra, hs, len(ids) // 4)
            assert hs == chain(fn, root, ids, 4, extra)


def test_a_waiting_lookup_sees_evictions_and_new_blocks() -> None:
    """Looking the same sequence up again (a request waiting for room) reuses the last answer
    only while it is still true."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True, hash_seed="0")
    a = req("a", list(range(16)))
    assert kv.allocate(a, 16)
    a.num_computed = 8  # two blocks computed and cached
    kv.cache_computed(a)
    b = req("b", list(range(16)))
    assert len(kv.lookup(b, 16)) == 2
    a.num_computed = 16  # a third block cached (the fourth is b's last token: left to compute)
    kv.cache_computed(a)
    assert len(kv.lookup(b, 16)) == 3
    kv.free(a)  # its blocks go to the free queue, still cached
    assert len(kv.lookup(b, 16)) == 3
    other = req("c", [500 + i for i in range(32)])
    assert kv.allocate(other, 32)  # takes all 8 blocks: the cached ones are evicted
    assert kv.lookup(b, 16) == []


def test_a_lookup_reuses_the_last_ones_prefix_only_while_it_is_true() -> None:
    """Sequences that start alike (a shared system prompt) reuse the last lookup's prefix; every
    answer equals a lookup from scratch, through evictions, new blocks and diverging prompts."""
    import random

    rng = random.Random(5)
    kv = KVCacheManager(num_blocks=24, block_size=4, enable_prefix_caching=True, hash_seed="0")
    starts = [list(range(s * 100, s * 100 + 24)) for s in range(3)]  # three shared prompt starts
    held: list[Request] = []
    reused = 0
    for i in range(400):
        ids = rng.choice(starts)[: rng.randint(4, 24)] + [7000 + i] * rng.randint(0, 9)
        seq = req(f"r{i}", ids)
        before = kv._last_lookup
        hits = kv.lookup(seq, len(ids))
        if before is not None and before[1] == kv.pool.evictions and before[2]:
            reused += before[2] == hits[: len(before[2])]
        kv._last_lookup = None
        assert hits == kv.lookup(seq, len(ids)), i  # from scratch
        if rng.random() < 0.5 and kv.allocate(seq, len(ids) - len(hits) * 4, hits):
            seq.num_computed = len(ids)
            kv.cache_computed(seq)
            held.append(seq)
        elif rng.random() < 0.5:  # an unrelated sequence takes free blocks: evicts some
            filler = req(f"f{i}", [9000 + 50 * i + j for j in range(rng.randint(4, 40))])
            if kv.allocate(filler, len(filler.prompt_ids)):
                held.append(filler)
        while held and (len(held) > 3 or rng.random() < 0.3):
            kv.free(held.pop(rng.randrange(len(held))))
    assert kv.pool.evictions > 20 and reused > 20  # both paths were taken


# ---------------------------------------------------------------------- decode fast-forward


def _per_step(e: Engine) -> float:
    return e.run_until_idle()


def _fast_forward(e: Engine) -> tuple[float, int]:
    """run_until_idle, with each batch's repeats applied in one ``repeat_decode`` call."""
    now, repeated = 0.0, 0
    while e.has_work():
        batch = e.schedule(now)
        assert batch is not None
        m = e.decode_repeats(batch)
        ends, end = [], batch.start + batch.duration
        for _ in range(m):
            ends.append(end)
            end += batch.duration
        e.repeat_decode(batch, ends)
        repeated += m
        e.finish_step(batch, end)
        now = end
    return now, repeated


def _state(e: Engine, rs: list[Request]) -> object:
    s = e.stats
    pool = e.kv.pool
    hists = [(h.counts, h.sum, h.count) for h in (s.ttft, s.itl, s.e2e, s.decode_time)]
    return (
        (s.steps, s.busy_time, s.generation_tokens, s.prefill_computed_tokens, s.preemptions),
        (s.prefix_queries, s.prefix_hits, hists),
        [(r.first_token, r.last_token, r.finished_at, r.num_output, r.num_preemptions) for r in rs],
        (list(pool.free), dict(pool.cached), list(pool.block_hash), list(pool.ref)),
        pool.events,
    )


@pytest.mark.parametrize(
    ("blocks", "caching"), [(4096, True), (200, True), (120, True), (120, False)]
)
def test_decode_fast_forward_is_exactly_the_per_step_loop(blocks: int, caching: bool) -> None:
    """Same steps, times, statistics, block allocations and registrations (in the same order:
    free queue, hash map and KV events equal), also when KV room bounds the repeats or runs out
    (preemption) and when allocation evicts cached blocks."""

    def workload() -> list[Request]:
        return [
            req(str(i), [100 + i % 3] * (40 + 7 * i) + [i], out=20 + (37 * i) % 150, t=0.001 * i)
            for i in range(24)
        ]

    cfg = EngineConfig(
        num_gpu_blocks=blocks,
        block_size=4,
        max_num_seqs=32,
        max_num_batched_tokens=256,
        enable_prefix_caching=caching,
        max_model_len=400,
        hash_seed="0",
    )
    runs = []
    for fast in (False, True):
        e = Engine(cfg, record_events=True)
        # a warm-up request leaves cached blocks in the free queue for allocations to evict
        run_one(e, req("warm", [100] * 400, out=3))
        rs = workload()
        for r in rs:
            e.add(r)
        end, repeated = _fast_forward(e) if fast else (_per_step(e), 0)
        runs.append((end, _state(e, rs), repeated))
    (end_a, state_a, _), (end_b, state_b, repeated) = runs
    assert repeated > 100  # the fast path was taken
    assert blocks > 1000 or state_a[0][4] > 0  # type: ignore[index]  # preempted
    assert end_a == end_b
    assert state_a == state_b


def test_decode_repeats_only_for_a_whole_decoding_batch_with_room() -> None:
    cfg = EngineConfig(num_gpu_blocks=40, block_size=4, max_model_len=100)
    e = Engine(cfg)
    a, b = req("a", [1] * 8, out=30), req("b", [2] * 8, out=12)
    e.add(a)
    batch = e.schedule(0.0)
    assert batch is not None and e.decode_repeats(batch) == 0  # a prefill
    e.finish_step(batch, batch.end)
    batch = e.schedule(batch.end)
    assert batch is not None
    assert e.decode_repeats(batch) == 30 - 1 - 1  # until a's last token
    e.add(b)
    assert e.decode_repeats(batch) == 0  # b waits: the next step admits it
    e.finish_step(batch, batch.end)
    batch = e.schedule(batch.end)  # a decodes, b prefills
    assert batch is not None and e.decode_repeats(batch) == 0
    e.finish_step(batch, batch.end)
    batch = e.schedule(batch.end)
    assert batch is not None and batch.decode_seqs == 2
    # b finishes first: its 11 tokens left end the run; KV room: 40 blocks, 2 x 3 in use
    assert e.decode_repeats(batch) == 12 - b.num_output - 1
    # a pool this small bounds the repeats by the blocks the next tokens need
    unbounded = e.decode_repeats(batch)
    e.kv.pool.take(e.kv.pool.num_free - 1)

    def need(m: int) -> int:  # blocks for the step after m repeats
        return sum(max(0, -(-(r.num_tokens + m) // 4) - len(r.block_ids)) for r in (a, b))

    m = e.decode_repeats(batch)
    assert 0 < m < unbounded and need(m) <= 1 < need(m + 1)
    left, a_out = 1 - need(m), a.num_output
    e.repeat_decode(batch, [batch.end + i * batch.duration for i in range(m)])
    assert e.kv.pool.num_free == left and a.num_output == a_out + m


@pytest.mark.parametrize("blocks", [44, 48, 56, 64])
@pytest.mark.parametrize("caching", [True, False])
def test_decode_fast_forward_past_a_waiting_request_is_exactly_the_per_step_loop(
    blocks: int, caching: bool
) -> None:
    """Decode steps repeat while the waiting head cannot get its blocks; each repeat's failed
    admission counts its prefix lookup. The repeats stop where the head's cached prefix would
    change: a decode allocation takes one of its hit blocks from the free queue (small pools),
    or a running request registers the block that extends it (``b`` continues ``a``'s answer,
    whose tokens ``a`` is still producing)."""
    prompt = [100 + i for i in range(32)]
    cfg = EngineConfig(
        num_gpu_blocks=blocks,
        block_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        enable_prefix_caching=caching,
        max_model_len=160,
        hash_seed="0",
    )

    def workload() -> list[Request]:
        return [
            req("a", prompt, out=120, t=0.0),
            req("c", [300 + i for i in range(60)], out=90, t=0.001),
            req("d", prompt[:16] + [500 + i for i in range(30)], out=70, t=0.002),
            req("b", prompt + [7] * 48 + [9, 9, 9], out=20, t=0.003),
            req("e", prompt + [7] * 8, out=15, t=0.004),
        ]

    runs = []
    for fast in (False, True):
        e = Engine(cfg, record_events=True)
        run_one(e, req("warm", [100] * 40 + prompt, out=3))  # cached blocks in the free queue
        rs = workload()
        for r in rs:
            e.add(r)
        if fast:
            waited = 0
            now = 0.0
            while e.has_work():
                batch = e.schedule(now)
                assert batch is not None
                m = e.decode_repeats(batch)
                ends, end = [], batch.start + batch.duration
                for _ in range(m):
                    ends.append(end)
                    end += batch.duration
                waited += m if e.waiting else 0
                e.repeat_decode(batch, ends)
                e.finish_step(batch, end)
                now = end
            runs.append((now, _state(e, rs), waited))
        else:
            runs.append((_per_step(e), _state(e, rs), 0))
    (end_a, state_a, _), (end_b, state_b, waited) = runs
    assert waited > 0  # repeats past a waiting request were taken
    assert end_a == end_b
    assert state_a == state_b
