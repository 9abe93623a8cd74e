"""CRD generation: the pydantic models → apiextensions.k8s.io/v1 CustomResourceDefinitions.

The models' JSON schema is walked, $refs are inlined and the result is translated into the
structural subset Kubernetes accepts (every node typed, no $ref/anyOf/oneOf except the
int-or-string form, `additionalProperties` only for maps, boolean `exclusiveMinimum`). Fields
marked with ``x-matrixinfer-k8s`` get the real upstream Kubernetes schema (PodTemplateSpec,
EnvVar, ResourceRequirements) from the JSON schemas the ``kubernetes-validate`` package ships,
converted the same way. Output is deterministic: keys sorted, no YAML anchors.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from crds.common import ApiModel
from crds.networking import NETWORKING_GROUP, ModelRoute, ModelServer
from crds.registry import REGISTRY_GROUP, AutoscalingPolicy, Model
from crds.workload import WORKLOAD_GROUP, ModelInfer

__all__ = [
    "CRD_DIR",
    "KUBERNETES_SCHEMA_VERSION",
    "SPECS",
    "CrdSpec",
    "GenerationError",
    "build_crd",
    "check",
    "crd_schema",
    "render_all",
    "write_all",
]

CRD_DIR = Path(__file__).resolve().parent
KUBERNETES_SCHEMA_VERSION = "v1.33.0"
"""Upstream schema version embedded pod templates follow (oldest one kubernetes-validate ships;
fields newer clusters add are then pruned, never rejected by older ones)."""

VERSION = "v1alpha1"
CATEGORY = "matrixinfer"
MAX_UPSTREAM_DESCRIPTION = 240

_ALLOWED_KEYS = {
    "description",
    "type",
    "format",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "nullable",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
}
_FORMATS = {"int32", "int64", "float", "double", "byte", "date", "date-time", "password"}
_QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Upstream types whose fields keep their (shortened) descriptions in the CRDs. Deeper types
# (volume sources, probes, affinity terms...) go without: with two full pod templates in
# ModelInfer, describing every upstream field would put the CRD past 1 MB.
_DESCRIBED_TYPES = {
    "PodTemplateSpec",
    "PodSpec",
    "Container",
    "ObjectMeta",
    "EnvVar",
    "ResourceRequirements",
}
_EMBEDDED_META_FIELDS = ("annotations", "finalizers", "labels", "name", "namespace")


class GenerationError(RuntimeError):
    """The models use a construct the generator cannot express as a structural schema."""


# --------------------------------------------------------------------------------------------
# kinds


@dataclass(frozen=True)
class CrdSpec:
    """How one kind is published."""

    model: type[ApiModel]
    group: str
    plural: str
    short_names: tuple[str, ...]
    columns: tuple[dict[str, Any], ...]
    scale: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.model.__name__

    @property
    def name(self) -> str:
        return f"{self.plural}.{self.group}"

    @property
    def filename(self) -> str:
        return f"{self.group}_{self.plural}.yaml"


def _col(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    col: dict[str, Any] = {"name": name, "jsonPath": path, "type": type_}
    if priority:
        col["priority"] = priority
    return col


_AGE = _col("Age", ".metadata.creationTimestamp", "date")

SPECS: tuple[CrdSpec, ...] = (
    CrdSpec(
        ModelRoute,
        NETWORKING_GROUP,
        "modelroutes",
        ("mroute",),
        (
            _col("Model", ".spec.modelName"),
            _col("Accepted", '.status.conditions[?(@.type=="Accepted")].status'),
            _col("Refs", '.status.conditions[?(@.type=="ResolvedRefs")].status', priority=1),
            _AGE,
        ),
    ),
    CrdSpec(
        ModelServer,
        NETWORKING_GROUP,
        "modelservers",
        ("msrv",),
        (
            _col("Engine", ".spec.inferenceEngine"),
            _col("Model", ".spec.model"),
            _col("Ready", ".status.readyEndpoints", "integer"),
            _AGE,
        ),
    ),
    CrdSpec(
        ModelInfer,
        WORKLOAD_GROUP,
        "modelinfers",
        ("minfer",),
        (
            _col("Desired", ".spec.replicas", "integer"),
            _col("Ready", ".status.readyReplicas", "integer"),
            _col("Updated", ".status.updatedReplicas", "integer"),
            _col("Available", ".status.availableReplicas", "integer"),
            _col("Revision", ".status.updateRevision", priority=1),
            _AGE,
        ),
        scale=True,
    ),
    CrdSpec(
        Model,
        REGISTRY_GROUP,
        "models",
        ("mdl",),
        (
            _col("Backends", ".spec.backends[*].name"),
            _col("Active", '.status.conditions[?(@.type=="Active")].status'),
            _col("Ready", ".status.backends[*].readyReplicas", priority=1),
            _AGE,
        ),
    ),
    CrdSpec(
        AutoscalingPolicy,
        REGISTRY_GROUP,
        "autoscalingpolicies",
        ("asp",),
        (
            _col("Metrics", ".spec.metrics[*].name"),
            _col("Desired", ".status.targets[*].desiredReplicas"),
            _col("Mode", ".status.targets[*].mode"),
            _AGE,
        ),
    ),
)


# --------------------------------------------------------------------------------------------
# pydantic JSON schema → structural schema


def _finish(out: dict[str, Any], where: str) -> dict[str, Any]:
    """Common post-processing and checks for one converted node."""
    unknown = set(out) - _ALLOWED_KEYS
    if unknown:
        raise GenerationError(f"{where}: unsupported schema keywords {sorted(unknown)}")
    if "anyOf" in out and not out.get("x-kubernetes-int-or-string"):
        raise GenerationError(f"{where}: unions other than int-or-string are not structural")
    if (
        "type" not in out
        and not out.get("x-kubernetes-int-or-string")
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        raise GenerationError(f"{where}: node without a type")
    if "properties" in out and "additionalProperties" in out:
        raise GenerationError(f"{where}: both properties and additionalProperties")
    return out


class _ModelSchema:
    def __init__(self, root: dict[str, Any]) -> None:
        self.defs: dict[str, Any] = root.get("$defs", {})

    def convert(self, node: dict[str, Any], where: str) -> dict[str, Any]:
        node = dict(node)
        if "x-matrixinfer-k8s" in node:
            out = copy.deepcopy(upstream_schema(node["x-matrixinfer-k8s"]))
            if "description" in node:
                out["description"] = node["description"]
            return out
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            base = self.convert(self.defs[name], f"{where}<{name}>")
            rest = self.convert_keywords(node, where, partial=True)
            return _finish({**base, **rest}, where)
        if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
            if node.get("default", 0) is None:
                node.pop("default")
            if len(branches) != 1:
                raise GenerationError(f"{where}: unsupported union {branches}")
            return self.convert({**branches[0], **node}, where)
        return _finish(self.convert_keywords(node, where), where)

    def convert_keywords(
        self, node: dict[str, Any], where: str, *, partial: bool = False
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "title":
                continue
            if key == "default":
                if value is None:
                    continue
                if isinstance(value, dict) and value:
                    raise GenerationError(f"{where}: object defaults must be {{}}")
                out[key] = value
            elif key == "properties":
                out[key] = {k: self.convert(v, f"{where}.{k}") for k, v in value.items()}
            elif key == "items":
                out[key] = self.convert(value, f"{where}[]")
            elif key == "additionalProperties":
                if value is False:
                    continue
                if value is True or value == {}:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                else:
                    out[key] = self.convert(value, f"{where}{{}}")
            elif key == "exclusiveMinimum" and not isinstance(value, bool):
                out["minimum"] = value
                out["exclusiveMinimum"] = True
            elif key == "exclusiveMaximum" and not isinstance(value, bool):
                out["maximum"] = value
                out["exclusiveMaximum"] = True
            elif key == "const":
                out["enum"] = [value]
            elif key == "format":
                if value in _FORMATS:
                    out[key] = value
            else:
                out[key] = value
        if (
            not partial
            and out.get("type") == "object"
            and "properties" not in out
            and "additionalProperties" not in out
        ):
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out


def crd_schema(model: type[ApiModel]) -> dict[str, Any]:
    """The structural openAPIV3Schema of a kind."""
    js = model.model_json_schema(by_alias=True, mode="validation")
    conv = _ModelSchema(js)
    props = js["properties"]
    spec = conv.convert(props["spec"], f"{model.__name__}.spec")
    status = conv.convert(props["status"], f"{model.__name__}.status")
    return {
        "description": " ".join((model.__doc__ or model.__name__).split()),
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "description": "APIVersion defines the versioned schema of this representation"
                " of an object.",
                "type": "string",
            },
            "kind": {
                "description": "Kind is a string value representing the REST resource this"
                " object represents.",
                "type": "string",
            },
            "metadata": {"description": "Standard object metadata.", "type": "object"},
            "spec": spec,
            "status": status,
        },
    }


# --------------------------------------------------------------------------------------------
# upstream Kubernetes schemas → structural schema


def _definitions_path() -> Path:
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        raise GenerationError(
            "the kubernetes-validate package (dev extra) is needed to generate the CRDs"
        )
    base = Path(next(iter(spec.submodule_search_locations))) / "kubernetes-json-schema"
    path = base / f"{KUBERNETES_SCHEMA_VERSION}-local-strict" / "_definitions.json"
    if not path.exists():
        raise GenerationError(
            f"{path} is missing: kubernetes-validate no longer ships "
            f"{KUBERNETES_SCHEMA_VERSION}; update KUBERNETES_SCHEMA_VERSION"
        )
    return path


@cache
def _upstream_defs() -> dict[str, Any]:
    with _definitions_path().open() as f:
        defs: dict[str, Any] = json.load(f)["$defs"]
    return defs


def _short(text: str) -> str:
    """The first paragraph of an upstream description, cut at a sentence end when long."""
    para = " ".join(text.split("\n\n", 1)[0].split())
    if len(para) <= MAX_UPSTREAM_DESCRIPTION:
        return para
    cut = para.rfind(". ", 0, MAX_UPSTREAM_DESCRIPTION)
    if cut > 40:
        return para[: cut + 1]
    return para[: MAX_UPSTREAM_DESCRIPTION - 3].rstrip() + "..."


_INT_OR_STRING = {
    "x-kubernetes-int-or-string": True,
    "anyOf": [{"type": "integer"}, {"type": "string"}],
}


@cache
def upstream_schema(name: str) -> dict[str, Any]:
    """The structural schema of upstream definition ``name`` (e.g.
    ``io.k8s.api.core.v1.PodTemplateSpec``), with every $ref inlined."""
    return _upstream(name, ())


def _upstream(name: str, stack: tuple[str, ...]) -> dict[str, Any]:
    if name in stack:
        raise GenerationError(f"recursive upstream type {' -> '.join((*stack, name))}")
    stack = (*stack, name)
    short = name.rsplit(".", 1)[-1]
    if name == "io.k8s.apimachinery.pkg.util.intstr.IntOrString":
        return dict(_INT_OR_STRING)
    if name == "io.k8s.apimachinery.pkg.api.resource.Quantity":
        return {**_INT_OR_STRING, "pattern": _QUANTITY_PATTERN}
    if name == "io.k8s.apimachinery.pkg.runtime.RawExtension":
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    node = _upstream_defs()[name]
    if name == "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta":
        node = {
            **node,
            "properties": {k: node["properties"][k] for k in _EMBEDDED_META_FIELDS},
        }
    return _upstream_node(node, stack, short, describe=short in _DESCRIBED_TYPES)


def _upstream_node(
    node: dict[str, Any], stack: tuple[str, ...], where: str, *, describe: bool
) -> dict[str, Any]:
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        inlined = copy.deepcopy(_upstream(ref, stack))
        if "description" in node and describe:
            inlined["description"] = _short(node["description"])
        else:
            inlined.pop("description", None)
        return inlined
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            if describe:
                out[key] = _short(value)
        elif key == "type":
            types = [t for t in (value if isinstance(value, list) else [value]) if t != "null"]
            if len(types) != 1:
                raise GenerationError(f"{where}: cannot express types {value}")
            out[key] = types[0]
        elif key == "properties":
            out[key] = {
                k: _upstream_node(v, stack, f"{where}.{k}", describe=describe)
                for k, v in sorted(value.items())
            }
        elif key == "items":
            out[key] = _upstream_node(value, stack, f"{where}[]", describe=describe)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = _upstream_node(value, stack, f"{where}{{}}", describe=describe)
        elif key == "enum":
            out[key] = [v for v in value if v is not None]
        elif key == "format":
            if value in _FORMATS:
                out[key] = value
        elif key in _ALLOWED_KEYS - {"anyOf"}:
            out[key] = value
        # dropped: x-kubernetes-patch-*, x-kubernetes-unions, x-kubernetes-group-version-kind,
        # $schema, $id, oneOf (handled via IntOrString/Quantity above)
    if "oneOf" in node:
        raise GenerationError(f"{where}: upstream oneOf outside IntOrString/Quantity")
    _fix_list_map(out, where)
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return _finish(out, where)


def _fix_list_map(out: dict[str, Any], where: str) -> None:
    """Kubernetes requires list-map keys to be required or defaulted in CRD schemas."""
    if out.get("x-kubernetes-list-type") != "map":
        return
    items = out.get("items", {})
    required = set(items.get("required", []))
    for key in out.get("x-kubernetes-list-map-keys", []):
        if key in required:
            continue
        prop = items.get("properties", {}).get(key)
        if prop is None:
            raise GenerationError(f"{where}: list-map key {key} is not a property")
        if "default" in prop:
            continue
        if key == "protocol":
            prop["default"] = "TCP"  # what the API server defaults ContainerPort.protocol to
        elif prop.get("type") == "string":
            prop["default"] = ""  # upstream marks such keys +default="" (LocalObjectReference)
        else:
            raise GenerationError(f"{where}: list-map key {key} is neither required nor defaulted")


# --------------------------------------------------------------------------------------------
# CRD documents


def build_crd(spec: CrdSpec) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    subresources: dict[str, Any] = {"status": {}}
    if spec.scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.labelSelector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": spec.name,
            "labels": {"app.kubernetes.io/part-of": "matrixinfer"},
        },
        "spec": {
            "group": spec.group,
            "names": {
                "kind": spec.kind,
                "listKind": f"{spec.kind}List",
                "plural": spec.plural,
                "singular": spec.kind.lower(),
                "shortNames": list(spec.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": crd_schema(spec.model)},
                    "subresources": subresources,
                    "additionalPrinterColumns": [dict(c) for c in spec.columns],
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(spec: CrdSpec) -> str:
    """The YAML text of one CRD file."""
    body = yaml.dump(
        build_crd(spec), Dumper=_Dumper, sort_keys=True, width=100, allow_unicode=False
    )
    return (
        f"# Generated by `python -m crds` from the {spec.kind} model in crds/. Do not edit.\n"
        + body
    )


def render_all() -> dict[str, str]:
    """File name → YAML text, for every kind."""
    return {s.filename: render(s) for s in SPECS}


def write_all(directory: Path = CRD_DIR) -> list[Path]:
    """Write every CRD file; returns the paths written."""
    paths = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def check(directory: Path = CRD_DIR) -> list[str]:
    """Problems (one line each) where the files in ``directory`` differ from the models."""
    problems = []
    expected = render_all()
    for name, text in expected.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{path}: missing (run `python -m crds`)")
        elif path.read_text() != text:
            problems.append(f"{path}: out of date with the models (run `python -m crds`)")
    for path in sorted(directory.glob("*.yaml")):
        if path.name not in expected:
            problems.append(f"{path}: not generated from any model (stale file?)")
    return problems
