"""Authentication cores: API key files (plain and Secret shape, rotation), JWT against a JWKS served
by a local aiohttp server with keys generated here, authorisation."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from crds.networking import Access
from extproc.errors import GatewayError
from extproc.policies.auth import (
    ApiKeyStore,
    AuthConfig,
    Authenticator,
    Identity,
    JwtConfig,
    authorize,
    hash_key,
    parse_key_file,
)
from extproc.policies.jwks import JwksCache
from tests.policies.conftest import keys_yaml


def test_secret_shaped_key_file() -> None:
    entry = {"sha256": hash_key("k1"), "tenant": "t", "user": "u", "groups": ["g"]}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "matrixinfer-api-keys"},
        "data": {"one": base64.b64encode(json.dumps(entry).encode()).decode()},
        "stringData": {"two": json.dumps([{**entry, "sha256": hash_key("k2"), "user": "v"}])},
    }
    keys = parse_key_file(json.dumps(secret))
    assert keys[hash_key("k1")] == Identity("t", "u", ("g",))
    assert keys[hash_key("k2")].user == "v"


def test_bad_key_file_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"keys\[0\]"):
        parse_key_file("keys: [{sha256: nothex, tenant: t, user: u}]", "k.yaml")


def test_key_store_reloads_and_keeps_old_keys_on_error(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml({"a": ("t", "ua", [])}))
    store = ApiKeyStore(path, reload_interval=1.0, clock=lambda: now[0])
    assert store.lookup("a") is not None and store.lookup("b") is None
    path.write_text(keys_yaml({"b": ("t", "ub", [])}))
    assert store.lookup("b") is None  # not checked again yet
    now[0] += 1.5
    assert store.lookup("b") is not None and store.lookup("a") is None
    path.write_text("keys: [{broken")
    now[0] += 1.5
    assert store.lookup("b") is not None  # the previous keys stay
    assert store.last_error is not None


def test_authenticator_api_keys_and_anonymous(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml({"good": ("acme", "alice", ["ml"])}))
    auth = Authenticator(AuthConfig(api_keys_file=path, anonymous_routes=["open"]))
    assert auth.authenticate({"authorization": "Bearer good"}) == Identity("acme", "alice", ("ml",))
    assert auth.authenticate({}) is None
    with pytest.raises(GatewayError) as exc:
        auth.authenticate({"authorization": "Bearer bad"})
    assert exc.value.status == 401
    assert auth.identify(None, "open").method == "anonymous"
    with pytest.raises(GatewayError) as exc:
        auth.identify(None, "closed")
    assert exc.value.status == 401


def test_authorize() -> None:
    who = Identity("acme", "alice", ("ml",))
    authorize(who, None, "r")
    authorize(who, Access(groups=["ml"]), "r")
    authorize(who, Access(users=["alice"]), "r")
    with pytest.raises(GatewayError) as exc:
        authorize(who, Access(tenants=["other"], groups=["ops"]), "r")
    assert exc.value.status == 403 and exc.value.code == "permission_denied"


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    data.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return data


class JwksServer:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.fail = False
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.fail:
            return web.Response(status=500)
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks_server(unused_tcp_port: int) -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    server.url = f"http://127.0.0.1:{unused_tcp_port}/jwks"
    try:
        yield server
    finally:
        await runner.cleanup()


def token(key: rsa.RSAPrivateKey, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": "https://idp",
        "aud": "matrixinfer",
        "sub": "alice",
        "tenant": "acme",
    }
    body.update({"exp": now + 60, "iat": now})
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


async def test_jwt_via_jwks(jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks_server.keys = [jwk_of(rsa_key, "k1")]
    cfg = JwtConfig(
        issuer="https://idp", audience="matrixinfer", jwks_url=jwks_server.url, leeway_seconds=5
    )
    cache = JwksCache(cfg.jwks_url, min_refetch=0.0)
    auth = Authenticator(AuthConfig(jwt=cfg), jwks=cache)
    assert await cache.refresh()
    who = auth.authenticate({"authorization": "Bearer " + token(rsa_key, "k1", groups=["ml"])})
    assert who == Identity("acme", "alice", ("ml",), "jwt")

    def status(tok: str) -> str:
        with pytest.raises(GatewayError) as exc:
            auth.authenticate({"authorization": "Bearer " + tok})
        assert exc.value.status == 401
        return exc.value.message

    now = int(time.time())
    assert "expired" in status(token(rsa_key, "k1", exp=now - 60))
    # within the leeway: still valid
    auth.authenticate({"authorization": "Bearer " + token(rsa_key, "k1", exp=now - 2)})
    assert "not valid yet" in status(token(rsa_key, "k1", nbf=now + 60))
    assert "audience" in status(token(rsa_key, "k1", aud="someone-else"))
    assert "issuer" in status(token(rsa_key, "k1", iss="https://evil"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "invalid token" in status(token(other, "k1"))  # wrong signature
    assert "tenant" in status(token(rsa_key, "k1", tenant=None))

    # key rotation at the IdP: an unknown kid triggers a refetch, then the token passes
    jwks_server.keys.append(jwk_of(other, "k2"))
    hits = jwks_server.hits
    assert "not known" in status(token(other, "k2"))
    assert cache._task is not None
    await cache._task
    assert jwks_server.hits == hits + 1
    assert auth.authenticate({"authorization": "Bearer " + token(other, "k2")}) is not None


async def test_jwks_backoff_keeps_old_keys(
    jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    now = [0.0]
    jwks_server.keys = [jwk_of(rsa_key, "k1")]
    cache = JwksCache(jwks_server.url, refresh=300, min_refetch=1.0, clock=lambda: now[0])
    assert await cache.refresh()
    jwks_server.fail = True
    assert not await cache.refresh()
    assert not await cache.refresh()
    assert cache.failures == 2
    assert cache.next_attempt == pytest.approx(4.0)  # 1 s x 2^2: exponential backoff
    assert "k1" in cache.keys  # the last good keys stay
    hits = jwks_server.hits
    cache.want_refresh()  # too early: no fetch
    assert jwks_server.hits == hits and cache._task is None
