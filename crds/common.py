"""Shared building blocks of the MatrixInfer API: the base model, cross-field rules, metadata,
conditions, string matches, durations and int-or-percent values.

Every API model derives from :class:`ApiModel`: snake_case attributes, camelCase JSON names,
unknown fields rejected, and ``cel_rules`` — cross-field rules written once as a CEL expression
(for the CRD's ``x-kubernetes-validations``) and once as a Python check (for Python callers), with
one message shared by both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

__all__ = [
    "DNS1035_LABEL",
    "DURATION_PATTERN",
    "PERCENT_PATTERN",
    "ApiModel",
    "CelRule",
    "Condition",
    "Duration",
    "EnvVars",
    "IntOrPercent",
    "KubeSchema",
    "ObjectMeta",
    "PodTemplate",
    "ResourceRequirements",
    "SecretKeyRef",
    "StatusBase",
    "StringMatch",
    "UniqueNames",
    "parse_duration",
    "resolve_int_or_percent",
    "unique",
]

RULE_ERROR_TYPE = "matrixinfer_rule"

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"
PERCENT_PATTERN = r"^(100|[1-9]?[0-9])%$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)")
_DURATION_RE = re.compile(DURATION_PATTERN)
_PERCENT_RE = re.compile(PERCENT_PATTERN)


# --------------------------------------------------------------------------------------------
# cross-field rules


@dataclass(frozen=True, slots=True)
class CelRule:
    """One cross-field rule: the CEL text the API server evaluates (``self`` is the object the
    rule sits on), the Python mirror of it, and the message both give.

    ``field_path`` (e.g. ``".targets"``) names the field the error is reported on, relative to
    the object; it becomes the rule's ``fieldPath`` in the CRD.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str = ""

    def as_k8s(self) -> dict[str, str]:
        """The rule as an ``x-kubernetes-validations`` entry."""
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


class ApiModel(BaseModel):
    """Base of every MatrixInfer API model."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=False,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if not rule.check(self):
                raise PydanticCustomError(
                    RULE_ERROR_TYPE, rule.message, {"field_path": rule.field_path}
                )
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        if cls.cel_rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [r.as_k8s() for r in cls.cel_rules]
        return schema


def unique(values: list[Any] | None) -> bool:
    """True when no value repeats (None counts as empty)."""
    if not values:
        return True
    return len(set(values)) == len(values)


def _unique_list(values: list[str]) -> list[str]:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise PydanticCustomError("duplicate", "duplicate value {value}", {"value": repr(v)})
        seen.add(v)
    return values


UniqueNames = Annotated[
    list[str],
    AfterValidator(_unique_list),
    Field(json_schema_extra={"x-kubernetes-list-type": "set"}),
]
"""A list of strings without repeats (``x-kubernetes-list-type: set``)."""


def KubeSchema(definition: str) -> dict[str, Any]:
    """json_schema_extra marking a field whose CRD schema is the upstream Kubernetes type
    ``definition`` (e.g. ``io.k8s.api.core.v1.PodTemplateSpec``); the generator inlines it."""
    return {"x-matrixinfer-k8s": definition}


# --------------------------------------------------------------------------------------------
# durations and int-or-percent


def _check_duration(value: str) -> str:
    if not _DURATION_RE.match(value):
        raise PydanticCustomError(
            "duration",
            'invalid duration {value}: use a number and a unit, e.g. "500ms", "30s", "5m", "1h"',
            {"value": repr(value)},
        )
    return value


Duration = Annotated[
    str,
    AfterValidator(_check_duration),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "maxLength": 32}),
]
"""A Kubernetes-style duration string such as ``"500ms"``, ``"30s"``, ``"5m"`` or ``"1h30m"``."""


def parse_duration(text: str) -> float:
    """Seconds in a duration string (``"1h30m"`` → 5400.0); ValueError names the bad value."""
    if not isinstance(text, str) or not _DURATION_RE.match(text):
        raise ValueError(
            f'invalid duration {text!r}: use a number and a unit, e.g. "500ms", "30s", "5m", "1h"'
        )
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def _check_int_or_percent(value: int | str) -> int | str:
    if isinstance(value, bool):
        raise PydanticCustomError("int_or_percent", "must be an integer or a percentage", {})
    if isinstance(value, int):
        if value < 0:
            raise PydanticCustomError(
                "int_or_percent", "must not be negative (got {value})", {"value": value}
            )
        return value
    if not _PERCENT_RE.match(value):
        raise PydanticCustomError(
            "int_or_percent",
            'must be an integer or a percentage between "0%" and "100%" (got {value})',
            {"value": repr(value)},
        )
    return value


IntOrPercent = Annotated[
    int | str,
    AfterValidator(_check_int_or_percent),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": PERCENT_PATTERN,
            "minimum": 0,
        }
    ),
]
"""A non-negative integer or a percentage string such as ``"25%"``."""


def resolve_int_or_percent(value: int | str, total: int, *, round_up: bool) -> int:
    """The absolute number ``value`` stands for out of ``total``.

    The rule is the one :data:`IntOrPercent` validates and the CRD schema enforces (an integer
    ``minimum: 0``, a string ``pattern`` of :data:`PERCENT_PATTERN`):

    - an integer >= 0 is returned as it is (``3`` → 3);
    - a string must be a percentage from ``"0%"`` to ``"100%"`` and is taken of ``total``,
      rounded up or down (``"25%"`` of 10 is 3 rounding up, 2 rounding down);
    - anything else raises ValueError naming the value: a negative integer, a bool, and a string
      of digits without ``%`` (``"3"``), which the API server rejects too.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid int-or-percent value {value!r}: use an integer or 'NN%'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid int-or-percent value {value!r}: must not be negative")
        return value
    if not _PERCENT_RE.match(value):
        raise ValueError(
            f'invalid int-or-percent value {value!r}: a string must be a percentage "0%" to "100%"'
        )
    pct = int(value[:-1])
    whole, rest = divmod(pct * total, 100)
    return whole + (1 if round_up and rest else 0)


# --------------------------------------------------------------------------------------------
# metadata, conditions, references


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata MatrixInfer reads; other keys are kept as they are."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = Field(
        default=None, description="Name of the object, unique in its namespace."
    )
    namespace: str | None = Field(default=None, description="Namespace of the object.")
    labels: dict[str, str] | None = Field(default=None, description="Labels of the object.")
    annotations: dict[str, str] | None = Field(
        default=None, description="Annotations of the object."
    )
    generation: int | None = Field(
        default=None, description="Sequence number of the desired state, set by the API server."
    )
    resource_version: str | None = Field(
        default=None, description="Opaque version of the object, set by the API server."
    )
    uid: str | None = Field(default=None, description="Unique id of the object, set by the server.")
    creation_timestamp: str | None = Field(
        default=None,
        description="When the object was created (RFC 3339, UTC), set by the API server.",
    )


class Condition(ApiModel):
    """One aspect of the object's state (the standard Kubernetes condition shape)."""

    type: str = Field(
        description="Type of condition in CamelCase, e.g. Accepted, Available, Progressing.",
        min_length=1,
        max_length=316,
    )
    status: Literal["True", "False", "Unknown"] = Field(description="Status of the condition.")
    reason: str | None = Field(
        default=None,
        description="Machine-readable CamelCase reason for the last transition.",
        max_length=1024,
    )
    message: str | None = Field(
        default=None,
        description="Human-readable details about the last transition.",
        max_length=32768,
    )
    last_transition_time: str | None = Field(
        default=None,
        description="When the condition last changed status (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        default=None,
        description="metadata.generation the condition was set for.",
        ge=0,
    )


class StatusBase(ApiModel):
    """Fields every MatrixInfer status carries."""

    observed_generation: int | None = Field(
        default=None,
        description="The metadata.generation the controller last acted on.",
        ge=0,
    )
    conditions: list[Condition] | None = Field(
        default=None,
        description="Current state of the object, one entry per condition type.",
        max_length=16,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


def _exactly_one(*values: object) -> bool:
    return sum(v is not None for v in values) == 1


class StringMatch(ApiModel):
    """How a string (header value, URI path) is compared: exactly one of exact, prefix, regex."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="(has(self.exact) ? 1 : 0) + (has(self.prefix) ? 1 : 0)"
            " + (has(self.regex) ? 1 : 0) == 1",
            message="exactly one of exact, prefix or regex",
            check=lambda s: _exactly_one(s.exact, s.prefix, s.regex),
        ),
    )

    exact: str | None = Field(
        default=None, description="The value equals this string.", max_length=1024
    )
    prefix: str | None = Field(
        default=None, description="The value starts with this string.", max_length=1024
    )
    regex: str | None = Field(
        default=None,
        description="The value matches this regular expression (RE2 syntax, unanchored).",
        max_length=1024,
    )

    @model_validator(mode="after")
    def _regex_compiles(self) -> Self:
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise PydanticCustomError(
                    "regex",
                    "invalid regex {value}: {error}",
                    {"value": repr(self.regex), "error": str(exc)},
                ) from None
        return self

    def matches(self, value: str) -> bool:
        """True when ``value`` satisfies this match."""
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.regex is not None:
            return re.search(self.regex, value) is not None
        return False


class SecretKeyRef(ApiModel):
    """A key of a Secret in the object's namespace."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253)
    key: str = Field(default="password", description="Key inside the Secret.", max_length=253)


# --------------------------------------------------------------------------------------------
# embedded Kubernetes types (validated in full by the CRD schema; lightly here)


def _check_pod_template(value: dict[str, Any]) -> dict[str, Any]:
    extra = sorted(set(value) - {"metadata", "spec"})
    if extra:
        raise PydanticCustomError(
            "pod_template", "unknown pod template field(s) {fields}", {"fields": ", ".join(extra)}
        )
    spec = value.get("spec")
    if not isinstance(spec, dict):
        raise PydanticCustomError("pod_template", "a pod template needs a spec", {})
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise PydanticCustomError(
            "pod_template", "a pod template needs spec.containers with at least one container", {}
        )
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise PydanticCustomError(
                "pod_template", "spec.containers[{index}] needs a name", {"index": i}
            )
    return value


PodTemplate = Annotated[
    dict[str, Any],
    AfterValidator(_check_pod_template),
    Field(json_schema_extra=KubeSchema("io.k8s.api.core.v1.PodTemplateSpec")),
]
"""A Kubernetes PodTemplateSpec as a plain dict. Python checks only its outline (spec.containers,
each with a name); the CRD schema is the full upstream PodTemplateSpec schema."""

EnvVars = Annotated[
    list[dict[str, Any]],
    Field(json_schema_extra={"items": KubeSchema("io.k8s.api.core.v1.EnvVar")}),
]
"""A list of Kubernetes EnvVar objects (plain dicts; the CRD schema is upstream's)."""

ResourceRequirements = Annotated[
    dict[str, Any],
    Field(json_schema_extra=KubeSchema("io.k8s.api.core.v1.ResourceRequirements")),
]
"""Kubernetes ResourceRequirements (limits/requests) as a plain dict."""
