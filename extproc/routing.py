"""ModelRoute semantics: which ModelServer serves a request. Pure (no I/O, injected randomness).

A :class:`RouteTable` is compiled once per configuration from the ``crds`` objects:

- a request's ``model`` selects the route whose ``modelName`` equals it, or the route that lists it
  in ``loraAdapters`` (then the request targets that LoRA adapter and its model is never rewritten);
- the route's rules are tried in order; the first rule whose ``match`` holds wins (all listed
  headers must match; the URI must match when given; a rule without ``match`` matches everything);
- one target of the rule is drawn by weight (weights unset = equal shares; weight 0 = never);
- when the chosen ModelServer sets ``model``, the request's ``model`` is rewritten to it.

When two routes claim the same model name (or LoRA adapter), the route that served it first keeps
it (:mod:`fleet.claims`: creation time, then the route that held it in the previous configuration,
then namespace/name); every loser is reported by :attr:`RouteTable.conflicts` and
:attr:`RouteTable.lost`. A target naming a ModelServer that does not exist is reported by
:attr:`RouteTable.missing_servers`; such a request is answered 503.

``GET /v1/models`` (:meth:`RouteTable.model_names`) lists a name only when a ready pod can serve
it: one of its route's targets is a ModelServer with a ready pod (``ready_server``, asked at each
call, since readiness changes between configurations).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from random import Random

from crds.common import StringMatch
from crds.networking import ModelRoute, RouteRule
from extproc.errors import GatewayError, model_not_found, no_rule_matched
from fleet.claims import Claim, winners
from fleet.config import object_key

__all__ = [
    "CompiledRoute",
    "CompiledRule",
    "LostClaim",
    "RouteDecision",
    "RouteTable",
    "StringMatcher",
    "object_key",
]


_DECISIONS_KEPT = 65536


@dataclass(slots=True, frozen=True)
class StringMatcher:
    """Exactly one of exact / prefix / regex (full match), compiled."""

    kind: str  # "exact" | "prefix" | "regex"
    value: str
    pattern: re.Pattern[str] | None = None

    @classmethod
    def from_crd(cls, match: StringMatch) -> StringMatcher:
        if match.exact is not None:
            return cls("exact", match.exact)
        if match.prefix is not None:
            return cls("prefix", match.prefix)
        if match.regex is not None:
            return cls("regex", match.regex, re.compile(match.regex))
        raise ValueError("a StringMatch needs one of exact, prefix or regex")

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.kind == "exact":
            return value == self.value
        if self.kind == "prefix":
            return value.startswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(value) is not None


@dataclass(slots=True, frozen=True)
class CompiledRule:
    name: str
    headers: tuple[tuple[str, StringMatcher], ...]  # header names lower-cased
    uri: StringMatcher | None
    servers: tuple[str, ...]  # ModelServer keys (namespace/name)
    cumulative: tuple[int, ...]  # running sum of weights, for a weighted draw
    total: int

    def matches(self, headers: Mapping[str, str], path: str) -> bool:
        if self.uri is not None and not self.uri.matches(path):
            return False
        if not self.headers:
            return True
        return all(m.matches(headers.get(name)) for name, m in self.headers)

    def draw(self, rng: Random) -> str:
        if len(self.servers) == 1:
            return self.servers[0]
        point = rng.randrange(self.total)
        return self.servers[bisect.bisect_right(self.cumulative, point)]


@dataclass(slots=True, frozen=True)
class CompiledRoute:
    key: str
    name: str
    model_name: str | None
    lora_adapters: tuple[str, ...]
    rules: tuple[CompiledRule, ...]


@dataclass(slots=True, frozen=True)
class RouteDecision:
    route: str  # ModelRoute name
    rule: str  # rule name (or rule-<index>)
    server_key: str  # namespace/name of the ModelServer
    server: str  # ModelServer name
    lora: str | None  # LoRA adapter the request targets
    upstream_model: str  # the model name the pod will see (after rewrite)
    rewritten: bool  # True when the body's model must change


def _compile_rule(route_ns: str, index: int, rule: RouteRule) -> CompiledRule | None:
    name = rule.name or f"rule-{index}"
    match = rule.match
    headers: list[tuple[str, StringMatcher]] = []
    uri: StringMatcher | None = None
    if match is not None:
        for header, sm in (match.headers or {}).items():
            headers.append((header.lower(), StringMatcher.from_crd(sm)))
        if match.uri is not None:
            uri = StringMatcher.from_crd(match.uri)
    servers: list[str] = []
    cumulative: list[int] = []
    total = 0
    for target in rule.targets:
        weight = 1 if target.weight is None else target.weight
        if weight <= 0:
            continue
        total += weight
        servers.append(f"{route_ns}/{target.model_server_name}")
        cumulative.append(total)
    if total == 0:
        return None
    return CompiledRule(name, tuple(headers), uri, tuple(servers), tuple(cumulative), total)


@dataclass(slots=True, frozen=True)
class LostClaim:
    """A name a route claims but another route serves."""

    name: str  # model name or LoRA adapter
    served_by: str  # namespace/name of the route that serves it


def _keys(index: Mapping[str, CompiledRoute]) -> dict[str, str]:
    return {name: route.key for name, route in index.items()}


class RouteTable:
    """Route lookup for one configuration; built once, then read-only."""

    def __init__(
        self,
        routes: Iterable[ModelRoute],
        server_models: Mapping[str, str | None],
        *,
        previous: RouteTable | None = None,
        ready_server: Callable[[str], bool] | None = None,
    ) -> None:
        """``server_models`` maps every known ModelServer key to its ``spec.model`` (or None);
        ``previous``: the table of the previous configuration (its routes keep the names they
        served when their rank otherwise ties); ``ready_server(key)``: the ModelServer has a
        ready pod now (None: every ModelServer that exists counts as ready)."""
        self.routes: list[CompiledRoute] = []
        self.by_model: dict[str, CompiledRoute] = {}
        self.by_lora: dict[str, CompiledRoute] = {}
        self.conflicts: list[str] = []
        self.lost: dict[str, list[LostClaim]] = {}  # route key -> the names it does not serve
        self.missing_servers: dict[str, list[str]] = {}  # route key -> ModelServer keys
        self.server_models = dict(server_models)
        self.ready_server = ready_server or self.server_models.__contains__
        # decisions are immutable and few (rule x target x model name): built once each
        self._decisions: dict[tuple[int, str, str], RouteDecision] = {}
        model_claims: list[Claim] = []
        lora_claims: list[Claim] = []
        for route in routes:
            key = object_key(route)
            namespace = key.split("/", 1)[0]
            spec = route.spec
            rules = tuple(
                r
                for r in (_compile_rule(namespace, i, rule) for i, rule in enumerate(spec.rules))
                if r is not None
            )
            compiled = CompiledRoute(
                key=key,
                name=route.metadata.name or "",
                model_name=spec.model_name or None,
                lora_adapters=tuple(spec.lora_adapters or ()),
                rules=rules,
            )
            self.routes.append(compiled)
            created = route.metadata.creation_timestamp
            if compiled.model_name:
                model_claims.append(Claim(compiled.model_name, key, created))
            lora_claims.extend(Claim(lora, key, created) for lora in compiled.lora_adapters)
            missing = [s for rule in rules for s in rule.servers if s not in self.server_models]
            if missing:
                self.missing_servers[key] = sorted(set(missing))
        by_key = {r.key: r for r in self.routes}
        old_models = previous.by_model if previous is not None else {}
        old_loras = previous.by_lora if previous is not None else {}
        self._claim(self.by_model, model_claims, _keys(old_models), by_key)
        self._claim(self.by_lora, lora_claims, _keys(old_loras), by_key)

    def _claim(
        self,
        index: dict[str, CompiledRoute],
        claims: list[Claim],
        held_by: Mapping[str, str],
        by_key: Mapping[str, CompiledRoute],
    ) -> None:
        won = winners(claims, held_by)
        for name, key in won.items():
            index[name] = by_key[key]
        for claim in claims:
            winner = won[claim.name]
            if winner == claim.route:
                continue
            self.lost.setdefault(claim.route, []).append(LostClaim(claim.name, winner))
            self.conflicts.append(
                f"ModelRoute '{claim.route}' also claims '{claim.name}', which ModelRoute "
                f"'{winner}' serves; '{winner}' keeps it (it was created or applied first)"
            )

    def missing_server_warnings(self) -> list[str]:
        return [
            f"ModelRoute '{key}' targets ModelServer "
            + ", ".join(f"'{s.split('/', 1)[1]}'" for s in servers)
            + f" that does not exist in namespace '{key.split('/', 1)[0]}'; requests sent "
            "there are answered 503"
            for key, servers in self.missing_servers.items()
        ]

    def servable(self, route: CompiledRoute) -> bool:
        """A ready pod can serve the route: one of its targets is a ModelServer with one."""
        return any(self.ready_server(s) for rule in route.rules for s in rule.servers)

    def model_names(self) -> list[str]:
        """Every model name and LoRA adapter a caller may ask for and a ready pod can serve
        (``GET /v1/models``)."""
        return sorted(
            name
            for index in (self.by_model, self.by_lora)
            for name, route in index.items()
            if self.servable(route)
        )

    def lookup(self, model: str) -> tuple[CompiledRoute, str | None]:
        route = self.by_model.get(model)
        if route is not None:
            return route, None
        route = self.by_lora.get(model)
        if route is not None:
            return route, model
        raise model_not_found(model)

    def decide(
        self, model: str, headers: Mapping[str, str], path: str, rng: Random
    ) -> RouteDecision:
        """The ModelServer for a request; raises 404 GatewayErrors for unknown models or no rule."""
        route, lora = self.lookup(model)
        for rule in route.rules:
            if rule.matches(headers, path):
                server_key = rule.draw(rng)
                break
        else:
            raise no_rule_matched(route.name, model)
        key = (id(rule), server_key, model)
        found = self._decisions.get(key)
        if found is not None:
            return found
        if server_key not in self.server_models:
            raise GatewayError(
                503,
                f"ModelRoute '{route.name}' sends this request to ModelServer "
                f"'{server_key.split('/', 1)[1]}', which does not exist",
                error_type="service_unavailable",
                code="model_server_not_found",
            )
        upstream = self.server_models[server_key]
        rewritten = lora is None and bool(upstream) and upstream != model
        decision = RouteDecision(
            route=route.name,
            rule=rule.name,
            server_key=server_key,
            server=server_key.split("/", 1)[1],
            lora=lora,
            upstream_model=upstream if rewritten and upstream else model,
            rewritten=rewritten,
        )
        if len(self._decisions) < _DECISIONS_KEPT:  # model is a name this table serves: bounded
            self._decisions[key] = decision
        return decision
