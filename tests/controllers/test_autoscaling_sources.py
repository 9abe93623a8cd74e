"""The autoscaler's metric sources against real HTTP servers: engine pages rendered by
prometheus_client (matrixinfer.testing.engine_pages), the extproc's own demand collector, and a
tiny Prometheus HTTP API stand-in."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from controllers.autoscaling.sources import (
    GATEWAY_IN_FLIGHT,
    GATEWAY_WAITING,
    GatewaySource,
    PodSource,
    PodTarget,
    PrometheusSource,
    Reading,
    merge,
    prometheus_value,
)
from extproc.datastore import Datastore
from extproc.demand import DemandCollector
from fleet.config import GatewayConfig, StaticEndpoint
from matrixinfer.testing.engine_pages import EngineState, sglang_page, vllm_page
from tests.extproc.helpers import objects, server_yaml


@contextlib.asynccontextmanager
async def serve(routes: dict[str, Callable[[web.Request], Any]]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def text(body: Callable[[], str]) -> Callable[[web.Request], Any]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=body(), content_type="text/plain")

    return handler


async def test_pod_source_reads_vllm_and_sglang_names_and_counter_rates() -> None:
    vllm = EngineState(waiting=3, running=5, kv_usage=0.5)
    sgl = EngineState(waiting=4, running=1, kv_usage=0.25)
    extra = {"n": 100.0}

    def vllm_body() -> str:
        return (
            vllm_page(vllm)
            + "# HELP my_tokens_total Tokens.\n# TYPE my_tokens_total counter\n"
            + f'my_tokens_total {extra["n"]}\n# TYPE my_gauge gauge\nmy_gauge{{a="1"}} 2\n'
            + 'my_gauge{a="2"} 3\n'
        )

    names = [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "my_tokens_total",
        "my_gauge",
    ]
    async with (
        serve({"/metrics": text(vllm_body)}) as a,
        serve({"/metrics": text(lambda: sglang_page(sgl))}) as b,
        aiohttp.ClientSession() as session,
    ):
        src = PodSource(session, names)
        pods = [PodTarget("a", a + "/metrics"), PodTarget("b", b + "/metrics")]
        r = await src.read(pods, 2, now=100.0)
        # the engine names mean the same on SGLang (num_queue_reqs, num_running_reqs, token_usage)
        assert r.values["vllm:num_requests_waiting"] == 7
        assert r.values["vllm:num_requests_running"] == 6
        assert r.values["vllm:kv_cache_usage_perc"] == pytest.approx(0.75)
        # the counter has no rate on the first scrape, and pod b has neither custom metric
        assert {"my_tokens_total", "my_gauge"} <= r.missing
        assert any("pod b" in p and "my_gauge" in p for p in r.problems)

        src = PodSource(session, ["my_tokens_total", "my_gauge"])
        pods = pods[:1]
        await src.read(pods, 1, now=100.0)
        extra["n"] = 150.0
        r = await src.read(pods, 1, now=110.0)
        assert r.values == {"my_tokens_total": 5.0, "my_gauge": 5.0} and not r.missing


async def test_pod_source_unreachable_or_no_ready_pod_is_missing_zero_replicas_is_zero() -> None:
    async with aiohttp.ClientSession() as session:
        src = PodSource(session, ["vllm:num_requests_waiting"])
        r = await src.read([PodTarget("gone", "http://127.0.0.1:9/metrics")], 1, now=1.0)
        assert r.missing == {"vllm:num_requests_waiting"} and "pod gone" in r.problems[0]
        r = await src.read([], 2, now=1.0)
        assert r.missing == {"vllm:num_requests_waiting"} and "no ready pod" in r.problems[0]
        r = await src.read([], 0, now=1.0)
        assert r.values == {"vllm:num_requests_waiting": 0.0} and not r.missing


def _gateway_page(in_flight: dict[str, int], queued: dict[str, int]) -> str:
    """The demand collector of a real extproc Datastore, rendered as /metrics renders it."""
    ds = Datastore()
    objs = objects(
        server_yaml("llama", {"app": "llama"}) + "---\n" + server_yaml("qwen", {"app": "qwen"})
    )
    ds.apply(
        GatewayConfig(
            servers=[o for o in objs if o.kind == "ModelServer"],
            endpoints=[
                StaticEndpoint("l0", "127.0.0.1:1", {"app": "llama"}),
                StaticEndpoint("l1", "127.0.0.1:2", {"app": "llama"}),
                StaticEndpoint("q0", "127.0.0.1:3", {"app": "qwen"}),
            ],
        )
    )
    for pod, n in in_flight.items():
        for _ in range(n):
            ds.begin(ds.snapshot.pods[pod])
    queues = {f"default/{k}": [object()] * n for k, n in queued.items()}
    reg = CollectorRegistry()
    reg.register(DemandCollector(ds, lambda: queues))
    return generate_latest(reg).decode()


async def test_gateway_source_sums_every_extproc_replica_for_one_model_server() -> None:
    p1 = _gateway_page({"l0": 2, "l1": 1, "q0": 7}, {"llama": 4})
    p2 = _gateway_page({"l0": 1}, {"llama": 1, "qwen": 9})
    names = ["gateway_queue_length", GATEWAY_IN_FLIGHT, "vllm:num_requests_waiting"]
    async with (
        serve({"/metrics": text(lambda: p1)}) as a,
        serve({"/metrics": text(lambda: p2)}) as b,
        aiohttp.ClientSession() as session,
    ):
        src = GatewaySource(session, [a + "/metrics", b + "/metrics"], names)
        r = await src.read("default", "llama")
        assert r.values == {"gateway_queue_length": 5.0, GATEWAY_IN_FLIGHT: 4.0}
        r = await src.read("default", "nobody")  # no replica knows it: no demand
        assert r.values == {"gateway_queue_length": 0.0, GATEWAY_IN_FLIGHT: 0.0}
        # one replica down: partial sums would under-count, so the metrics are missing
        src = GatewaySource(session, [a + "/metrics", "http://127.0.0.1:9/metrics"], names)
        r = await src.read("default", "llama")
        assert r.missing == {"gateway_queue_length", GATEWAY_IN_FLIGHT} and not r.values


def test_demand_collector_lists_every_model_server_with_zeros() -> None:
    page = _gateway_page({}, {})
    assert f'{GATEWAY_WAITING}{{namespace="default",server="qwen"}} 0.0' in page
    assert f'{GATEWAY_IN_FLIGHT}{{namespace="default",server="llama"}} 0.0' in page


async def test_prometheus_source_instant_query() -> None:
    seen: list[str] = []
    answer: dict[str, Any] = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"model_infer": "a"}, "value": [1.0, "3"]},
                {"metric": {"model_infer": "b"}, "value": [1.0, "4.5"]},
            ],
        },
    }

    async def query(request: web.Request) -> web.Response:
        seen.append(request.query["query"])
        return web.json_response(answer)

    q = 'sum by (model_infer) (matrixinfer_gateway_in_flight_requests{model="m"})'
    async with serve({"/api/v1/query": query}) as url, aiohttp.ClientSession() as session:
        src = PrometheusSource(
            session, url + "/", q, ["matrixinfer_gateway_in_flight_requests", "x"]
        )
        r = await src.read()
        assert seen == [q] and r.values == {"matrixinfer_gateway_in_flight_requests": 7.5}
        answer.clear()
        answer.update({"status": "error", "error": "parse error at char 3"})
        r = await src.read()
        assert r.missing == {"matrixinfer_gateway_in_flight_requests"}
        assert "parse error at char 3" in r.problems[0]
        src = PrometheusSource(session, url, "up", ["a", "b"])
        r = await src.read()
        assert "names none of the policy's metrics" in r.problems[0]


def test_prometheus_value_shapes() -> None:
    ok = {"status": "success", "data": {"resultType": "scalar", "result": [1, "2"]}}
    assert prometheus_value(ok) == 2.0
    empty = {"status": "success", "data": {"resultType": "vector", "result": []}}
    with pytest.raises(ValueError, match="no series"):
        prometheus_value(empty)
    with pytest.raises(ValueError, match="matrix"):
        prometheus_value({"status": "success", "data": {"resultType": "matrix", "result": []}})


def test_merge_takes_the_largest_and_reports_missing() -> None:
    values, problems = merge(
        ["a", "b", "c"],
        [Reading({"a": 1.0}), Reading({"a": 3.0}, {"b"}, ["pod x: refused"])],
    )
    assert values == {"a": 3.0, "b": None, "c": None}
    assert problems == ["pod x: refused", "metric 'c': no source reports it"]


def test_extproc_publishes_the_demand_gauges(tmp_path: Any) -> None:
    from extproc.main import ExtProcApp, parse_args

    (tmp_path / "servers.yaml").write_text(server_yaml("llama", {"app": "llama"}))
    app = ExtProcApp(parse_args(["--config", str(tmp_path)]))
    app.datastore.apply(GatewayConfig(servers=objects(server_yaml("llama", {"app": "llama"}))))
    page = generate_latest(app.metrics.registry).decode()
    assert f'{GATEWAY_WAITING}{{namespace="default",server="llama"}} 0.0' in page


def test_pod_targets_ready_entry_pods_by_port_or_port_name() -> None:
    from controllers.autoscaling.handlers import pod_info, pod_targets
    from crds.registry import MetricSource

    def pod(name: str, ip: str | None, ready: bool = True, entry: str = "true") -> Any:
        return pod_info(
            {
                "metadata": {"name": name, "labels": {"workload.matrixinfer.ai/entry": entry}},
                "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8000}]}]},
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                },
            }
        )

    pods = [
        pod("a", "10.0.0.1"),
        pod("b", "10.0.0.2", ready=False),
        pod("c", "10.0.0.3", entry="false"),  # a worker pod serves no HTTP
        pod("d", None),
        pod("e", "fd00::5"),
    ]
    got, problems = pod_targets(pods, None)
    assert [t.url for t in got] == ["http://10.0.0.1:8000/metrics", "http://[fd00::5]:8000/metrics"]
    by_name = MetricSource.model_validate({"pod": {"name": "http", "path": "/m"}})
    assert pod_targets(pods[:1], by_name)[0][0].url == "http://10.0.0.1:8000/m"
    by_port = MetricSource.model_validate({"pod": {"port": 9100}})
    assert pod_targets(pods[:1], by_port)[0][0].url == "http://10.0.0.1:9100/metrics"
    missing = MetricSource.model_validate({"pod": {"name": "metrics"}})
    assert pod_targets(pods[:1], missing) == ([], ["pod a: no container port named 'metrics'"])
    assert not problems
