"""Engine selection rules: CEL expressions over model and GPU facts, loaded from a YAML file the
operator can replace (pure: the ``cel`` package evaluates, nothing is fetched)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cel
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from console.base import ApiType
from console.catalog import InvalidDataFile, read_yaml, validation_message

__all__ = ["EngineRule", "EngineRules", "EngineSpec", "MemoryPolicy", "Verdict", "load_rules"]


class EngineRule(BaseModel):
    """A CEL expression that must be true for the engine to qualify."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str = Field(min_length=1, description="CEL expression (bool).")
    message: str = Field(default="", description="Why the engine is out when the rule is false.")


class EngineSpec(ApiType):
    """An engine the console can deploy and what it supports."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1, description="Engine name.")
    backend_type: str = Field(alias="backendType", description="Model backend type it deploys.")
    description: str = Field(default="")
    features: list[str] = Field(default_factory=list)
    requires: list[EngineRule] = Field(default_factory=list)
    score: str = Field(default="0", description="CEL expression (a number): higher first.")
    pods: int = Field(
        default=1, ge=1, description="Engine pods per replica, each with the shape's GPUs."
    )


class MemoryPolicy(BaseModel):
    """How much of each GPU the engine may use and what it needs besides weights and KV cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    overhead_gib_per_gpu: float = Field(default=2.0, ge=0)


class _RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)
    engines: list[EngineSpec] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reasons: list[str]  # the messages of the rules that failed
    score: float


class EngineRules:
    """The engines and their compiled rules."""

    def __init__(self, memory: MemoryPolicy, engines: list[EngineSpec], source: str) -> None:
        self.memory = memory
        self.engines = engines
        self.source = source
        self._programs: dict[str, Any] = {}
        for i, engine in enumerate(engines):
            exprs = [(f"requires[{j}]", r.rule) for j, r in enumerate(engine.requires)]
            for where, expr in [*exprs, ("score", engine.score)]:
                try:
                    self._programs[expr] = cel.compile(expr)
                except Exception as exc:  # the cel package raises ValueError / RuntimeError
                    raise InvalidDataFile(
                        f"{source}: engines[{i}] ({engine.name}).{where}: invalid CEL {expr!r}:"
                        f" {exc}"
                    ) from None

    def evaluate(self, engine: EngineSpec, facts: Mapping[str, Any]) -> Verdict:
        """Run the engine's rules over ``facts`` (model, gpu, shape, want)."""
        reasons = []
        for rule in engine.requires:
            result = self._run(engine, rule.rule, facts)
            if result is not True:
                reasons.append(rule.message or f"rule {rule.rule!r} is false")
        score = self._run(engine, engine.score, facts)
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise InvalidDataFile(
                f"{self.source}: engine {engine.name}: score {engine.score!r} is not a number"
                f" (got {score!r})"
            )
        return Verdict(not reasons, reasons, float(score))

    def _run(self, engine: EngineSpec, expr: str, facts: Mapping[str, Any]) -> Any:
        try:
            return self._programs[expr].execute(dict(facts))
        except Exception as exc:  # an unknown variable or a type mismatch in the operator's rule
            raise InvalidDataFile(
                f"{self.source}: engine {engine.name}: rule {expr!r} failed: {exc}"
            ) from None

    def engine_for_type(self, backend_type: str) -> EngineSpec | None:
        return next((e for e in self.engines if e.backend_type == backend_type), None)


def load_rules(path: Path | None = None) -> EngineRules:
    """The packaged rule file, or the operator's at ``path``; every CEL expression is compiled
    now, so a bad rule fails at start with the engine and rule named."""
    source, doc = read_yaml(path, "rules.yaml")
    try:
        parsed = _RuleFile.model_validate(doc)
    except ValidationError as exc:
        raise InvalidDataFile(validation_message(source, exc)) from None
    return EngineRules(parsed.memory, parsed.engines, source)
