"""Who the caller is and what they may do: a bearer token checked with Kubernetes TokenReview,
each action authorised with SubjectAccessReview (the user can do only what RBAC lets them); or,
in the local stack, one token generated at start that may do everything."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from console.kube import KubeClient

__all__ = [
    "ACTIONS",
    "Action",
    "Authenticator",
    "CachedAuth",
    "KubeAuth",
    "StaticTokenAuth",
    "User",
]

_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class Action:
    """A console action as the Kubernetes RBAC attributes it needs."""

    verb: str
    group: str
    resource: str
    subresource: str = ""


_MODELS = ("registry.matrixinfer.ai", "models")
ACTIONS: dict[str, Action] = {
    "deployments.list": Action("list", *_MODELS),
    "deployments.get": Action("get", *_MODELS),
    "deployments.create": Action("create", *_MODELS),
    "deployments.update": Action("update", *_MODELS),
    "deployments.delete": Action("delete", *_MODELS),
    "deployments.logs": Action("get", "", "pods", "log"),
    "deployments.metrics": Action("get", *_MODELS),
    "deployments.chat": Action("get", *_MODELS),
    # whoever may deploy may ask what fits (the console reads the nodes with its own account)
    "recommendations": Action("create", *_MODELS),
}
"""Every action the REST API authorises, in one place."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = field(default_factory=tuple)


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> User | None: ...

    async def allowed(
        self, user: User, action: Action, namespace: str, name: str | None
    ) -> tuple[bool, str]: ...


class StaticTokenAuth:
    """One token (the local stack's): whoever holds it may do everything."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def authenticate(self, token: str) -> User | None:
        if hmac.compare_digest(token.encode(), self.token.encode()):
            return User("local")
        return None

    async def allowed(
        self, user: User, action: Action, namespace: str, name: str | None
    ) -> tuple[bool, str]:
        return True, ""


class KubeAuth:
    """TokenReview for the identity, SubjectAccessReview for each action."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    async def authenticate(self, token: str) -> User | None:
        status = await self.kube.token_review(token)
        if not status.get("authenticated"):
            return None
        info = status.get("user") or {}
        return User(
            str(info.get("username", "")),
            str(info.get("uid", "")),
            tuple(str(g) for g in info.get("groups") or []),
        )

    async def allowed(
        self, user: User, action: Action, namespace: str, name: str | None
    ) -> tuple[bool, str]:
        attrs = {
            "namespace": namespace,
            "verb": action.verb,
            "group": action.group,
            "resource": action.resource,
        }
        if action.subresource:
            attrs["subresource"] = action.subresource
        if name:
            attrs["name"] = name
        spec = {"user": user.name, "groups": list(user.groups), "resourceAttributes": attrs}
        if user.uid:
            spec["uid"] = user.uid
        status = await self.kube.subject_access_review(spec)
        return bool(status.get("allowed")) and not status.get("denied"), str(
            status.get("reason") or ""
        )


class _TtlCache(OrderedDict[_K, tuple[float, _V]]):
    """At most ``size`` entries, each valid for ``ttl`` seconds of ``clock``; oldest out first."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float]) -> None:
        super().__init__()
        self.ttl, self.size, self.clock = ttl, size, clock

    def fresh(self, key: _K) -> tuple[bool, _V | None]:
        hit = self.get(key)
        if hit is None:
            return False, None
        if hit[0] <= self.clock():
            del self[key]
            return False, None
        return True, hit[1]

    def put(self, key: _K, value: _V) -> None:
        self[key] = (self.clock() + self.ttl, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class CachedAuth:
    """Remembers what ``inner`` answered for ``ttl`` seconds: the UI polls every few seconds and
    each call would cost a TokenReview and a SubjectAccessReview. Only accepted tokens are
    remembered (by their SHA-256, never the token itself); both allow and deny answers are, so a
    changed RoleBinding takes effect within ``ttl``."""

    def __init__(
        self,
        inner: Authenticator,
        ttl: float = 10.0,
        size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self._users: _TtlCache[bytes, User] = _TtlCache(ttl, size, clock)
        self._verdicts: _TtlCache[tuple[User, Action, str, str | None], tuple[bool, str]] = (
            _TtlCache(ttl, size, clock)
        )

    async def authenticate(self, token: str) -> User | None:
        key = hashlib.sha256(token.encode()).digest()
        hit, user = self._users.fresh(key)
        if hit:
            return user
        user = await self.inner.authenticate(token)
        if user is not None:
            self._users.put(key, user)
        return user

    async def allowed(
        self, user: User, action: Action, namespace: str, name: str | None
    ) -> tuple[bool, str]:
        key = (user, action, namespace, name)
        hit, verdict = self._verdicts.fresh(key)
        if hit and verdict is not None:
            return verdict
        verdict = await self.inner.allowed(user, action, namespace, name)
        self._verdicts.put(key, verdict)
        return verdict
