"""Every generated CRD is a valid, structural apiextensions.k8s.io/v1 CRD: typed nodes, only
allowed keywords, descriptions everywhere, CEL rules that compile, useful printer columns."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from crds import generate

from .apiserver import compile_rule, crd_documents, crd_schema, walk

KINDS = sorted(crd_documents())
FORBIDDEN = {
    "$ref",
    "definitions",
    "$defs",
    "oneOf",
    "allOf",
    "not",
    "const",
    "title",
    "uniqueItems",
}


def embedded_paths(kind: str) -> list[str]:
    """Schema paths of fields whose schema is an upstream Kubernetes type (pod templates, env,
    resources): below them only the described upstream types carry descriptions."""
    spec = next(s for s in generate.SPECS if s.kind == kind)
    js = spec.model.model_json_schema(by_alias=True)
    defs = js.get("$defs", {})
    found: list[str] = []

    def visit(node: dict[str, Any], path: str, seen: tuple[str, ...]) -> None:
        if "x-matrixinfer-k8s" in node or "x-matrixinfer-k8s" in node.get("items", {}):
            found.append(path)
            return
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                visit(defs[name], path, (*seen, name))
        for b in node.get("anyOf", []):
            visit(b, path, seen)
        for k, v in node.get("properties", {}).items():
            visit(v, f"{path}.{k}", seen)
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[]", seen)
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"], f"{path}{{}}", seen)

    visit(js, "", ())
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_crd_is_a_valid_custom_resource_definition(kind: str) -> None:
    kubernetes_validate.validate(crd_documents()[kind], "1.33.0", strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    problems = []
    for path, node in walk(crd_schema(kind)):
        if "<anyOf" in path:
            if set(node) != {"type"}:
                problems.append(f"{path}: anyOf branches may only carry a type")
            continue
        typed = (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        )
        if not typed:
            problems.append(f"{path}: no type")
        if FORBIDDEN & set(node):
            problems.append(f"{path}: forbidden keywords {sorted(FORBIDDEN & set(node))}")
        if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: anyOf outside int-or-string")
        if node.get("x-kubernetes-int-or-string") and node.get("anyOf") != [
            {"type": "integer"},
            {"type": "string"},
        ]:
            problems.append(f"{path}: int-or-string without its anyOf")
        if "additionalProperties" in node:
            if "properties" in node:
                problems.append(f"{path}: properties and additionalProperties together")
            if not isinstance(node["additionalProperties"], dict):
                problems.append(f"{path}: additionalProperties must be a schema")
        if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(
            node.get("exclusiveMinimum"), bool
        ):
            problems.append(f"{path}: numeric exclusiveMinimum (must be boolean)")
        if node.get("x-kubernetes-list-type") == "map":
            items = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                prop = items["properties"][key]
                if key not in items.get("required", []) and "default" not in prop:
                    problems.append(f"{path}: list-map key {key} neither required nor defaulted")
    assert problems == []


@pytest.mark.parametrize("kind", KINDS)
def test_root_is_restricted_like_kubernetes_wants(kind: str) -> None:
    root = crd_schema(kind)
    assert root["properties"]["metadata"] == {
        "description": "Standard object metadata.",
        "type": "object",
    }
    assert set(root["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_a_description(kind: str) -> None:
    embedded = embedded_paths(kind)
    missing = []
    for path, node in walk(crd_schema(kind)):
        if path.endswith("[]") or path.endswith("{}") or "<anyOf" in path:
            continue  # list items and map values are described by their field
        top_of_embedded = path in embedded
        inside_embedded = any(path.startswith(p) and path != p for p in embedded)
        if inside_embedded:
            continue  # upstream Kubernetes types: see test_embedded_types_keep_top_descriptions
        if not node.get("description"):
            missing.append(path or "<root>")
        assert not top_of_embedded or node.get("description")
    assert missing == []


def test_embedded_pod_templates_are_real_and_described_at_the_top() -> None:
    roles = crd_schema("ModelInfer")["properties"]["spec"]["properties"]["template"]
    role = roles["properties"]["roles"]["items"]
    for field in ("entryTemplate", "workerTemplate"):
        tmpl = role["properties"][field]
        assert tmpl["type"] == "object"
        assert not tmpl.get("x-kubernetes-preserve-unknown-fields")
        spec = tmpl["properties"]["spec"]
        assert spec["required"] == ["containers"]
        assert spec["properties"]["containers"]["x-kubernetes-list-type"] == "map"
        container = spec["properties"]["containers"]["items"]
        assert container["properties"]["image"]["description"]
        ports = container["properties"]["ports"]["items"]["properties"]
        assert ports["containerPort"]["format"] == "int32"
        assert ports["protocol"]["default"] == "TCP"
        probe_port = container["properties"]["readinessProbe"]["properties"]["httpGet"][
            "properties"
        ]["port"]
        assert probe_port["x-kubernetes-int-or-string"] is True
        limits = container["properties"]["resources"]["properties"]["limits"]
        assert limits["additionalProperties"]["x-kubernetes-int-or-string"] is True
        meta = tmpl["properties"]["metadata"]["properties"]
        assert set(meta) == {"annotations", "finalizers", "labels", "name", "namespace"}
    assert "workerTemplate" not in role.get("required", [])
    assert role["required"] == ["name", "entryTemplate"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_cel_rule_compiles_and_has_a_message(kind: str) -> None:
    rules = [
        r for _, node in walk(crd_schema(kind)) for r in node.get("x-kubernetes-validations", [])
    ]
    assert rules, f"{kind} has no CEL rules"
    for r in rules:
        compile_rule(r["rule"])
        assert r["message"] and not r["message"].endswith(".")
        assert set(r) <= {"rule", "message", "fieldPath"}


@pytest.mark.parametrize("kind", KINDS)
def test_names_subresources_and_columns(kind: str) -> None:
    spec = crd_documents()[kind]["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["categories"] == ["matrixinfer"]
    assert spec["names"]["shortNames"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert "status" in version["subresources"]
    cols = [c["name"] for c in version["additionalPrinterColumns"]]
    assert cols[-1] == "Age"
    status = crd_schema(kind)["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions"} <= set(status)
    cond = status["conditions"]
    assert cond["x-kubernetes-list-map-keys"] == ["type"]
    assert cond["items"]["required"] == ["type", "status"]


def test_modelinfer_scale_subresource_and_columns() -> None:
    version = crd_documents()["ModelInfer"]["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.labelSelector",
    }
    paths = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert paths["Desired"] == ".spec.replicas"
    assert paths["Ready"] == ".status.readyReplicas"
    server = crd_documents()["ModelServer"]["spec"]["versions"][0]
    assert {c["name"] for c in server["additionalPrinterColumns"]} >= {"Engine", "Model", "Ready"}


def test_int_or_percent_fields() -> None:
    rollout = crd_schema("ModelInfer")["properties"]["spec"]["properties"]["rolloutStrategy"]
    assert rollout["default"] == {}
    for field, default in (("maxUnavailable", 1), ("partition", 0)):
        node = rollout["properties"][field]
        assert node["x-kubernetes-int-or-string"] is True
        assert node["default"] == default


@pytest.mark.parametrize("kind", KINDS)
def test_crd_fits_client_side_apply(kind: str) -> None:
    # kubectl apply (client-side) stores the object in a 256 KiB annotation
    size = len(json.dumps(crd_documents()[kind], separators=(",", ":")))
    assert size < 256 * 1024, f"{kind} CRD is {size} bytes of JSON"


def test_readme_lists_every_rule() -> None:
    readme = (generate.CRD_DIR / "README.md").read_text()
    messages = {
        r["message"]
        for kind in KINDS
        for _, node in walk(crd_schema(kind))
        for r in node.get("x-kubernetes-validations", [])
    }
    missing = {m for m in messages if m not in readme}
    assert missing == set(), "crds/README.md misses rules"


def test_factory_defaults_are_written_into_the_schema() -> None:
    """pydantic leaves default_factory values out of the JSON schema; every such field must
    state its default explicitly so the API server defaults it like Python does."""
    from pydantic import BaseModel

    seen: set[type] = set()
    missing = []

    def visit(cls: type[BaseModel]) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for name, f in cls.model_fields.items():
            if f.default_factory is not None and name != "metadata":
                extra = f.json_schema_extra
                if not (isinstance(extra, dict) and "default" in extra):
                    missing.append(f"{cls.__name__}.{name}")
            for arg in _model_types(f.annotation):
                visit(arg)

    for spec in generate.SPECS:
        visit(spec.model)
    assert missing == []


def _model_types(tp: Any) -> list[type]:
    import typing

    from pydantic import BaseModel

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _model_types(a)]


@pytest.mark.parametrize("kind", KINDS)
def test_rule_field_paths_name_real_fields(kind: str) -> None:
    for path, node in walk(crd_schema(kind)):
        for r in node.get("x-kubernetes-validations", []):
            target = node
            for part in r.get("fieldPath", "").split(".")[1:]:
                assert part in target.get("properties", {}), f"{path}: {r['fieldPath']}"
                target = target["properties"][part]
