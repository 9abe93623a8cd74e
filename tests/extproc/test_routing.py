from __future__ import annotations

from random import Random

import pytest

from extproc.errors import GatewayError
from extproc.routing import LostClaim, RouteTable
from tests.extproc.helpers import objects

ROUTES = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: llama}
spec:
  modelName: llama
  loraAdapters: [sql-lora]
  rules:
  - name: premium
    match:
      headers: {x-tier: {exact: premium}}
    targets: [{modelServerName: big}]
  - name: beta
    match:
      headers: {x-user: {regex: "beta-[0-9]+"}}
      uri: {prefix: /v1/chat}
    targets: [{modelServerName: small}]
  - name: split
    targets:
    - {modelServerName: big, weight: 20}
    - {modelServerName: small, weight: 80}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: strict}
spec:
  modelName: strict-model
  rules:
  - name: only-header
    match:
      headers: {x-team: {prefix: ml-}}
    targets: [{modelServerName: small}]
  - name: to-missing
    match:
      uri: {exact: /v1/embeddings}
    targets: [{modelServerName: ghost}]
"""


SERVERS = {"default/big": "meta-llama/Llama-3-70B", "default/small": None}


def table() -> RouteTable:
    return RouteTable(objects(ROUTES), SERVERS)


def test_first_matching_rule_wins_and_rewrites_model() -> None:
    d = table().decide("llama", {"x-tier": "premium"}, "/v1/chat/completions", Random(1))
    assert (d.route, d.rule, d.server) == ("llama", "premium", "big")
    assert d.rewritten and d.upstream_model == "meta-llama/Llama-3-70B"


def test_regex_header_and_uri_match() -> None:
    t = table()
    d = t.decide("llama", {"x-user": "beta-12"}, "/v1/chat/completions", Random(1))
    assert d.rule == "beta" and d.server == "small" and not d.rewritten
    # regex is a full match; the URI must match too
    assert (
        t.decide("llama", {"x-user": "beta-12x"}, "/v1/chat/completions", Random(1)).rule == "split"
    )
    assert t.decide("llama", {"x-user": "beta-12"}, "/v1/completions", Random(1)).rule == "split"


def test_weighted_split_follows_weights() -> None:
    t = table()
    rng = Random(7)
    n = 5000
    big = sum(t.decide("llama", {}, "/v1/completions", rng).server == "big" for _ in range(n))
    # 20 % expected; 5 standard deviations is about 2.8 %
    assert abs(big / n - 0.2) < 0.03


def test_lora_request_matches_and_is_never_rewritten() -> None:
    d = table().decide("sql-lora", {"x-tier": "premium"}, "/v1/completions", Random(1))
    assert d.lora == "sql-lora" and d.server == "big"
    assert not d.rewritten and d.upstream_model == "sql-lora"


def test_unknown_model_is_404_naming_it() -> None:
    with pytest.raises(GatewayError) as err:
        table().decide("gpt-9", {}, "/v1/completions", Random(1))
    assert err.value.status == 404 and "'gpt-9'" in err.value.message


def test_no_matching_rule_is_404_naming_the_route() -> None:
    with pytest.raises(GatewayError) as err:
        table().decide("strict-model", {"x-team": "web"}, "/v1/completions", Random(1))
    assert err.value.status == 404 and "ModelRoute 'strict'" in err.value.message


def test_missing_model_server_is_503_naming_it() -> None:
    with pytest.raises(GatewayError) as err:
        table().decide("strict-model", {}, "/v1/embeddings", Random(1))
    assert err.value.status == 503 and "'ghost'" in err.value.message


def _route(name: str, model: str, created: str | None = None, server: str = "small") -> str:
    meta = f"name: {name}" + (f", creationTimestamp: '{created}'" if created else "")
    return (
        "apiVersion: networking.matrixinfer.ai/v1alpha1\nkind: ModelRoute\n"
        f"metadata: {{{meta}}}\nspec:\n  modelName: {model}\n"
        f"  rules: [{{targets: [{{modelServerName: {server}}}]}}]\n"
    )


def test_models_list_and_conflicts() -> None:
    dup = ROUTES + "\n---\n" + ROUTES.split("---")[1].replace("name: strict}", "name: strict2}")
    t = RouteTable(objects(dup), SERVERS)
    assert t.model_names() == ["llama", "sql-lora", "strict-model"]
    assert any("strict2" in c and "'default/strict' keeps it" in c for c in t.conflicts)
    assert t.lookup("strict-model")[0].name == "strict"
    assert [(c.name, c.served_by) for c in t.lost["default/strict2"]] == [
        ("strict-model", "default/strict")
    ]


def test_a_newcomer_does_not_take_a_served_model() -> None:
    """Files: the route applied first keeps its model, whatever the newcomer's name."""
    first = RouteTable(objects(_route("zeta", "chat")), SERVERS)
    assert first.lookup("chat")[0].name == "zeta"
    both = objects(_route("alpha", "chat", server="big") + "---\n" + _route("zeta", "chat"))
    second = RouteTable(both, SERVERS, previous=first)
    assert second.lookup("chat")[0].name == "zeta"
    assert second.lost == {"default/alpha": [LostClaim("chat", "default/zeta")]}
    # and it keeps it on the next reload too
    assert RouteTable(both, SERVERS, previous=second).lookup("chat")[0].name == "zeta"
    # without history, the name decides
    assert RouteTable(both, SERVERS).lookup("chat")[0].name == "alpha"


def test_the_oldest_route_wins_over_the_incumbent() -> None:
    """Kubernetes: the creation time decides, then the route that held the name."""
    old = _route("zeta", "chat", "2025-01-01T00:00:00Z")
    new = _route("alpha", "chat", "2025-06-01T00:00:00Z")
    t = RouteTable(objects(new + "---\n" + old), SERVERS)
    assert t.lookup("chat")[0].name == "zeta"
    same = _route("alpha", "chat", "2025-01-01T00:00:00Z")
    held = RouteTable(objects(old), SERVERS)
    assert (
        RouteTable(objects(same + "---\n" + old), SERVERS, previous=held).lookup("chat")[0].name
        == "zeta"
    )


def test_missing_model_server_is_reported_and_its_model_not_listed() -> None:
    t = RouteTable(objects(_route("lost", "ghost-model", server="ghost")), SERVERS)
    assert t.missing_servers == {"default/lost": ["default/ghost"]}
    (warning,) = t.missing_server_warnings()
    assert "'default/lost'" in warning and "'ghost'" in warning
    assert t.model_names() == []


def test_models_without_a_ready_pod_are_not_listed() -> None:
    ready = {"default/big"}
    t = RouteTable(objects(ROUTES), SERVERS, ready_server=ready.__contains__)
    assert t.model_names() == ["llama", "sql-lora"]  # strict-model: only 'small' and 'ghost'
    ready.add("default/small")
    assert t.model_names() == ["llama", "sql-lora", "strict-model"]
