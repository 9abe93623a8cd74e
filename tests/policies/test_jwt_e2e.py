"""JWT end to end: the openai client -> Envoy -> extproc (JWKS from a local aiohttp server, keys
generated here) -> simulator pods. Valid / expired / wrong-audience tokens, ModelRoute.access on
the token's claims, and a signing-key rotation at the identity provider (new ``kid``)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import jwt
import openai
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from openai import OpenAI

from matrixinfer.process import free_port, wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric
from sim.fleet import Fleet
from tests.policies.conftest import POOL, documents, policy_stack, route_yaml, write_config

pytestmark = pytest.mark.timeout(120)

ISSUER = "https://idp.test"
AUDIENCE = "matrixinfer"

ROUTES = documents(
    POOL,
    route_yaml("members", "members-model", access="{tenants: [acme]}"),
    route_yaml("team", "team-model", access="{groups: [ml]}"),
)


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    data.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return data


def token(key: rsa.RSAPrivateKey, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "tenant": "acme",
        "iat": now,
        "exp": now + 300,
    }
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


class JwksServer:
    """An identity provider's JWKS endpoint (aiohttp, on its own event loop in a thread, since
    the openai client and the stack fixtures here are synchronous)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/.well-known/jwks.json"
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"keys": list(self.keys)})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        self._thread.start()
        started: Future[None] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        started.result(timeout=30)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def first_key() -> rsa.RSAPrivateKey:
    return new_key()


@pytest.fixture(scope="module")
def jwks(first_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [jwk_of(first_key, "k1")]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, policy_fleet: Fleet, jwks: JwksServer
) -> Iterator[GatewayStack]:
    config = tmp_path_factory.mktemp("jwt-config")
    write_config(config, policy_fleet, ROUTES)
    auth = tmp_path_factory.mktemp("jwt-auth") / "auth.yaml"
    auth.write_text(
        "jwt:\n"
        f"  issuer: {ISSUER}\n"
        f"  audience: {AUDIENCE}\n"
        f"  jwksUrl: {jwks.url}\n"
        "  algorithms: [RS256]\n"
        # a leeway far above what a loaded machine takes per request: the expired-within-leeway
        # check below must not turn into a race against the clock
        "  leewaySeconds: 60\n"
        "  refreshSeconds: 3600\n"  # rotation below must come from the unknown-kid refetch
        "  tenantClaim: tenant\n"
        "  userClaim: sub\n"
        "  groupsClaim: groups\n"
    )
    s = policy_stack(
        config,
        tmp_path_factory.mktemp("jwt-run"),
        policy_fleet,
        ("--auth-config", str(auth), "--usage-grace", "5"),
    )
    try:
        yield s
    finally:
        s.stop()


def chat(stack: GatewayStack, bearer: str, model: str = "members-model") -> str:
    c = OpenAI(base_url=stack.url, api_key=bearer, max_retries=0, timeout=20)
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    return r.choices[0].message.content or ""


def test_valid_token_passes(stack: GatewayStack, first_key: rsa.RSAPrivateKey) -> None:
    ok = metric(stack, "matrixinfer_gateway_auth_results_total", method="jwt", result="ok")
    assert chat(stack, token(first_key, "k1"))
    # groups from the token (a space-separated string is split) against access.groups
    assert chat(stack, token(first_key, "k1", tenant="other", groups="ops ml"), "team-model")
    after = metric(stack, "matrixinfer_gateway_auth_results_total", method="jwt", result="ok")
    assert after - ok == 2


def test_expired_and_wrong_audience_are_401(
    stack: GatewayStack, first_key: rsa.RSAPrivateKey
) -> None:
    now = int(time.time())
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(stack, token(first_key, "k1", iat=now - 900, exp=now - 600))  # past the 60 s leeway
    assert exc.value.status_code == 401
    assert "expired" in str(exc.value)
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(stack, token(first_key, "k1", aud="another-service"))
    assert "audience" in str(exc.value)
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(stack, token(new_key(), "k1"))  # right kid, wrong signature
    assert "invalid token" in str(exc.value)
    # within the leeway an expired-by-2-s token still passes
    now = int(time.time())
    assert chat(stack, token(first_key, "k1", iat=now - 600, exp=now - 2))


def test_caller_not_in_access_is_403(stack: GatewayStack, first_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(stack, token(first_key, "k1", sub="bob", tenant="other"))
    assert exc.value.status_code == 403
    assert "bob" in str(exc.value) and "members" in str(exc.value)
    with pytest.raises(openai.PermissionDeniedError):
        chat(stack, token(first_key, "k1", groups=["ops"]), "team-model")


def test_signing_key_rotation_is_picked_up(
    stack: GatewayStack, jwks: JwksServer, first_key: rsa.RSAPrivateKey
) -> None:
    """The IdP rotates: the JWKS now has only k2. A k2 token is refused while the extproc does not
    know k2 yet (that request triggers a refetch, at most every 5 s), then passes; k1 tokens are
    refused from the refetch on."""
    second = new_key()
    hits = jwks.hits
    jwks.keys = [jwk_of(second, "k2")]
    fresh = token(second, "k2")

    def second_key_works() -> bool:
        try:
            return bool(chat(stack, fresh))
        except openai.AuthenticationError as exc:
            assert "not known" in str(exc), exc  # the only acceptable refusal meanwhile
            return False

    wait_until(second_key_works, 30, "the token signed by the new kid passes", interval=0.5)
    assert jwks.hits > hits
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(stack, token(first_key, "k1"))
    assert "kid 'k1'" in str(exc.value)
