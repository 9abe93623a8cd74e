"""Secrets end to end: the openai client -> Envoy (configured over ADS) -> the extproc process with
``--source kubernetes --api-keys-secret`` -> simulator pods, everything read from the emulated
Kubernetes API (kmock): API keys from a Secret rotate without a restart, and a ModelRoute's shared
Redis budget authenticates with the password of its ``passwordSecretRef`` (fail-closed, so a
wrong password would answer 503 instead of 429)."""

from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from matrixinfer.process import Child, free_port, http_ok
from matrixinfer.testing.redis import PasswordRedis
from sim.fleet import Fleet
from tests.policies.test_kube_secrets import (
    create_route,
    declare_secrets,
    global_limit,
    key_entry,
    put_secret,
    until,
    until_async,
)
from tests.xds.conftest import ads_envoy
from tests.xds.kube import NS, create_pod, create_server, create_service, kube, kube_xds_app

pytestmark = pytest.mark.timeout(120)


def chat(url: str, key: str, model: str = "m-open") -> str:
    c = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=20)
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    return r.choices[0].message.content or ""


def refused(url: str, key: str) -> bool:
    try:
        chat(url, key)
    except openai.AuthenticationError:
        return True
    return False


async def test_secrets_through_envoy(
    tmp_path: Path, policy_fleet: Fleet, password_redis: PasswordRedis
) -> None:
    fleet = policy_fleet
    async with kube() as api:
        declare_secrets(api)
        grpc_port, http_port, listen_port = free_port(), free_port(), free_port()
        for pod in fleet.pods:
            await create_pod(api, pod.name, pod.host, {"app": "sim"})
        await create_server(api, "pool", {"app": "sim"}, fleet.port)
        await create_route(api, "open", "m-open", None)
        budget = global_limit(password_redis.address, "redis-auth")
        budget["requestsPerUnit"] = 2
        await create_route(api, "budget", "m-budget", budget)
        await create_service(api, "matrixinfer-extproc", {"app": "extproc"}, grpc_port)
        await create_pod(api, "extproc-0", "127.0.0.1", {"app": "extproc"})
        await put_secret(
            api, "api-keys", {"alice": key_entry("key-1", "acme", "alice")}, create=True
        )
        await put_secret(api, "redis-auth", {"password": password_redis.password}, create=True)

        extproc = Child(
            "extproc",
            [
                sys.executable,
                "-m",
                "extproc.main",
                "--source",
                "kubernetes",
                "--server",
                api.url,
                "--namespace",
                NS,
                "--api-keys-secret",
                f"{NS}/api-keys",
                "--ratelimit-fail",
                "closed",
                "--usage-grace",
                "2",
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--scrape-interval",
                "0.1",
            ],
            log_path=tmp_path / "extproc.log",
            ready=functools.partial(http_ok, f"http://127.0.0.1:{http_port}/readyz"),
        )
        app = kube_xds_app(api, grpc_port, listen_port)
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(stop))
        envoy: Child | None = None
        try:
            await asyncio.to_thread(extproc.start)
            await until(lambda: bool(app.bound_port), "ADS server up")
            await until(lambda: bool(app.ads.cache.versions().get("LDS")), "first generated set")
            envoy, _ = ads_envoy(tmp_path, app.bound_port)
            await asyncio.to_thread(envoy.start)
            url = f"http://127.0.0.1:{listen_port}/v1"

            def first_ok() -> bool:
                try:
                    return bool(chat(url, "key-1"))
                except openai.APIStatusError as exc:
                    if exc.status_code in (401, 403):
                        raise
                    return False  # Envoy may not have the pods yet (503)

            await until_async(
                lambda: asyncio.to_thread(first_ok), "the first request through Envoy", 20
            )
            with pytest.raises(openai.AuthenticationError):
                await asyncio.to_thread(chat, url, "key-2")

            # rotation in the Secret: key-2 replaces key-1, the running extproc follows
            await put_secret(api, "api-keys", {"alice": key_entry("key-2", "acme", "alice")})
            await until_async(
                lambda: asyncio.to_thread(refused, url, "key-1"), "key-1 refused after rotation"
            )
            assert await asyncio.to_thread(chat, url, "key-2")

            # the shared budget in a password-protected Redis: 2 requests, then 429 (not 503)
            assert await asyncio.to_thread(chat, url, "key-2", "m-budget")
            assert await asyncio.to_thread(chat, url, "key-2", "m-budget")
            with pytest.raises(openai.RateLimitError) as exc:
                await asyncio.to_thread(chat, url, "key-2", "m-budget")
            assert exc.value.response.headers["x-ratelimit-limit-requests"] == "2"
            assert password_redis.client().exists(f"mi:rl:{NS}/budget") == 1
        except BaseException:
            print(extproc.log_tail(40))
            raise
        finally:
            if envoy is not None:
                await asyncio.to_thread(envoy.stop)
            await asyncio.to_thread(extproc.stop)
            stop.set()
            await asyncio.wait_for(task, 10)
