"""Which ModelRoute serves a model name that several routes claim. Pure.

The route that serves a name first keeps it:

1. the route created first (``metadata.creationTimestamp``, Kubernetes), a route without a
   creation time (files) ranking after every route that has one;
2. then the route that already served the name in the previous configuration (files: the route
   applied first keeps the name when a newcomer claims it);
3. then ``namespace/name`` in alphabetical order.

The gateway (``extproc.routing.RouteTable``) and the ModelRoute status controller
(``controllers.status``) both decide with :func:`winners`; the losers are reported (warning,
``/debug/state``, status condition ``Accepted=False`` reason ``ModelNameTaken``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Claim", "claim_rank", "winners"]


@dataclass(slots=True, frozen=True)
class Claim:
    """A route's claim on one model name (``modelName``) or LoRA adapter name."""

    name: str
    route: str  # the claiming ModelRoute's namespace/name
    created: str | None = None  # metadata.creationTimestamp (RFC 3339, UTC), None from files


def claim_rank(claim: Claim, held_by: Mapping[str, str]) -> tuple[bool, str, bool, str]:
    """Sort key of a claim: the smallest rank wins (the rule of this module's docstring).

    Creation times are the API server's RFC 3339 UTC strings (``2025-01-01T00:00:00Z``), which
    sort in time order as text."""
    return (
        claim.created is None,
        claim.created or "",
        held_by.get(claim.name) != claim.route,
        claim.route,
    )


def winners(claims: Iterable[Claim], held_by: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each claimed name → the namespace/name of the route that serves it.

    ``held_by``: name → route that served it in the previous configuration."""
    held = held_by or {}
    best: dict[str, Claim] = {}
    for claim in claims:
        current = best.get(claim.name)
        if current is None or claim_rank(claim, held) < claim_rank(current, held):
            best[claim.name] = claim
    return {name: claim.route for name, claim in best.items()}
