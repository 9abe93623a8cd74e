"""Fixtures for the policy tests: a small simulator fleet, key files, a Redis server, and gateway
stacks (xDS + extproc + Envoy) started with policies on."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import pytest
from aiohttp import ClientSession, web

from matrixinfer.process import free_port, http_ok, wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from matrixinfer.testing.redis import PasswordRedis, RedisServer
from sim.fleet import Fleet
from tests.conftest import E2E_MESSAGE_TIMEOUT_MS, sim_fleet
from tests.extproc.conftest import endpoints_yaml
from tests.extproc.helpers import server_yaml

KEYS = {
    "key-alice": ("acme", "alice", ["ml"]),
    "key-bob": ("other", "bob", []),
    "key-carol": ("acme", "carol", []),
    "key-heavy": ("acme", "heavy", []),
    "key-light": ("acme", "light", []),
}


POOL = server_yaml("pool", {"app": "sim"}, model="demo-model")  # the policy fleet's pods


def route_yaml(name: str, model: str, server: str = "pool", **spec: str) -> str:
    """A ModelRoute sending ``model`` to ``server``; ``spec`` adds flow-style fields, e.g.
    ``access="{tenants: [acme]}"`` or ``rateLimit="{requestsPerUnit: 2, unit: hour}"``."""
    extra = "".join(f"  {k}: {v}\n" for k, v in spec.items())
    return (
        "apiVersion: networking.matrixinfer.ai/v1alpha1\nkind: ModelRoute\n"
        f"metadata: {{name: {name}}}\nspec:\n  modelName: {model}\n{extra}"
        f"  rules: [{{targets: [{{modelServerName: {server}}}]}}]\n"
    )


def documents(*docs: str) -> str:
    return "---\n".join(docs)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_yaml(keys: dict[str, tuple[str, str, list[str]]]) -> str:
    lines = ["keys:"]
    for key, (tenant, user, groups) in keys.items():
        lines.append(f"- {{sha256: {sha(key)}, tenant: {tenant}, user: {user}, groups: {groups}}}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def policy_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with sim_fleet(
        tmp_path_factory, "127.0.0.70", 2, "--time-scale", "0.01", logs="policy-sims"
    ) as f:
        yield f


def write_config(directory: Path, fleet: Fleet, routes_yaml: str) -> None:
    (directory / "model.yaml").write_text(routes_yaml)
    (directory / "sims.yaml").write_text(endpoints_yaml(fleet))


def policy_stack(
    config_dir: Path,
    run_dir: Path,
    fleet: Fleet,
    extproc_args: tuple[str, ...],
    **options: Any,
) -> GatewayStack:
    """A stack with policies on; returns once the config is applied and Envoy knows the pods.
    Envoy waits E2E_MESSAGE_TIMEOUT_MS for each ext_proc reply unless ``message_timeout_ms`` is
    given (None: the product's base)."""
    options.setdefault("message_timeout_ms", E2E_MESSAGE_TIMEOUT_MS)
    opts = StackOptions(
        scrape_interval=0.1,
        config_poll=0.1,
        envoy_concurrency=1,
        extra_extproc_args=("--policies", *extproc_args),
        **options,
    )
    stack = GatewayStack(config_dir, run_dir, opts).start()
    try:
        addresses = {p.address for p in fleet.pods}
        wait_until(
            lambda: stack.extproc_ready() and addresses <= stack.envoy_hosts(),
            60,
            "gateway config applied and pods known to Envoy",
        )
    except BaseException:
        print(stack.extproc.log_tail(30))
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        import os

        if os.geteuid() == 0:
            pytest.fail("redis-server is missing (install Debian redis-server: make system-deps)")
        pytest.skip("redis-server is not installed and this user cannot install it")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[PasswordRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    server = PasswordRedis(binary, tmp_path, "pw-one")
    server.child.start()
    try:
        yield server
    finally:
        server.child.stop()


class EngineStandIn:
    """An engine stand-in between Envoy and a simulator, on its own event loop thread: each
    request is passed to ``upstream`` (:meth:`forward`) and its answer reshaped by
    :meth:`handle` (subclasses), to give Envoy answers of a shape the simulator never sends."""

    def __init__(self, upstream: str, host: str) -> None:
        self.upstream = upstream
        self.host = host
        self.port = free_port(host)
        self.address = f"{host}:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.session: ClientSession | None = None

    def start(self) -> Self:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        wait_until(lambda: http_ok(f"http://{self.address}/health"), 10, "the stand-in answers")
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    async def _start(self) -> None:
        self.session = ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: web.Request) -> tuple[int, str, bytes]:
        """(status, content-type, body) of the simulator's answer to ``request``."""
        assert self.session is not None
        raw = await request.read()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, data=raw or None, headers=headers
        ) as up:
            body = await up.read()
            return up.status, up.headers.get("content-type", "application/octet-stream"), body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        status, ctype, body = await self.forward(request)
        return web.Response(body=body, status=status, headers={"Content-Type": ctype})

    def endpoints_yaml(self, name: str, labels: str) -> str:
        """A config-dir Endpoints document with this stand-in as pod ``<name>-0``."""
        return (
            "apiVersion: gateway.matrixinfer.ai/v1alpha1\nkind: Endpoints\n"
            f"metadata: {{name: {name}}}\nspec:\n  endpoints:\n"
            f"  - {{name: {name}-0, address: '{self.address}', labels: {labels}}}\n"
        )


@contextmanager
def stand_in_stack(
    tmp_path_factory: pytest.TempPathFactory,
    fleet: Fleet,
    stand_in: EngineStandIn,
    routes_yaml: str,
    name: str,
    extproc_args: tuple[str, ...] = (),
) -> Iterator[GatewayStack]:
    """A policy stack over ``fleet`` and ``stand_in`` (pod ``<name>-0``, labels ``app: <name>``),
    once Envoy knows the stand-in; stopped on exit."""
    config = tmp_path_factory.mktemp(f"{name}-config")
    write_config(config, fleet, routes_yaml)
    (config / f"{name}.yaml").write_text(stand_in.endpoints_yaml(name, f"{{app: {name}}}"))
    stack = policy_stack(config, tmp_path_factory.mktemp(f"{name}-run"), fleet, extproc_args)
    try:
        wait_until(lambda: stand_in.address in stack.envoy_hosts(), 30, f"Envoy knows the {name}")
        yield stack
    finally:
        stack.stop()


def envoy_counter(stack: GatewayStack, stats_filter: str, suffix: str = "") -> int:
    """The sum of the Envoy counters that match ``stats_filter`` (admin ``/stats?filter=``, a
    regex) and whose names end with ``suffix``."""
    url = f"{stack.admin_url}/stats?filter={stats_filter}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return sum(int(v) for k, _, v in (x.partition(": ") for x in lines) if k.endswith(suffix))
