"""What the Kubernetes API server does with a CRD schema, done in Python for the tests: defaulting,
schema validation (jsonschema) with strict field validation, and CEL rules (the
common-expression-language package) with ``self`` bound to the node each rule sits on."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cel
import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


@cache
def crd_documents() -> dict[str, dict[str, Any]]:
    """Kind → the committed CRD document."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[doc["spec"]["names"]["kind"]] = doc
    return out


def crd_schema(kind: str) -> dict[str, Any]:
    return crd_documents()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (``.prop``, ``[]`` for items, ``{}`` for map values)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")
    for i, sub in enumerate(schema.get("anyOf", [])):
        yield from walk(sub, f"{path}<anyOf{i}>")


# --------------------------------------------------------------------------------------------
# schema validation


def to_jsonschema(node: dict[str, Any], *, root: bool = True) -> dict[str, Any]:
    """A CRD structural schema as JSON Schema, with unknown fields rejected (kubectl's default
    strict field validation) except where the schema preserves them."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: to_jsonschema(v, root=False) for k, v in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_jsonschema(value, root=False)
        elif key == "anyOf":
            out[key] = [to_jsonschema(v, root=False) for v in value]
        elif key == "exclusiveMinimum" and value is True:
            out[key] = node["minimum"]
        elif key == "exclusiveMaximum" and value is True:
            out[key] = node["maximum"]
        elif key == "nullable" and value:
            out["type"] = [node["type"], "null"]
        elif key.startswith("x-kubernetes-"):
            continue
        else:
            out.setdefault(key, value)
    if (
        out.get("exclusiveMinimum") is not None
        and "minimum" in out
        and node.get("exclusiveMinimum")
    ):
        del out["minimum"]
    if (
        out.get("exclusiveMaximum") is not None
        and "maximum" in out
        and node.get("exclusiveMaximum")
    ):
        del out["maximum"]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if root:
        out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return out


@cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(to_jsonschema(crd_schema(kind)))


def schema_errors(kind: str, obj: dict[str, Any]) -> list[str]:
    """jsonschema's complaints about ``obj``, each prefixed with its field path."""
    errs = []
    for e in sorted(_validator(kind).iter_errors(obj), key=lambda e: list(map(str, e.path))):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        errs.append(f"{path.lstrip('.')}: {e.message}")
    return errs


# --------------------------------------------------------------------------------------------
# defaulting


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """A copy of ``value`` with the schema's defaults filled in, the way the API server does
    (absent properties of present objects; recursively)."""
    value = copy.deepcopy(value)
    _default(schema, value)
    return value


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for v in value.values():
                _default(schema["additionalProperties"], v)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            _default(schema["items"], v)


# --------------------------------------------------------------------------------------------
# CEL


@dataclass(frozen=True)
class CelResult:
    path: str  # where the error is reported (node path + fieldPath)
    schema_path: str  # the schema node the rule sits on (".spec.rules[]")
    rule: str
    message: str
    ok: bool


@cache
def compile_rule(rule: str) -> cel.Program:
    return cel.compile(rule)


def evaluate_rules(
    schema: dict[str, Any], value: Any, path: str = "", schema_path: str = ""
) -> list[CelResult]:
    """Evaluate every x-kubernetes-validations rule that applies to ``value`` (already
    defaulted), with ``self`` bound to the node the rule sits on."""
    results: list[CelResult] = []
    for rule in schema.get("x-kubernetes-validations", []):
        ok = compile_rule(rule["rule"]).execute({"self": value})
        if not isinstance(ok, bool):
            raise TypeError(f"rule {rule['rule']!r} returned {ok!r}, not a bool")
        where = path + rule.get("fieldPath", "")
        results.append(CelResult(where.lstrip("."), schema_path, rule["rule"], rule["message"], ok))
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                results += evaluate_rules(
                    sub, value[name], f"{path}.{name}", f"{schema_path}.{name}"
                )
        if isinstance(schema.get("additionalProperties"), dict):
            for k, v in value.items():
                results += evaluate_rules(
                    schema["additionalProperties"], v, f"{path}[{k}]", f"{schema_path}{{}}"
                )
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            results += evaluate_rules(schema["items"], v, f"{path}[{i}]", f"{schema_path}[]")
    return results


def cel_errors(kind: str, obj: dict[str, Any]) -> list[str]:
    """``path: message`` for every failing CEL rule of ``obj`` (defaults applied first)."""
    schema = crd_schema(kind)
    return [
        f"{r.path}: {r.message}"
        for r in evaluate_rules(schema, apply_defaults(schema, obj))
        if not r.ok
    ]


def api_server_errors(obj: dict[str, Any]) -> list[str]:
    """Everything the API server would reject ``obj`` for: schema, then CEL (as it does, CEL only
    runs on objects that pass the schema)."""
    kind = obj.get("kind")
    if kind not in crd_documents():
        return [f"no CRD for kind {kind}"]
    errs = schema_errors(kind, obj)
    if errs:
        return errs
    return cel_errors(kind, obj)
