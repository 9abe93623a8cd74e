"""parse_metrics on realistic vLLM / SGLang pages, histogram deltas, staleness, and the scraper
against small aiohttp servers on 127.0.0.x (one healthy, one slow, one dead)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from extproc.scraper import (
    MetricsScraper,
    ScrapeTarget,
    is_connection_refused,
    parse_loaded_loras,
)
from fleet.engine_metrics import LatencyState, parse_metrics
from fleet.pods import PodMetrics
from matrixinfer.process import free_port
from matrixinfer.testing.engine_pages import EngineState, sglang_page, vllm_page

# ------------------------------------------------------------------------------------- parsing


def test_vllm_page_maps_every_field() -> None:
    page = vllm_page(
        EngineState(
            waiting=3,
            running=5,
            kv_usage=0.42,
            running_loras=("sql", "chat"),
            waiting_loras=("math",),
            max_lora=4,
        )
    )
    assert "vllm:time_to_first_token_seconds_bucket{" in page and 'le="0.001"' in page
    assert "vllm:prompt_tokens_total{" in page  # counters carry the _total suffix
    m, state = parse_metrics(page, "vLLM", None, now=12.5)
    assert (m.waiting, m.running, m.kv_cache_usage) == (3.0, 5.0, 0.42)
    # the lora_requests_info sample with the latest value wins over the older one
    assert m.running_loras == frozenset({"sql", "chat"})
    assert m.waiting_loras == frozenset({"math"})
    assert m.max_loras == 4
    assert m.scraped_at == 12.5 and m.stale is False
    # first read: histogram totals recorded, no interval yet
    assert m.ttft_seconds is None and m.tpot_seconds is None
    assert isinstance(state, LatencyState) and state.ttft_count == 0


def test_vllm_legacy_names_fall_back() -> None:
    page = vllm_page(EngineState(kv_usage=0.7, tpot_sum=0.2, tpot_count=10, legacy_names=True))
    assert "vllm:gpu_cache_usage_perc{" in page and "vllm:kv_cache_usage_perc" not in page
    assert "vllm:inter_token_latency_seconds" not in page
    m, st = parse_metrics(page, "vLLM", None, 0.0)
    assert m.kv_cache_usage == 0.7
    page2 = vllm_page(
        EngineState(kv_usage=0.7, tpot_sum=0.2 + 0.5, tpot_count=20, legacy_names=True)
    )
    m2, _ = parse_metrics(page2, "vLLM", st, 1.0)
    assert m2.tpot_seconds == pytest.approx(0.05)


def test_vllm_data_parallel_engines_sum_queues_and_average_kv() -> None:
    page = vllm_page(EngineState(waiting=6, running=10, kv_usage=0.5, engines=2))
    assert page.count("vllm:num_requests_waiting{") == 2
    m, _ = parse_metrics(page, "vLLM", None, 0.0)
    assert (m.waiting, m.running, m.kv_cache_usage) == (6.0, 10.0, 0.5)


def test_sglang_page() -> None:
    page = sglang_page(EngineState(waiting=2, running=7, kv_usage=0.31, ttft_sum=1.0, ttft_count=4))
    m, st = parse_metrics(page, "SGLang", None, 0.0)
    assert (m.waiting, m.running, m.kv_cache_usage) == (2.0, 7.0, 0.31)
    assert m.max_loras is None and m.running_loras == frozenset()
    page2 = sglang_page(
        EngineState(
            waiting=0,
            running=1,
            kv_usage=0.2,
            ttft_sum=1.0 + 0.6,
            ttft_count=7,
            tpot_sum=0.1,
            tpot_count=5,
        )
    )
    m2, _ = parse_metrics(page2, "SGLang", st, 0.2)
    assert m2.ttft_seconds == pytest.approx(0.2)  # 0.6 s over 3 new requests
    assert m2.tpot_seconds == pytest.approx(0.02)  # 0.1 s over 5 new tokens


def test_hand_written_exposition_details() -> None:
    page = (
        "vllm:num_requests_waiting 4\n"  # first line, no labels
        "# HELP vllm:num_requests_running Number of requests.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        # label values with spaces and braces, then a timestamp
        'vllm:num_requests_running{model_name="a b {c}",engine="0"} 2.0 1700000000000\n'
        'vllm:num_requests_waiting_by_reason{reason="x"} 99\n'  # a longer name is not ours
        "vllm:kv_cache_usage_perc NaN\n"
        "vllm:time_to_first_token_seconds_sum 3.0\r\n"
        "vllm:time_to_first_token_seconds_count 6\r\n"
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",'
        'waiting_lora_adapters=""} 5\n'
    )
    m, st = parse_metrics(page, "vLLM", None, 0.0)
    assert m.waiting == 4.0 and m.running == 2.0
    assert m.kv_cache_usage is None
    assert m.max_loras == 2 and m.running_loras == frozenset()
    assert st.ttft_sum == 3.0 and st.ttft_count == 6.0


def test_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"unknown inference engine 'TGI' \(known: vLLM, SGLang, MatrixInfer\)"
    ):
        parse_metrics("", "TGI", None, 0.0)


def test_empty_page_is_all_unknown_but_fresh() -> None:
    m, _ = parse_metrics("", "vLLM", None, 3.0)
    assert m == PodMetrics(scraped_at=3.0, stale=False)


# --------------------------------------------------------------------------- histogram deltas


def page_with(ttft_sum: float, ttft_count: int) -> str:
    return (
        f"vllm:time_to_first_token_seconds_sum {ttft_sum}\n"
        f"vllm:time_to_first_token_seconds_count {ttft_count}\n"
    )


def test_histogram_interval_means() -> None:
    m, st = parse_metrics(page_with(10.0, 100), "vLLM", None, 0.0)
    assert m.ttft_seconds is None
    m, st = parse_metrics(page_with(12.0, 110), "vLLM", st, 0.2)
    assert m.ttft_seconds == pytest.approx(0.2)  # 2 s over 10 requests, not 12/110
    # no new request: the last interval's mean is kept ...
    m, st = parse_metrics(page_with(12.0, 110), "vLLM", st, 5.0)
    assert m.ttft_seconds == pytest.approx(0.2)
    # ... for latency_window seconds after it was observed, then unknown
    m, st = parse_metrics(page_with(12.0, 110), "vLLM", st, 10.3)
    assert m.ttft_seconds is None
    m, st = parse_metrics(page_with(13.0, 112), "vLLM", st, 10.5)
    assert m.ttft_seconds == pytest.approx(0.5)


def test_histogram_counter_reset_starts_over() -> None:
    _, st = parse_metrics(page_with(10.0, 100), "vLLM", None, 0.0)
    m, st = parse_metrics(page_with(12.0, 110), "vLLM", st, 0.2)
    assert m.ttft_seconds == pytest.approx(0.2)
    m, st = parse_metrics(page_with(0.5, 2), "vLLM", st, 0.4)  # engine restarted
    assert m.ttft_seconds is None
    m, st = parse_metrics(page_with(1.5, 4), "vLLM", st, 0.6)
    assert m.ttft_seconds == pytest.approx(0.5)


# ----------------------------------------------------------------------------- scraper (HTTP)


@dataclass
class FakeEngine:
    """A tiny aiohttp server on 127.0.0.x serving a settable /metrics page."""

    host: str
    page: str = ""
    delay: float = 0.0
    status: int = 200
    hits: int = 0
    loras: list[str] | None = None  # adapters /v1/models lists (vLLM style); None: 404
    model_hits: int = 0
    runner: web.AppRunner | None = None
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.delay:
            # slow pod: answer only after `delay` or when released at teardown
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.delay)
        return web.Response(text=self.page, status=self.status, content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        self.model_hits += 1
        if self.loras is None:
            return web.json_response({"error": "not found"}, status=404)
        base = {"id": "base", "object": "model", "root": "base", "parent": None}
        cards = [
            {"id": n, "object": "model", "root": f"/l/{n}", "parent": "base"} for n in self.loras
        ]
        return web.json_response({"object": "list", "data": [base, *cards]})

    async def start(self, port: int = 0) -> None:
        """Listen on a free port (or on ``port``, e.g. to restart on the same address)."""
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        self.port = port or free_port(self.host)
        await web.TCPSite(self.runner, self.host, self.port).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., FakeEngine]]:
    started: list[FakeEngine] = []

    def make(host: str, page: str = "", **kw: object) -> FakeEngine:
        e = FakeEngine(host, page, **kw)  # type: ignore[arg-type]
        started.append(e)
        return e

    try:
        yield make
    finally:
        for e in started:
            await e.stop()


async def wait_for(check: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_scrape_once_healthy_slow_and_dead_pods(engines: Callable[..., FakeEngine]) -> None:
    good = engines("127.0.0.2", vllm_page(EngineState(waiting=1, running=2, kv_usage=0.25)))
    slow = engines("127.0.0.3", vllm_page(EngineState(waiting=9)), delay=30.0)
    await good.start()
    await slow.start()
    dead_url = f"http://127.0.0.4:{free_port('127.0.0.4')}/metrics"  # nothing listens
    targets = [
        ScrapeTarget("good", good.url, "vLLM"),
        ScrapeTarget("slow", slow.url, "vLLM"),
        ScrapeTarget("dead", dead_url, "vLLM"),
    ]
    published: dict[str, PodMetrics] = {}
    registry = CollectorRegistry()
    scraper = MetricsScraper(
        lambda: targets,
        published.__setitem__,
        # the good pod (same event loop) must answer within it on a loaded machine too; the
        # round lasts the slow pod's timeout, well inside stale_after (the good read stays fresh)
        timeout=1.0,
        stale_after=10.0,
        registry=registry,
    )
    try:
        await scraper.scrape_once()
        # refused connection: stale at once (no metrics were ever read); the slow pod's timeout
        # keeps the staleness bound, so nothing is published for it yet
        assert set(published) == {"good", "dead"}
        assert published["dead"].stale is True and published["dead"].waiting is None
        assert published["dead"].unreachable is True
        assert published["good"].waiting == 1.0 and published["good"].kv_cache_usage == 0.25
        assert published["good"].stale is False and published["good"].unreachable is False
        errors = registry.get_sample_value
        assert errors("matrixinfer_gateway_scrape_errors_total", {"pod": "dead"}) == 1.0
        assert errors("matrixinfer_gateway_scrape_errors_total", {"pod": "slow"}) == 1.0
        assert errors("matrixinfer_gateway_scrape_errors_total", {"pod": "good"}) is None
        assert errors("matrixinfer_gateway_scrape_duration_seconds_count") == 3.0
        assert errors("matrixinfer_gateway_scrape_age_seconds", {"pod": "good"}) is not None
        assert scraper.scrapes == 1 and scraper.failures == 2
    finally:
        await scraper.stop()


async def test_background_loop_keeps_healthy_pods_fresh_while_one_hangs(
    engines: Callable[..., FakeEngine],
) -> None:
    good = engines("127.0.0.2", vllm_page(EngineState(waiting=1)))
    slow = engines("127.0.0.3", vllm_page(EngineState(waiting=2)), delay=30.0)
    await good.start()
    await slow.start()
    targets = [ScrapeTarget("good", good.url, "vLLM"), ScrapeTarget("slow", slow.url, "vLLM")]
    reads: list[tuple[str, PodMetrics]] = []
    scraper = MetricsScraper(
        lambda: targets, lambda n, m: reads.append((n, m)), interval=0.05, timeout=5.0
    )
    await scraper.start()
    try:
        # many fresh reads of the good pod while the slow pod's first scrape is still pending
        await wait_for(lambda: sum(1 for n, _ in reads if n == "good") >= 5)
        assert slow.hits == 1  # one scrape in progress per pod, never piled up
        assert all(n == "good" for n, _ in reads)
        good.page = vllm_page(EngineState(waiting=7))
        await wait_for(lambda: reads[-1][1].waiting == 7.0)
    finally:
        await scraper.stop()


async def test_staleness_published_once_and_cleared_by_a_good_scrape(
    engines: Callable[..., FakeEngine],
) -> None:
    engine = engines("127.0.0.2", vllm_page(EngineState(waiting=3)))
    await engine.start()
    clock = Clock()
    targets = [ScrapeTarget("p1", engine.url, "vLLM")]
    reads: list[PodMetrics] = []
    scraper = MetricsScraper(
        lambda: targets, lambda n, m: reads.append(m), stale_after=1.0, timeout=1.0, clock=clock
    )
    try:
        await scraper.scrape_once()
        assert reads[-1].stale is False and reads[-1].scraped_at == 1000.0
        engine.status = 500
        clock.now += 0.5
        await scraper.scrape_once()
        assert len(reads) == 1  # failed, still within stale_after: nothing new
        clock.now += 0.6
        await scraper.scrape_once()
        assert len(reads) == 2 and reads[-1].stale is True and reads[-1].waiting == 3.0
        assert reads[-1].unreachable is False  # HTTP errors: unknown metrics, not a gone pod
        clock.now += 1.0
        await scraper.scrape_once()
        assert len(reads) == 2  # stale is published once
        engine.status = 200
        await scraper.scrape_once()
        assert reads[-1].stale is False and reads[-1].scraped_at == clock.now
    finally:
        await scraper.stop()


async def test_pod_that_stops_listening_is_stale_after_one_failed_scrape(
    engines: Callable[..., FakeEngine],
) -> None:
    engine = engines("127.0.0.2", vllm_page(EngineState(waiting=4, running=1)))
    await engine.start()
    clock = Clock()
    targets = [ScrapeTarget("p1", engine.url, "vLLM")]
    reads: list[PodMetrics] = []
    scraper = MetricsScraper(
        lambda: targets, lambda n, m: reads.append(m), stale_after=60.0, timeout=1.0, clock=clock
    )
    try:
        await scraper.scrape_once()
        assert len(reads) == 1 and reads[-1].stale is False
        await engine.stop()  # the pod is killed: its port refuses connections
        clock.now += 0.2  # one interval, far inside stale_after
        await scraper.scrape_once()
        assert len(reads) == 2
        assert reads[-1].stale is True
        assert reads[-1].waiting == 4.0 and reads[-1].scraped_at == 1000.0  # the last good read
        clock.now += 0.2
        await scraper.scrape_once()
        assert len(reads) == 2  # published stale once per failure streak
        assert scraper.failures == 2
        # the pod comes back on the same port: the next good scrape clears staleness
        engine.page = vllm_page(EngineState(waiting=0))
        await engine.start(engine.port)
        clock.now += 0.2
        await scraper.scrape_once()
        assert len(reads) == 3 and reads[-1].stale is False and reads[-1].waiting == 0.0
    finally:
        await scraper.stop()


async def test_slow_pod_keeps_the_staleness_bound(engines: Callable[..., FakeEngine]) -> None:
    engine = engines("127.0.0.3", vllm_page(EngineState(waiting=5)))
    await engine.start()
    clock = Clock()
    targets = [ScrapeTarget("p1", engine.url, "vLLM")]
    reads: list[PodMetrics] = []
    scraper = MetricsScraper(
        lambda: targets, lambda n, m: reads.append(m), stale_after=1.0, timeout=1.0, clock=clock
    )
    try:
        await scraper.scrape_once()
        assert len(reads) == 1 and reads[-1].stale is False
        engine.delay = 30.0  # now answers after the scrape timeout
        clock.now += 0.2
        await scraper.scrape_once()
        assert scraper.failures == 1
        assert len(reads) == 1  # a timeout is not "nothing listens": still trusted
        clock.now += 1.0  # past stale_after since the last good read
        await scraper.scrape_once()
        assert len(reads) == 2 and reads[-1].stale is True and reads[-1].waiting == 5.0
    finally:
        await scraper.stop()


def test_connection_refused_classification() -> None:
    from aiohttp import ClientConnectorError
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("127.0.0.9", 1, False, True, None, None, None)
    refused = ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    unreachable = ClientConnectorError(key, OSError(113, "no route to host"))
    assert is_connection_refused(refused)
    assert is_connection_refused(ConnectionRefusedError())
    assert not is_connection_refused(unreachable)
    assert not is_connection_refused(TimeoutError())
    assert not is_connection_refused(ConnectionResetError())


async def test_targets_come_and_go(engines: Callable[..., FakeEngine]) -> None:
    a = engines("127.0.0.2", vllm_page(EngineState(waiting=1)))
    b = engines("127.0.0.3", sglang_page(EngineState(waiting=2)))
    await a.start()
    await b.start()
    targets = [ScrapeTarget("a", a.url, "vLLM")]
    published: dict[str, PodMetrics] = {}
    registry = CollectorRegistry()
    scraper = MetricsScraper(lambda: list(targets), published.__setitem__, registry=registry)
    try:
        await scraper.scrape_once()
        targets[:] = [ScrapeTarget("b", b.url, "SGLang")]
        await scraper.scrape_once()
        assert published["b"].waiting == 2.0
        ages = registry.get_sample_value
        assert (
            ages("matrixinfer_gateway_scrape_age_seconds", {"pod": "a"}) is None
        )  # series removed
        assert ages("matrixinfer_gateway_scrape_age_seconds", {"pod": "b"}) is not None
    finally:
        await scraper.stop()


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="interval must be > 0"):
        MetricsScraper(list, lambda n, m: None, interval=0)
    with pytest.raises(ValueError, match="stale_after must be > 0"):
        MetricsScraper(list, lambda n, m: None, stale_after=-1)
    with pytest.raises(ValueError, match="loras_interval must be > 0"):
        MetricsScraper(list, lambda n, m: None, loras_interval=0)


async def test_rate_cap_stretches_interval_and_staleness() -> None:
    dead = free_port("127.0.0.4")
    targets = [ScrapeTarget(f"p{i}", f"http://127.0.0.4:{dead}/metrics", "vLLM") for i in range(50)]
    scraper = MetricsScraper(
        lambda: targets,
        lambda n, m: None,
        interval=0.2,
        stale_after=1.0,
        max_scrapes_per_second=100,
    )
    try:
        assert scraper.effective_interval == 0.2  # no targets known yet
        await scraper.scrape_once()
        assert scraper.failures == 50  # connection refused, counted per pod
        assert scraper.effective_interval == pytest.approx(0.5)  # 50 pods / 100 per second
        assert scraper.effective_stale_after == pytest.approx(1.25)
    finally:
        await scraper.stop()


# ------------------------------------------------------------------------- loaded LoRA adapters


def test_parse_loaded_loras_takes_entries_with_a_parent() -> None:
    body = (
        b'{"object": "list", "data": ['
        b'{"id": "llama", "object": "model", "root": "llama", "parent": null},'
        b'{"id": "sql", "object": "model", "root": "/adapters/sql", "parent": "llama"},'
        b'{"id": "chat", "object": "model", "root": "/adapters/chat", "parent": "llama"}]}'
    )
    assert parse_loaded_loras(body) == frozenset({"sql", "chat"})
    assert parse_loaded_loras('{"object": "list", "data": [{"id": "llama"}]}') == frozenset()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<html>", "/v1/models answer is not JSON"),
        (b'{"object": "list"}', "has no 'data' list"),
        (b"[1, 2]", "has no 'data' list"),
        (b'{"data": ["sql"]}', "'data' holds a str, not an object"),
    ],
)
def test_parse_loaded_loras_names_what_is_wrong(body: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_loaded_loras(body)


def test_models_url_sits_beside_the_metrics_page() -> None:
    assert ScrapeTarget("p", "http://10.0.0.1:8000/metrics", "vLLM").models_url == (
        "http://10.0.0.1:8000/v1/models"
    )


async def test_loaded_loras_ride_on_published_metrics(engines: Callable[..., FakeEngine]) -> None:
    vllm = engines("127.0.0.2", vllm_page(EngineState(max_lora=2)), loras=["sql"])
    sglang = engines("127.0.0.3", sglang_page(EngineState(waiting=1)), loras=["sql"])
    old = engines("127.0.0.4", vllm_page(EngineState(max_lora=2)))  # /v1/models answers 404
    for e in (vllm, sglang, old):
        await e.start()
    targets = [
        ScrapeTarget("vllm", vllm.url, "vLLM"),
        ScrapeTarget("sglang", sglang.url, "SGLang"),
        ScrapeTarget("old", old.url, "vLLM"),
    ]
    published: dict[str, PodMetrics] = {}
    scraper = MetricsScraper(lambda: targets, published.__setitem__, loras_interval=3600)
    try:
        await scraper.scrape_once()
        assert published["vllm"].loaded_loras == frozenset({"sql"})
        assert published["vllm"].stale is False
        assert published["vllm"].loras_read_at is not None  # when that read started
        assert published["sglang"].loaded_loras is None and sglang.model_hits == 0
        assert published["old"].loaded_loras is None and old.model_hits == 1
    finally:
        await scraper.stop()


async def test_adapter_list_is_read_again_on_load_signal_and_on_request(
    engines: Callable[..., FakeEngine],
) -> None:
    engine = engines("127.0.0.2", vllm_page(EngineState(max_lora=2)), loras=[])
    await engine.start()
    targets = [ScrapeTarget("p", engine.url, "vLLM")]
    reads: list[PodMetrics] = []
    # the periodic read is an hour away: every read after the first is triggered
    scraper = MetricsScraper(
        lambda: targets, lambda n, m: reads.append(m), interval=0.05, loras_interval=3600
    )
    await scraper.start()
    try:
        await wait_for(lambda: bool(reads) and reads[-1].loaded_loras == frozenset())
        assert engine.model_hits == 1
        # an adapter is loaded and shows up running in the metrics: the list is read again
        engine.loras = ["sql"]
        engine.page = vllm_page(EngineState(max_lora=2, running_loras=("sql",)))
        await wait_for(lambda: reads[-1].loaded_loras == frozenset({"sql"}))
        assert engine.model_hits == 2
        # unloaded: nothing in the metrics says so; refresh_loras (e.g. after a 404) reads again
        engine.loras = []
        engine.page = vllm_page(EngineState(max_lora=2))
        await wait_for(lambda: engine.hits >= 10)
        assert reads[-1].loaded_loras == frozenset({"sql"}) and engine.model_hits == 2
        scraper.refresh_loras("p")
        scraper.refresh_loras("unknown-pod")  # ignored
        await wait_for(lambda: reads[-1].loaded_loras == frozenset())
        assert engine.model_hits == 3
    finally:
        await scraper.stop()


async def test_adapter_list_is_read_on_its_interval(engines: Callable[..., FakeEngine]) -> None:
    engine = engines("127.0.0.2", vllm_page(EngineState(max_lora=2)), loras=["a"])
    await engine.start()
    reads: list[PodMetrics] = []
    scraper = MetricsScraper(
        lambda: [ScrapeTarget("p", engine.url, "vLLM")],
        lambda n, m: reads.append(m),
        interval=0.05,
        loras_interval=0.2,
    )
    await scraper.start()
    try:
        await wait_for(lambda: bool(reads) and reads[-1].loaded_loras == frozenset({"a"}))
        engine.loras = ["a", "b"]  # loaded without any sign in the metrics
        await wait_for(lambda: reads[-1].loaded_loras == frozenset({"a", "b"}))
        assert engine.model_hits < engine.hits  # a slower interval than the metrics
    finally:
        await scraper.stop()


async def test_adapter_list_is_read_again_when_a_pod_comes_back(
    engines: Callable[..., FakeEngine],
) -> None:
    engine = engines("127.0.0.2", vllm_page(EngineState(max_lora=2)), loras=["sql"])
    await engine.start()
    port = engine.port
    published: dict[str, PodMetrics] = {}
    scraper = MetricsScraper(
        lambda: [ScrapeTarget("p", engine.url, "vLLM")],
        published.__setitem__,
        interval=0.05,
        loras_interval=3600,
    )
    await scraper.start()
    try:
        await wait_for(lambda: "p" in published and published["p"].loaded_loras == {"sql"})
        await engine.stop()  # the engine restarts and forgets its adapters
        await wait_for(lambda: published["p"].unreachable)
        engine.loras = []
        engine.release = asyncio.Event()
        await engine.start(port)
        await wait_for(lambda: published["p"].loaded_loras == frozenset())
        assert not published["p"].stale
    finally:
        await scraper.stop()
