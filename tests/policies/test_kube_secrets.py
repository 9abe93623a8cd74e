"""Secrets from the (emulated) Kubernetes API: the API-key Secret and the Redis password of
``rateLimit.global.redis.passwordSecretRef``, watched by ``extproc.kube_source`` (issue 5).

kmock ignores field selectors: the source must filter the Secrets by name itself, which the
unrelated Secret below checks."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import kmock
import pytest

from extproc.errors import GatewayError
from extproc.main import ExtProcApp, parse_args
from extproc.policies.auth import AuthConfig, Identity, SecretKeyStore, hash_key
from fleet.kube import KubeSource
from matrixinfer.process import free_port
from matrixinfer.testing.kube import VERBS, Api
from matrixinfer.testing.redis import PasswordRedis
from tests.xds.kube import NET, NS, create_pod, create_server, kube, meta

pytestmark = pytest.mark.timeout(60)

SECRETS = f"/api/v1/namespaces/{NS}/secrets"


def declare_secrets(api: Api) -> None:
    api.k.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=VERBS)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def key_entry(key: str, tenant: str, user: str) -> str:
    return json.dumps({"sha256": hash_key(key), "tenant": tenant, "user": user, "groups": ["g"]})


async def put_secret(api: Api, name: str, data: dict[str, str], *, create: bool = False) -> None:
    """Create or replace a Secret's data (base64, as the API server stores it)."""
    encoded = {k: b64(v) for k, v in data.items()}
    if create:
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": meta(api, name), "data": encoded}
        await api.request("POST", SECRETS, body)
        return
    current = api.objects("v1/secrets")[name]
    patch: dict[str, Any] = {"metadata": {"resourceVersion": api.next_rv()}, "data": encoded}
    # merge-patch: keys that are gone must be nulled explicitly
    for old in current.get("data") or {}:
        patch["data"].setdefault(old, None)
    await api.request("PATCH", f"{SECRETS}/{name}", patch)


async def until(cond: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


async def until_async(cond: Callable[[], Awaitable[bool]], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def create_route(api: Api, name: str, model: str, rate_limit: dict[str, Any] | None) -> None:
    spec: dict[str, Any] = {
        "modelName": model,
        "rules": [{"targets": [{"modelServerName": "pool"}]}],
    }
    if rate_limit is not None:
        spec["rateLimit"] = rate_limit
    body = {
        "apiVersion": "networking.matrixinfer.ai/v1alpha1",
        "kind": "ModelRoute",
        "metadata": meta(api, name),
        "spec": spec,
    }
    await api.request("POST", f"{NET}/modelroutes", body)


def global_limit(address: str, secret: str) -> dict[str, Any]:
    return {
        "requestsPerUnit": 1000,
        "unit": "hour",
        "global": {"redis": {"address": address, "passwordSecretRef": {"name": secret}}},
    }


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with kube() as a:
        declare_secrets(a)
        await create_pod(a, "sim-0", "127.0.0.1", {"app": "sim"})
        await create_server(a, "pool", {"app": "sim"}, 8000)
        yield a


async def test_source_watches_only_the_named_secrets(api: Api) -> None:
    await create_route(api, "limited", "m1", global_limit("127.0.0.1:6379", "redis-auth"))
    await put_secret(api, "api-keys", {"a": key_entry("k1", "t", "u")}, create=True)
    await put_secret(api, "redis-auth", {"password": "pw1"}, create=True)
    await put_secret(api, "unrelated", {"password": "nope"}, create=True)
    seen: list[tuple[str, str, Mapping[str, Any] | None]] = []
    source = KubeSource(
        api.url,
        lambda config: None,
        namespace=NS,
        debounce=0.01,
        backoff=0.05,
        secrets=[(NS, "api-keys")],
        route_secrets=True,
        on_secret=lambda ns, name, obj: seen.append((ns, name, obj)),
    )
    source.start()
    try:
        await until(lambda: source.status.applied > 0, "first configuration applied")
        await until(lambda: (NS, "redis-auth") in source.secrets, "the route's Secret watched")
        names = {name for _, name, _ in seen}
        assert names == {"api-keys", "redis-auth"}, names  # 'unrelated' filtered by name
        assert seen[0][2] is not None and seen[0][2]["data"]["a"] == b64(key_entry("k1", "t", "u"))

        # a change of the API-key Secret arrives through the watch
        await put_secret(api, "api-keys", {"b": key_entry("k2", "t", "v")})
        await until(
            lambda: seen[-1][1] == "api-keys" and "b" in (seen[-1][2] or {}).get("data", {}),
            "the API-key Secret's change",
        )
        await put_secret(api, "unrelated", {"password": "still-nope"})

        # the route stops naming the Secret: its watch ends (the API-key Secret stays watched)
        await api.request("DELETE", f"{NET}/modelroutes/limited")
        await until(lambda: (NS, "redis-auth") not in source.secrets, "the route's Secret dropped")
        assert (NS, "api-keys") in source.secrets

        # deleted Secret: reported as None
        await api.request("DELETE", f"{SECRETS}/api-keys")
        await until(lambda: seen[-1] == (NS, "api-keys", None), "the API-key Secret's deletion")
        assert all(name != "unrelated" for _, name, _ in seen)
    finally:
        await source.stop()


async def test_readiness_waits_for_the_api_key_secret_list(api: Api) -> None:
    """The first configuration is applied only after the API-key Secret was listed (so no
    request meets an empty key set at start); an absent Secret is a (logged) empty key set."""
    await create_route(api, "plain", "m1", None)
    applied: list[Any] = []
    source = KubeSource(
        api.url,
        applied.append,
        namespace=NS,
        debounce=0.01,
        secrets=[(NS, "api-keys")],
    )
    source.start()
    try:
        await until(lambda: source.status.applied > 0, "configuration applied")
        assert source.secrets == {(NS, "api-keys"): None}
    finally:
        await source.stop()


def extproc_app(api: Api, *extra: str) -> ExtProcApp:
    args = parse_args(
        [
            "--source",
            "kubernetes",
            "--server",
            api.url,
            "--namespace",
            NS,
            "--grpc-port",
            str(free_port()),
            "--http-port",
            str(free_port()),
            *extra,
        ]
    )
    app = ExtProcApp(args)
    app.watcher.backoff = 0.05
    return app


def who(app: ExtProcApp, key: str) -> Identity | int:
    try:
        found = app.policies.authenticate({"authorization": f"Bearer {key}"})
    except GatewayError as exc:
        return exc.status
    assert isinstance(found, Identity)
    return found


async def test_api_keys_from_a_secret_rotate_without_restart(api: Api) -> None:
    await create_route(api, "plain", "m1", None)
    await put_secret(
        api,
        "api-keys",
        {"alice": key_entry("key-1", "acme", "alice"), "bob": key_entry("key-2", "other", "bob")},
        create=True,
    )
    app = extproc_app(api, "--api-keys-secret", f"{NS}/api-keys")
    app.watcher.start()
    try:
        await until(lambda: app.ready()[0], "extproc ready")
        found = who(app, "key-1")
        assert found == Identity("acme", "alice", ("g",), "api-key")
        assert who(app, "key-3") == 401

        # rotation: key-1 replaced by key-3 in the Secret, no restart
        await put_secret(
            api,
            "api-keys",
            {
                "alice": key_entry("key-3", "acme", "alice"),
                "bob": key_entry("key-2", "other", "bob"),
            },
        )
        await until(lambda: who(app, "key-1") == 401, "the old key refused")
        assert isinstance(who(app, "key-3"), Identity) and isinstance(who(app, "key-2"), Identity)

        # a broken Secret keeps the previous keys
        await put_secret(api, "api-keys", {"alice": "{sha256: nothex, tenant: t, user: u}"})
        await until(lambda: app.policies.auth.keys.last_error is not None, "broken Secret seen")
        assert isinstance(who(app, "key-3"), Identity)

        # deleted Secret: no key is accepted
        await api.request("DELETE", f"{SECRETS}/api-keys")
        await until(lambda: who(app, "key-3") == 401, "keys revoked with the Secret")
    finally:
        await app.watcher.stop()
        await app.policies.close()


def test_api_keys_secret_needs_the_kubernetes_source() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--config", "/tmp", "--api-keys-secret", "ns/keys"])
    with pytest.raises(SystemExit):
        parse_args(["--source", "kubernetes", "--api-keys-secret", "no-slash"])


async def test_redis_password_from_secret_and_reconnect_on_change(
    api: Api, password_redis: PasswordRedis
) -> None:
    await create_route(api, "limited", "m1", global_limit(password_redis.address, "redis-auth"))
    await put_secret(api, "redis-auth", {"password": "pw-one"}, create=True)
    app = extproc_app(api, "--policies", "--ratelimit-fail", "closed")
    policies = app.policies
    app.watcher.start()

    admitted = 0

    async def admit() -> str | int:
        nonlocal admitted
        policy = policies.route_policy(app.datastore.snapshot, "m1")
        try:
            charge = await policies.admit(None, policy, 10, "chat", "m1")
        except GatewayError as exc:
            return exc.status
        admitted += 1
        return str(charge.where)

    try:
        await until(lambda: app.ready()[0], "extproc ready")
        await until(lambda: (NS, "redis-auth") in policies.secrets, "Redis Secret read")
        assert await admit() == "redis"  # AUTH with the Secret's password
        bucket = f"mi:rl:{NS}/limited"
        assert password_redis.client().exists(bucket) == 1

        # the operator rotates the password: Redis first (connections dropped), then the Secret
        password_redis.change_password("pw-two")

        async def refused() -> bool:
            return await admit() == 503

        await until_async(refused, "old password refused (fail closed: 503)")
        await put_secret(api, "redis-auth", {"password": "pw-two"})

        async def back() -> bool:
            return await admit() == "redis"

        await until_async(back, "reconnected with the new password")
        client = next(iter(policies.redis.values()))
        assert client.password == "pw-two"
        # every admission took a request from the shared bucket (1000 per hour): also one
        # admitted ahead of its charge just as the password changed (the charge is kept and
        # written once Redis takes the new password)
        await policies.flush()
        level = float(password_redis.client().hget(bucket, "r") or 0)
        assert 1000 - admitted <= level < 1000 - admitted + 0.5, (level, admitted)
    finally:
        await app.watcher.stop()
        await policies.close()


def test_auth_config_secret_field_is_checked(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text("apiKeysFile: keys.yaml\napiKeysSecret: ns/keys\n")
    with pytest.raises(ValueError, match="exclusive"):
        AuthConfig.load(both)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiKeysSecret: just-a-name\n")
    with pytest.raises(ValueError, match="apiKeysSecret"):
        AuthConfig.load(bad)
    good = tmp_path / "good.yaml"
    good.write_text("apiKeysSecret: models/matrixinfer-api-keys\n")
    assert AuthConfig.load(good).api_keys_secret == "models/matrixinfer-api-keys"


def test_secret_key_store_from_listed_objects() -> None:
    """List items carry no ``kind``; a value that is not base64 is named in the error and the
    previous keys stay."""
    store = SecretKeyStore(NS, "api-keys")
    store.update({"metadata": {"name": "api-keys"}, "data": {"a": b64(key_entry("k1", "t", "u"))}})
    assert store.lookup("k1") == Identity("t", "u", ("g",), "api-key")
    store.update({"metadata": {"name": "api-keys"}, "data": {"broken": "%%%"}})
    assert store.last_error is not None and "data.broken" in store.last_error
    assert store.lookup("k1") is not None
    store.update(None)
    assert store.lookup("k1") is None and store.loaded
