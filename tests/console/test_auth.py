"""CachedAuth: TokenReview / SubjectAccessReview answers reused for a while (injected clock)."""

from __future__ import annotations

from dataclasses import dataclass, field

from console.auth import ACTIONS, Action, CachedAuth, User

ALICE = User("alice", "uid-a", ("users",))


@dataclass
class Counting:
    """An authenticator that knows one token and allows reads only; it counts its calls."""

    reviews: list[str] = field(default_factory=list)

    async def authenticate(self, token: str) -> User | None:
        self.reviews.append(f"token {token}")
        return ALICE if token == "good" else None

    async def allowed(
        self, user: User, action: Action, namespace: str, name: str | None
    ) -> tuple[bool, str]:
        self.reviews.append(f"access {action.verb} {namespace}/{name}")
        return action.verb in ("get", "list"), "" if action.verb in ("get", "list") else "no"


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_accepted_tokens_are_reused_until_the_ttl_ends() -> None:
    inner, clock = Counting(), Clock()
    auth = CachedAuth(inner, ttl=10, clock=clock)
    assert await auth.authenticate("good") == ALICE
    clock.now = 9.9
    assert await auth.authenticate("good") == ALICE
    assert inner.reviews == ["token good"]
    clock.now = 10.0
    assert await auth.authenticate("good") == ALICE
    assert inner.reviews == ["token good", "token good"]
    # refused tokens are asked about every time (a fixed token works at once)
    assert await auth.authenticate("bad") is None
    assert await auth.authenticate("bad") is None
    assert inner.reviews.count("token bad") == 2


async def test_verdicts_are_reused_per_user_action_and_object() -> None:
    inner, clock = Counting(), Clock()
    auth = CachedAuth(inner, ttl=5, clock=clock)
    get, delete = ACTIONS["deployments.get"], ACTIONS["deployments.delete"]
    assert await auth.allowed(ALICE, get, "ns", "a") == (True, "")
    assert await auth.allowed(ALICE, get, "ns", "a") == (True, "")
    assert await auth.allowed(ALICE, delete, "ns", "a") == (False, "no")
    assert await auth.allowed(ALICE, delete, "ns", "a") == (False, "no")  # denials too
    assert await auth.allowed(ALICE, get, "ns", "b") == (True, "")
    assert inner.reviews == ["access get ns/a", "access delete ns/a", "access get ns/b"]
    clock.now = 5.0
    await auth.allowed(ALICE, delete, "ns", "a")
    assert inner.reviews[-1] == "access delete ns/a" and len(inner.reviews) == 4


async def test_the_cache_is_bounded() -> None:
    inner, clock = Counting(), Clock()
    auth = CachedAuth(inner, ttl=100, size=2, clock=clock)
    get = ACTIONS["deployments.get"]
    for name in ("a", "b", "c", "a"):
        await auth.allowed(ALICE, get, "ns", name)
    assert inner.reviews == [f"access get ns/{n}" for n in ("a", "b", "c", "a")]  # a was evicted
