from __future__ import annotations

from random import Random

import pytest

from extproc.errors import GatewayError
from extproc.routing import RouteTable
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


def table() -> RouteTable:
    return RouteTable(
        objects(ROUTES), {"default/big": "meta-llama/Llama-3-70B", "default/small": None}
    )


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


def test_models_list_and_conflicts() -> None:
    dup = ROUTES + "\n---\n" + ROUTES.split("---")[1].replace("name: strict}", "name: strict2}")
    t = RouteTable(objects(dup), {})
    assert t.model_names() == ["llama", "sql-lora", "strict-model"]
    assert any("strict2" in c and "first one wins" in c for c in t.conflicts)
    assert t.lookup("strict-model")[0].name == "strict"
