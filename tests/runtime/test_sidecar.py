"""matrixinfer-runtime beside real simulator processes in vLLM and SGLang mode."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from fleet.engine_metrics import parse_metrics
from matrixinfer.process import free_port
from runtime.fetch import Settings
from runtime.metrics import unify
from runtime.sidecar import SidecarConfig, build_app, plan_sync, read_adapters
from sim.fleet import Fleet
from tests.runtime.hub import Hub, Repo

ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}


@pytest.fixture(params=["vllm", "sglang"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Fleet]]:
    kind = request.param
    fleet = Fleet(1, port=free_port(), first_host="127.0.0.1", log_dir=tmp_path / "logs",
                  args=["--engine", kind, "--time-scale", "0.05"])  # fmt: skip
    with fleet:
        yield kind, fleet


StartSidecar = Callable[..., Awaitable[Any]]  # (**SidecarConfig fields) -> a started TestClient


@pytest.fixture
async def sidecar(engine: tuple[str, Fleet], tmp_path: Path) -> AsyncIterator[StartSidecar]:
    clients: list[Any] = []
    kind, fleet = engine

    async def start(settings: dict[str, Any] | None = None, **kw: Any) -> Any:
        cfg = SidecarConfig(
            engine=kind,
            engine_url=fleet.pods[0].url,
            settings=Settings(cache=tmp_path / "cache", **(settings or {})),
            **{"sync_interval": 0.1, **kw},
        )
        client = TestClient(TestServer(build_app(cfg)))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for c in clients:
        await c.close()


async def poll(cond: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def engine_models(url: str) -> dict[str, str]:
    """id -> root of the engine's /v1/models (the root of an adapter is its path)."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/models") as r:
        assert r.status == 200
        return {m["id"]: m["root"] for m in (await r.json())["data"]}


def adapter_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "adapters" / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 8}')
    return d


# ----------------------------------------------------------------------------- pure parts


def test_plan_sync() -> None:
    assert plan_sync({"a": "file:///a", "b": "file:///b"}, {"b": "file:///b", "c": "x"}) == (
        ["a"],
        ["c"],
    )
    assert plan_sync({"a": "file:///new"}, {"a": "file:///old"}) == (["a"], ["a"])


def test_read_adapters_accepts_the_model_form_and_names_errors(tmp_path: Path) -> None:
    f = tmp_path / "adapters.yaml"
    f.write_text("loraAdapters:\n- {name: sql, uri: 'hf://org/sql'}\n")
    assert read_adapters(f) == {"sql": "hf://org/sql"}
    f.write_text("- {name: sql, uri: 'ftp://x/y'}\n")
    with pytest.raises(ValueError, match=r"adapters file .*: \[0.uri\]: String should match"):
        read_adapters(f)
    f.write_text("- {name: a, uri: 'file:///a'}\n- {name: a, uri: 'file:///b'}\n")
    with pytest.raises(ValueError, match="unique"):
        read_adapters(f)


def test_unify_rejects_unknown_engine() -> None:
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        unify("", "tgi")


# ----------------------------------------------------------------------------- against sims


async def test_metrics_unified_match_the_engines_values(
    engine: tuple[str, Fleet], sidecar: StartSidecar
) -> None:
    kind, fleet = engine
    url = fleet.pods[0].url
    client = await sidecar()
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            body = {"model": "demo-model", "prompt": f"hello {i} " * 20, "max_tokens": 8}
            async with s.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 200
        async with s.get(f"{url}/metrics") as r:
            engine_text = await r.text()
    resp = await client.get("/metrics")
    assert resp.status == 200
    unified_text = await resp.text()

    names = {f.name for f in text_string_to_metric_families(unified_text)}
    assert names >= {
        "matrixinfer_engine_requests_waiting",
        "matrixinfer_engine_requests_running",
        "matrixinfer_engine_kv_cache_usage_ratio",
        "matrixinfer_engine_time_to_first_token_seconds",
        "matrixinfer_engine_inter_token_latency_seconds",
        "matrixinfer_engine_prompt_tokens",
        "matrixinfer_engine_generation_tokens",
    }
    assert all(n.startswith("matrixinfer_engine_") for n in names)
    assert ("matrixinfer_engine_lora_requests_info" in names) == (kind == "vllm")

    m_engine, s_engine = parse_metrics(engine_text, ENGINE_NAMES[kind], None, 1.0)
    m_ours, s_ours = parse_metrics(unified_text, "MatrixInfer", None, 1.0)
    assert (m_ours.waiting, m_ours.running, m_ours.kv_cache_usage) == (
        m_engine.waiting,
        m_engine.running,
        m_engine.kv_cache_usage,
    )
    assert m_ours.waiting is not None and m_ours.kv_cache_usage is not None
    assert s_ours.ttft_count == s_engine.ttft_count == 3
    assert (s_ours.ttft_sum, s_ours.tpot_sum, s_ours.tpot_count) == (
        s_engine.ttft_sum,
        s_engine.tpot_sum,
        s_engine.tpot_count,
    )

    def prompt_tokens(text: str, family: str) -> float:
        fam = next(f for f in text_string_to_metric_families(text) if f.name == family)
        return sum(s.value for s in fam.samples if s.name.endswith("_total"))

    expected = prompt_tokens(engine_text, f"{kind}:prompt_tokens")
    assert expected > 0
    assert prompt_tokens(unified_text, "matrixinfer_engine_prompt_tokens") == expected


async def test_lora_load_and_unload_through_the_engines_api(
    engine: tuple[str, Fleet],
    sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    _, fleet = engine
    url = fleet.pods[0].url
    hub = Hub().start()
    try:
        hub.repos["org/sql-lora"] = Repo({"adapter_config.json": b'{"r": 8}'})
        client = await sidecar(settings={"hf_endpoint": hub.url})
        local = adapter_dir(tmp_path, "chat")

        r = await client.post("/v1/lora_adapters", json={"name": "sql", "uri": "hf://org/sql-lora"})
        assert r.status == 200, await r.text()
        cached = tmp_path / "cache/hf/org/sql-lora/main"
        assert (await r.json())["path"] == str(cached)
        assert (cached / "adapter_config.json").read_bytes() == b'{"r": 8}'  # fetched first
        r = await client.post("/v1/lora_adapters", json={"name": "chat", "uri": f"file://{local}"})
        assert r.status == 200, await r.text()
        models = await engine_models(url)
        assert models["sql"] == str(cached)  # the engine got the downloaded path
        assert models["chat"] == str(local)

        r = await client.post("/v1/lora_adapters", json={"name": "sql", "uri": "hf://org/sql-lora"})
        assert r.status == 409
        r = await client.delete("/v1/lora_adapters/sql")
        assert r.status == 200
        assert "sql" not in await engine_models(url)
        r = await client.delete("/v1/lora_adapters/sql")
        assert r.status == 404

        r = await client.post("/v1/lora_adapters", json={"name": "x", "uri": "hf://org/absent"})
        assert r.status == 404
        err = (await r.json())["error"]
        assert err["message"].startswith("hf://org/absent: not found:")
        assert err["param"] == "uri"
        r = await client.post("/v1/lora_adapters", json={"name": "x", "uri": "gs://b/x"})
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "uri"
        assert "x" not in await engine_models(url)
    finally:
        hub.stop()


async def test_adapters_file_loaded_on_start_and_kept_in_sync(
    engine: tuple[str, Fleet],
    sidecar: StartSidecar,
    tmp_path: Path,
) -> None:
    _, fleet = engine
    url = fleet.pods[0].url
    a, b, c = (adapter_dir(tmp_path, n) for n in "abc")
    f = tmp_path / "adapters.yaml"
    f.write_text(f"- {{name: a, uri: 'file://{a}'}}\n- {{name: b, uri: 'file://{b}'}}\n")
    client = await sidecar(adapters_file=f)

    async def ready() -> bool:
        return bool((await client.get("/ready")).status == 200)

    await poll(ready)
    assert {"a", "b"} <= set(await engine_models(url))
    r = await client.delete("/v1/lora_adapters/a")
    assert r.status == 409  # the file owns it

    f.write_text(f"- {{name: b, uri: 'file://{b}'}}\n- {{name: c, uri: 'file://{c}'}}\n")

    async def synced() -> bool:
        models = set(await engine_models(url))
        return "c" in models and "a" not in models

    await poll(synced)
    assert "b" in await engine_models(url)

    f.write_text(f"- {{name: b, uri: 'file://{tmp_path}/absent'}}\n")

    async def not_ready() -> bool:
        r = await client.get("/ready")
        return r.status == 503 and "LoRA adapter b:" in await r.text()

    await poll(not_ready)
    text = await (await client.get("/ready")).text()
    assert f"file://{tmp_path}/absent: not found" in text


async def test_engine_down_means_not_ready(
    engine: tuple[str, Fleet],
    sidecar: StartSidecar,
) -> None:
    _, fleet = engine
    client = await sidecar()

    async def ready() -> bool:
        return bool((await client.get("/ready")).status == 200)

    await poll(ready)
    assert (await client.get("/health")).status == 200
    fault = f"{fleet.pods[0].url}/sim/fault"  # the engine reports itself not ready
    async with aiohttp.ClientSession() as s, s.post(fault, json={"not_ready": True}) as r:
        assert r.status == 200, await r.text()
    r = await client.get("/ready")
    assert r.status == 503
    assert "/health answered 503" in await r.text()

    fleet.kill(0)
    for path in ("/health", "/ready", "/metrics"):
        r = await client.get(path)
        assert r.status == 503, path
        assert fleet.pods[0].url in await r.text() or path == "/metrics"
    assert "unreachable" in await (await client.get("/ready")).text()


async def test_ready_as_soon_as_a_starting_engine_is_healthy(
    engine: tuple[str, Fleet],
    sidecar: StartSidecar,
) -> None:
    """The first sync (which readiness waits for) follows the engine's start closely, not one
    ``sync_interval`` later: an engine healthy after the sidecar started makes it ready."""
    _, fleet = engine
    fault = f"{fleet.pods[0].url}/sim/fault"
    async with aiohttp.ClientSession() as s, s.post(fault, json={"not_ready": True}) as r:
        assert r.status == 200, await r.text()
    client = await sidecar(sync_interval=600.0)

    async def ready() -> bool:
        return bool((await client.get("/ready")).status == 200)

    await asyncio.sleep(0.5)  # the sidecar has looked at the engine: not healthy yet
    assert not await ready()
    async with aiohttp.ClientSession() as s, s.post(fault, json={"not_ready": False}) as r:
        assert r.status == 200, await r.text()
    await poll(ready)  # without the fix: 600 s


def test_the_program_serves_the_sim_until_sigterm(tmp_path: Path) -> None:
    """matrixinfer-runtime as a process: flags, the adapters file, readiness, a clean stop."""
    adapter = adapter_dir(tmp_path, "sql")
    f = tmp_path / "adapters.yaml"
    f.write_text(f"loraAdapters:\n- {{name: sql, uri: 'file://{adapter}'}}\n")
    port = free_port()
    fleet = Fleet(1, port=free_port(), first_host="127.0.0.1", log_dir=tmp_path / "logs",
                  args=["--time-scale", "0.05"])  # fmt: skip
    with fleet, (tmp_path / "runtime.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.sidecar", "--engine", "vllm",
             "--engine-url", fleet.pods[0].url, "--host", "127.0.0.1", "--port", str(port),
             "--lora-adapters", str(f), "--sync-interval", "100ms", "--cache", str(tmp_path)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:

            def status(path: str) -> int:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                        return int(r.status)
                except urllib.error.HTTPError as e:
                    return e.code
                except OSError:
                    return 0

            deadline = time.monotonic() + 30
            while status("/ready") != 200:
                assert proc.poll() is None, (tmp_path / "runtime.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "runtime.log").read_text()
                time.sleep(0.05)
            with urllib.request.urlopen(f"{fleet.pods[0].url}/v1/models", timeout=2) as r:
                assert "sql" in r.read().decode()
        finally:
            proc.terminate()
            code = proc.wait(10)
    assert code == 0, (tmp_path / "runtime.log").read_text()
    assert "loaded LoRA adapter sql" in (tmp_path / "runtime.log").read_text()
