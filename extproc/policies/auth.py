"""Who is calling, and may they call this route: API keys, JWT (JWKS), per-route anonymous access.

Pure apart from the key file's ``stat``: JWT signing keys come from a :class:`SigningKeys` source
(:class:`extproc.policies.jwks.JwksCache` fetches them), injected by the caller.

- **API keys** (``Authorization: Bearer <key>``) are stored as SHA-256 hex digests in a file, each
  mapping to a tenant, a user and groups. The file is either ``{"keys": [...]}`` (YAML or JSON) or a
  Kubernetes ``Secret`` (``data`` base64 / ``stringData``; each value is one entry or a list). The
  file is re-read when its mtime/size changes (checked at most every ``reload_interval`` seconds),
  so keys rotate without a restart; a broken file keeps the previous keys (logged).
- **JWT**: a bearer token with two dots is verified against the issuer's JWKS (``kid`` lookup),
  ``iss``, ``aud``, ``exp``/``nbf`` with ``leeway``; claims map to tenant / user / groups.
- **Anonymous**: routes listed in ``anonymousRoutes`` take requests without credentials.
- **Authorisation**: ``ModelRoute.access`` (tenants / users / groups); absent = any caller.

401 (no or bad credentials) and 403 (known caller, not allowed) are distinct OpenAI-style errors.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from extproc.errors import GatewayError

__all__ = [
    "ANONYMOUS",
    "ApiKeyStore",
    "AuthConfig",
    "Authenticator",
    "Identity",
    "JwtConfig",
    "SecretKeyStore",
    "SigningKeys",
    "authorize",
    "forbidden",
    "hash_key",
    "keys_from_secret",
    "parse_key_file",
    "secret_data",
    "unauthenticated",
]

log = logging.getLogger("matrixinfer.extproc.auth")


def unauthenticated(message: str) -> GatewayError:
    return GatewayError(401, message, error_type="invalid_request_error", code="invalid_api_key")


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, error_type="permission_error", code="permission_denied")


@dataclass(slots=True, frozen=True)
class Identity:
    tenant: str
    user: str
    groups: tuple[str, ...] = ()
    method: str = "api-key"  # api-key | jwt | anonymous


ANONYMOUS = Identity(tenant="anonymous", user="anonymous", method="anonymous")


def hash_key(key: str) -> str:
    """The stored form of an API key: lower-case SHA-256 hex of its UTF-8 bytes."""
    return hashlib.sha256(key.encode()).hexdigest()


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ApiKeyEntry(_Model):
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 hex of the key")
    tenant: str = Field(min_length=1)
    user: str = Field(min_length=1)
    groups: list[str] = Field(default_factory=list)


class JwtConfig(_Model):
    issuer: str = Field(min_length=1)
    audience: str | None = None
    jwks_url: str = Field(min_length=1)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    leeway_seconds: float = Field(default=30.0, ge=0)
    refresh_seconds: float = Field(default=300.0, gt=0)
    tenant_claim: str = "tenant"
    user_claim: str = "sub"
    groups_claim: str = "groups"
    default_tenant: str | None = None


class AuthConfig(_Model):
    """``--auth-config`` file (YAML): how callers authenticate."""

    api_keys_file: Path | None = None
    api_keys_secret: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$",
        description="namespace/name of a Secret holding the keys (needs --source kubernetes)",
    )
    reload_interval_seconds: float = Field(default=1.0, ge=0)
    jwt: JwtConfig | None = None
    anonymous_routes: list[str] = Field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> AuthConfig:
        try:
            data = yaml.safe_load(path.read_text()) or {}
            cfg = cls.model_validate(data)
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"auth config {path}: {exc}") from None
        except ValidationError as exc:
            raise ValueError(f"auth config {path}: {exc}") from None
        if cfg.api_keys_file is not None and cfg.api_keys_secret is not None:
            raise ValueError(
                f"auth config {path}: apiKeysFile and apiKeysSecret are exclusive; give one"
            )
        if cfg.api_keys_file is not None and not cfg.api_keys_file.is_absolute():
            cfg.api_keys_file = path.parent / cfg.api_keys_file
        return cfg


def _entries_of(value: Any, where: str) -> list[ApiKeyEntry]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a key entry or a list of them")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(ApiKeyEntry.model_validate(item))
        except ValidationError as exc:
            raise ValueError(f"{where}[{i}]: {exc}") from None
    return out


def parse_key_file(text: str, source: str = "<keys>") -> dict[str, Identity]:
    """Digest -> identity from a key file (``keys:`` list, or a Kubernetes Secret)."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping with 'keys' or a Secret")
    if data.get("kind") == "Secret":
        return keys_from_secret(data, source)
    return _identities(_entries_of(data.get("keys") or [], f"{source}: keys"))


def secret_data(secret: Mapping[str, Any], source: str = "<secret>") -> dict[str, str]:
    """A Secret's values as text: ``data`` (base64, as the API returns it) and ``stringData``."""
    out: dict[str, str] = {}
    for name, raw in (secret.get("data") or {}).items():
        try:
            out[str(name)] = base64.b64decode(str(raw), validate=True).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{source}: data.{name} is not base64 of UTF-8 text: {exc}") from None
    for name, raw in (secret.get("stringData") or {}).items():
        out[str(name)] = str(raw)
    return out


def keys_from_secret(secret: Mapping[str, Any], source: str = "<secret>") -> dict[str, Identity]:
    """Digest -> identity from a Secret object (each value: one key entry or a list, YAML/JSON).

    Objects from the API's list have no ``kind``: only ``data`` / ``stringData`` are read."""
    entries: list[ApiKeyEntry] = []
    for name, text in sorted(secret_data(secret, source).items()):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: {name}: not YAML/JSON: {exc}") from None
        entries += _entries_of(value, f"{source}: {name}")
    return _identities(entries)


def _identities(entries: list[ApiKeyEntry]) -> dict[str, Identity]:
    return {
        e.sha256.lower(): Identity(e.tenant, e.user, tuple(e.groups), "api-key") for e in entries
    }


class ApiKeyStore:
    """Hashed API keys from a file, re-read when the file changes."""

    def __init__(
        self,
        path: Path,
        *,
        reload_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.reload_interval = reload_interval
        self.clock = clock
        self.keys: dict[str, Identity] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self.reloads = 0
        self.last_error: str | None = None
        self.maybe_reload(force=True)

    def maybe_reload(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._checked < self.reload_interval:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._fail(f"cannot read API key file {self.path}: {exc}")
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            keys = parse_key_file(self.path.read_text(), str(self.path))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            self._fail(f"API key file {self.path} rejected, keeping the previous keys: {exc}")
            return
        self._stamp = stamp
        self.keys = keys
        self.reloads += 1
        self.last_error = None
        log.info("API keys loaded from %s: %d keys", self.path, len(keys))

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s", message)
        self.last_error = message

    def lookup(self, key: str) -> Identity | None:
        self.maybe_reload()
        return self.keys.get(hash_key(key))


class SecretKeyStore:
    """Hashed API keys from a Kubernetes Secret, replaced whenever the Secret changes.

    ``update`` is called by the Kubernetes source (``extproc.kube_source``) with the Secret as
    listed/watched (``None``: it does not exist). A Secret that does not parse keeps the previous
    keys (logged); a deleted Secret removes every key (requests then get 401)."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self.keys: dict[str, Identity] = {}
        self.loaded = False  # a list of the Secret was seen (present or not)
        self.reloads = 0
        self.last_error: str | None = None

    @property
    def ref(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def update(self, secret: Mapping[str, Any] | None) -> None:
        where = f"Secret {self.namespace}/{self.name}"
        self.loaded = True
        if secret is None:
            if self.keys or self.reloads == 0:
                log.error("API key %s does not exist: no API key is accepted", where)
            self.keys = {}
            self.reloads += 1
            return
        try:
            keys = keys_from_secret(secret, where)
        except ValueError as exc:
            message = f"API key {where} rejected, keeping the previous keys: {exc}"
            if message != self.last_error:
                log.error("%s", message)
            self.last_error = message
            return
        self.keys = keys
        self.reloads += 1
        self.last_error = None
        log.info("API keys loaded from %s: %d keys", where, len(keys))

    def lookup(self, key: str) -> Identity | None:
        return self.keys.get(hash_key(key))


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


class SigningKeys(Protocol):
    """Where JWT signing keys come from (:class:`extproc.policies.jwks.JwksCache`)."""

    def key_for(self, kid: str) -> Any: ...
    def want_refresh(self) -> None: ...


class Authenticator:
    """Credentials (request headers) -> :class:`Identity`, or a 401 GatewayError."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        keys: ApiKeyStore | SecretKeyStore | None = None,
        jwks: SigningKeys | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        if keys is None and config.api_keys_file is not None:
            keys = ApiKeyStore(config.api_keys_file, reload_interval=config.reload_interval_seconds)
        elif keys is None and config.api_keys_secret is not None:
            namespace, _, name = config.api_keys_secret.partition("/")
            keys = SecretKeyStore(namespace, name)
        self.keys = keys
        if jwks is None and config.jwt is not None:
            raise ValueError("jwt is configured: pass its signing keys (extproc.policies.jwks)")
        self.jwks = jwks
        self.wall_clock = wall_clock
        self.anonymous_routes = frozenset(config.anonymous_routes)

    def authenticate(self, headers: Mapping[str, str]) -> Identity | None:
        """The caller, ``None`` when no credentials were sent; bad credentials raise 401."""
        raw = headers.get("authorization")
        if raw is None:
            return None
        scheme, _, token = raw.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated("the Authorization header must be 'Bearer <API key or token>'")
        if self.jwks is not None and token.count(".") == 2:
            return self._jwt(token)
        if self.keys is not None:
            found = self.keys.lookup(token)
            if found is not None:
                return found
        raise unauthenticated("incorrect API key provided")

    def _jwt(self, token: str) -> Identity:
        cfg = self.config.jwt
        assert cfg is not None and self.jwks is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise unauthenticated(f"malformed token: {exc}") from None
        kid = str(header.get("kid", ""))
        key = self.jwks.key_for(kid)
        if key is None:
            self.jwks.want_refresh()
            raise unauthenticated(f"the token's signing key (kid '{kid}') is not known")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=cfg.algorithms,
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_seconds,
                options={"require": ["exp", "iss", "sub"], "verify_aud": cfg.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthenticated("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise unauthenticated("the token's audience is not this gateway") from None
        except jwt.InvalidIssuerError:
            raise unauthenticated("the token's issuer is not trusted") from None
        except jwt.PyJWTError as exc:
            raise unauthenticated(f"invalid token: {exc}") from None
        user = _claim(claims, cfg.user_claim)
        tenant = _claim(claims, cfg.tenant_claim) or cfg.default_tenant
        groups = _claim(claims, cfg.groups_claim) or []
        if not isinstance(user, str) or not user:
            raise unauthenticated(f"the token has no '{cfg.user_claim}' claim")
        if not isinstance(tenant, str) or not tenant:
            raise unauthenticated(f"the token has no '{cfg.tenant_claim}' claim")
        if isinstance(groups, str):
            groups = groups.split()
        return Identity(tenant, user, tuple(str(g) for g in groups), "jwt")

    def identify(self, identity: Identity | None, route: str) -> Identity:
        """The caller for ``route``: anonymous when allowed there, else 401 without credentials."""
        if identity is not None:
            return identity
        if route in self.anonymous_routes:
            return ANONYMOUS
        raise unauthenticated(
            "you didn't provide an API key; send 'Authorization: Bearer <API key or token>'"
        )


def authorize(identity: Identity, access: Any, route: str) -> None:
    """``ModelRoute.access``: a caller in any list may call; absent = everyone. 403 otherwise."""
    if access is None:
        return
    if identity.tenant in (access.tenants or ()):
        return
    if identity.user in (access.users or ()):
        return
    allowed_groups = access.groups or ()
    if any(g in allowed_groups for g in identity.groups):
        return
    raise forbidden(
        f"user '{identity.user}' of tenant '{identity.tenant}' may not call ModelRoute '{route}'"
    )
