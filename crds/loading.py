"""Turning YAML/dicts into API objects and back, with errors that name the source, the kind, the
object and the field."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from crds.common import RULE_ERROR_TYPE
from crds.networking import ModelRoute, ModelServer
from crds.registry import AutoscalingPolicy, Model
from crds.workload import ModelInfer

__all__ = [
    "KINDS",
    "InvalidObject",
    "Resource",
    "dump_documents",
    "load_documents",
    "parse_object",
    "to_dict",
]

Resource = ModelRoute | ModelServer | ModelInfer | Model | AutoscalingPolicy

KINDS: dict[str, type[Resource]] = {
    "ModelRoute": ModelRoute,
    "ModelServer": ModelServer,
    "ModelInfer": ModelInfer,
    "Model": Model,
    "AutoscalingPolicy": AutoscalingPolicy,
}
"""Kind name → model class, for every MatrixInfer kind."""

_BY_GVK: dict[tuple[str, str], type[Resource]] = {
    (str(cls.model_fields["api_version"].default), kind): cls for kind, cls in KINDS.items()
}

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# loc entries pydantic adds for union members and wrapped validators, not field names
_TAG = re.compile(r"^(int|str|float|bool|none|.*\[.*\])$")


class InvalidObject(ValueError):
    """A document is not a valid MatrixInfer object.

    ``str(exc)`` reads ``<source>: <Kind> "<name>": <field path>: <what is wrong>`` (several
    problems are joined with "; "); ``errors`` holds the (field path, message) pairs.
    """

    def __init__(
        self,
        source: str,
        kind: str | None,
        name: str | None,
        errors: Sequence[tuple[str, str]],
    ) -> None:
        self.source = source
        self.kind = kind
        self.name = name
        self.errors = list(errors)
        who = kind or "object"
        if name:
            who += f' "{name}"'
        parts = [f"{path}: {msg}" if path else msg for path, msg in self.errors]
        super().__init__(f"{source}: {who}: " + "; ".join(parts))


def _path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _TAG.match(part):
            continue
        elif _IDENT.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part}]"
    return out


def _describe(err: Any) -> tuple[str, str]:
    path = _path(err["loc"])
    etype = err["type"]
    if etype == RULE_ERROR_TYPE:
        sub = str((err.get("ctx") or {}).get("field_path", "")).lstrip(".")
        if sub:
            path = f"{path}.{sub}" if path else sub
        return path, str(err["msg"])
    if etype == "missing":
        return path, "required field is missing"
    if etype == "extra_forbidden":
        return path, "unknown field"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = err.get("input")
    if isinstance(value, str | int | float | bool) and "got" not in msg:
        msg += f" (got {value!r})"
    return path, msg


def parse_object(doc: Any, source: str = "<object>") -> Resource:
    """Validate one document (a dict) and return the model of its kind.

    Raises InvalidObject for an unknown apiVersion/kind or any invalid field."""
    if not isinstance(doc, dict):
        raise InvalidObject(source, None, None, [("", "a document must be a mapping")])
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    name = name if isinstance(name, str) else None
    cls = _BY_GVK.get((str(api_version), str(kind)))
    if cls is None:
        known = ", ".join(f"{gv}/{k}" for gv, k in sorted(_BY_GVK))
        raise InvalidObject(
            source,
            str(kind) if kind else None,
            name,
            [("", f"unknown apiVersion/kind {api_version}/{kind} (known: {known})")],
        )
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        raise InvalidObject(source, str(kind), name, errors) from None


def load_documents(text: str, source: str = "<string>") -> list[Resource]:
    """Parse multi-document YAML into API objects (empty documents are skipped)."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InvalidObject(source, None, None, [("", f"invalid YAML: {exc}")]) from None
    return [parse_object(d, source) for d in docs if d is not None]


def to_dict(obj: Resource, *, exclude_unset: bool = False) -> dict[str, Any]:
    """The object as Kubernetes JSON (camelCase, nulls left out). With ``exclude_unset`` only
    what was given is written (defaults are not filled in)."""
    out: dict[str, Any] = obj.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude_unset=exclude_unset
    )
    if exclude_unset:
        # apiVersion and kind identify the object even when they came from the defaults
        out = {"apiVersion": obj.api_version, "kind": obj.kind, **out}
    return out


def dump_documents(objs: Iterable[Resource], *, exclude_unset: bool = False) -> str:
    """The objects as multi-document YAML."""
    return yaml.safe_dump_all(
        [to_dict(o, exclude_unset=exclude_unset) for o in objs], sort_keys=False
    )
