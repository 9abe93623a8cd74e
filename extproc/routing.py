"""ModelRoute semantics: which ModelServer serves a request. Pure (no I/O, injected randomness).

A :class:`RouteTable` is compiled once per configuration from the ``crds`` objects:

- a request's ``model`` selects the route whose ``modelName`` equals it, or the route that lists it
  in ``loraAdapters`` (then the request targets that LoRA adapter and its model is never rewritten);
- the route's rules are tried in order; the first rule whose ``match`` holds wins (all listed
  headers must match; the URI must match when given; a rule without ``match`` matches everything);
- one target of the rule is drawn by weight (weights unset = equal shares; weight 0 = never);
- when the chosen ModelServer sets ``model``, the request's ``model`` is rewritten to it.

When two routes claim the same model name, the first one (in configuration order) wins and the
conflict is reported by :attr:`RouteTable.conflicts`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from random import Random
from typing import Any

from extproc.errors import GatewayError, model_not_found, no_rule_matched
from fleet.config import object_key

__all__ = [
    "CompiledRoute",
    "CompiledRule",
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
    def from_crd(cls, match: Any) -> StringMatcher:
        exact = getattr(match, "exact", None)
        prefix = getattr(match, "prefix", None)
        regex = getattr(match, "regex", None)
        if exact is not None:
            return cls("exact", exact)
        if prefix is not None:
            return cls("prefix", prefix)
        if regex is not None:
            return cls("regex", regex, re.compile(regex))
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


def _compile_rule(route_ns: str, index: int, rule: Any) -> CompiledRule | None:
    name = getattr(rule, "name", None) or f"rule-{index}"
    match = getattr(rule, "match", None)
    headers: list[tuple[str, StringMatcher]] = []
    uri: StringMatcher | None = None
    if match is not None:
        for header, sm in (getattr(match, "headers", None) or {}).items():
            headers.append((header.lower(), StringMatcher.from_crd(sm)))
        if getattr(match, "uri", None) is not None:
            uri = StringMatcher.from_crd(match.uri)
    servers: list[str] = []
    cumulative: list[int] = []
    total = 0
    for target in rule.targets:
        weight = target.weight
        weight = 1 if weight is None else int(weight)
        if weight <= 0:
            continue
        total += weight
        servers.append(f"{route_ns}/{target.model_server_name}")
        cumulative.append(total)
    if total == 0:
        return None
    return CompiledRule(name, tuple(headers), uri, tuple(servers), tuple(cumulative), total)


class RouteTable:
    """Route lookup for one configuration; built once, then read-only."""

    def __init__(self, routes: Iterable[Any], server_models: Mapping[str, str | None]) -> None:
        """``server_models`` maps every known ModelServer key to its ``spec.model`` (or None)."""
        self.routes: list[CompiledRoute] = []
        self.by_model: dict[str, CompiledRoute] = {}
        self.by_lora: dict[str, CompiledRoute] = {}
        self.conflicts: list[str] = []
        self.server_models = dict(server_models)
        # decisions are immutable and few (rule x target x model name): built once each
        self._decisions: dict[tuple[int, str, str], RouteDecision] = {}
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
                name=route.metadata.name,
                model_name=spec.model_name or None,
                lora_adapters=tuple(spec.lora_adapters or ()),
                rules=rules,
            )
            self.routes.append(compiled)
            if compiled.model_name:
                self._claim(self.by_model, compiled.model_name, compiled)
            for lora in compiled.lora_adapters:
                self._claim(self.by_lora, lora, compiled)

    def _claim(self, index: dict[str, CompiledRoute], name: str, route: CompiledRoute) -> None:
        holder = index.get(name)
        if holder is None:
            index[name] = route
        else:
            self.conflicts.append(
                f"ModelRoute '{route.key}' also claims '{name}', already served by "
                f"ModelRoute '{holder.key}'; the first one wins"
            )

    def model_names(self) -> list[str]:
        """Every model name and LoRA adapter a caller may ask for (``GET /v1/models``)."""
        return sorted({*self.by_model, *self.by_lora})

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
