"""The examples: every valid one passes the model, the CRD schema and every CEL rule; every
object in examples/invalid/ is rejected with the message its `# expect:` line states, by the
Python model and by the API server's checks (schema or CEL) alike; every CEL rule is seen
passing and failing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import crds

from .apiserver import (
    api_server_errors,
    apply_defaults,
    crd_documents,
    crd_schema,
    evaluate_rules,
    schema_errors,
    walk,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))


def documents(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is not None:
            yield doc


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_example_set_is_complete() -> None:
    kinds = [d["kind"] for p in EXAMPLES for d in documents(p)]
    assert set(kinds) == set(crds.KINDS)
    models = [d for p in EXAMPLES for d in documents(p) if d["kind"] == "Model"]
    assert any(len(m["spec"]["backends"]) == 2 for m in models)
    infer = next(d for p in EXAMPLES for d in documents(p) if d["kind"] == "ModelInfer")
    roles = {r["name"]: r for r in infer["spec"]["template"]["roles"]}
    assert {"prefill", "decode"} <= set(roles)
    assert any(r.get("workerReplicas", 0) > 0 and "workerTemplate" in r for r in roles.values())
    server = next(
        d
        for p in EXAMPLES
        for d in documents(p)
        if d["kind"] == "ModelServer" and "pdGroup" in d["spec"]["workloadSelector"]
    )
    assert server["spec"]["inferenceEngine"] == "vLLM"
    route = next(d for p in EXAMPLES for d in documents(p) if d["kind"] == "ModelRoute")
    assert any("headers" in r.get("match", {}) for r in route["spec"]["rules"])
    assert any(len(r["targets"]) > 1 for r in route["spec"]["rules"])
    assert route["spec"]["rateLimit"]["inputTokensPerUnit"]
    assert route["spec"]["access"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_valid_example_passes_model_schema_and_cel(path: Path) -> None:
    for doc in documents(path):
        obj = crds.parse_object(doc, rel(path))
        assert obj.metadata.name == doc["metadata"]["name"]
        assert schema_errors(doc["kind"], doc) == []
        assert api_server_errors(doc) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_round_trip_is_lossless(path: Path) -> None:
    for doc in documents(path):
        obj = crds.parse_object(doc)
        # only what was given: exactly the input
        assert crds.to_dict(obj, exclude_unset=True) == doc
        # with defaults: a superset that parses to the same object and is a fixed point
        full = crds.to_dict(obj)
        again = crds.parse_object(yaml.safe_load(yaml.safe_dump(full)))
        assert again == obj
        assert crds.to_dict(again) == full
        # the model fills in no default the CRD does not (the CRD adds upstream ones inside
        # pod templates, e.g. ports[].protocol: TCP, which Python keeps as plain dicts)
        schema = crd_schema(doc["kind"])
        assert apply_defaults(schema, full) == apply_defaults(schema, doc)


def test_multi_document_file_round_trips() -> None:
    text = "\n---\n".join(p.read_text() for p in EXAMPLES)
    objs = crds.load_documents(text, "all")
    assert len(objs) == sum(1 for p in EXAMPLES for _ in documents(p))
    back = crds.load_documents(crds.dump_documents(objs), "dumped")
    assert back == objs


def expectations(path: Path) -> dict[str, str]:
    out = {}
    for key, value in re.findall(r"^# ([a-z-]+): (.*)$", path.read_text(), re.M):
        out[key] = value
    return out


def test_invalid_examples_declare_what_they_expect() -> None:
    assert len(INVALID) >= 40
    for path in INVALID:
        exp = expectations(path)
        assert "expect" in exp or "model-accepts" in exp, path.name
        assert len(list(documents(path))) == 1, path.name


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_rejected_with_the_expected_message(path: Path) -> None:
    exp = expectations(path)
    doc = next(documents(path))
    # Python side
    if "model-accepts" in exp:
        crds.parse_object(doc, rel(path))
    else:
        with pytest.raises(crds.InvalidObject) as info:
            crds.parse_object(doc, rel(path))
        name = doc["metadata"]["name"]
        assert str(info.value).startswith(f'{rel(path)}: {doc["kind"]} "{name}": ')
        assert exp["expect"] in str(info.value)
    # API server side: schema, then CEL
    errors = api_server_errors(doc)
    if "server-accepts" in exp:
        assert errors == []
        return
    wanted = exp.get("server", exp.get("expect"))
    assert wanted is not None
    assert any(wanted in e for e in errors), errors


def _all_rules() -> set[tuple[str, str]]:
    return {
        (kind, r["rule"])
        for kind in crd_documents()
        for _, node in walk(crd_schema(kind))
        for r in node.get("x-kubernetes-validations", [])
    }


def test_every_cel_rule_is_seen_passing_and_failing() -> None:
    passed: set[tuple[str, str]] = set()  # (kind, rule): seen passing in every kind
    failed: set[str] = set()  # rule: seen failing somewhere (same text, same meaning)
    for path in [*EXAMPLES, *INVALID]:
        for doc in documents(path):
            kind = doc.get("kind")
            if kind not in crd_documents() or schema_errors(kind, doc):
                continue
            schema = crd_schema(kind)
            for r in evaluate_rules(schema, apply_defaults(schema, doc)):
                if r.ok:
                    passed.add((kind, r.rule))
                else:
                    failed.add(r.rule)
    rules = _all_rules()
    assert rules - passed == set(), "rules never seen passing"
    assert {rule for _, rule in rules} - failed == set(), "rules never seen failing"


def test_every_cel_message_has_an_invalid_example() -> None:
    messages = {
        r["message"]
        for kind in crd_documents()
        for _, node in walk(crd_schema(kind))
        for r in node.get("x-kubernetes-validations", [])
    }
    expected = " ".join(expectations(p).get("expect", "") for p in INVALID)
    assert {m for m in messages if m not in expected} == set()


def test_python_rules_and_cel_agree() -> None:
    """Where the schema accepts an invalid example, the model's rule errors are exactly the CEL
    errors (same field path, same message)."""
    compared = 0
    for path in INVALID:
        exp = expectations(path)
        doc = next(documents(path))
        kind = doc.get("kind")
        if kind not in crd_documents() or schema_errors(kind, doc):
            continue  # rejected by the schema before CEL runs
        if "model-accepts" in exp or "server-accepts" in exp:
            continue  # documented difference between the model and the API server
        schema = crd_schema(kind)
        cel = sorted(
            f"{r.path}: {r.message}"
            for r in evaluate_rules(schema, apply_defaults(schema, doc))
            if not r.ok
        )
        with pytest.raises(crds.InvalidObject) as info:
            crds.parse_object(doc)
        python = sorted(f"{p}: {m}" for p, m in info.value.errors)
        assert python == cel, path.name
        compared += 1
    assert compared >= 35
