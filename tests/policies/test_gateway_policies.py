"""Gateway.decide with policies, in process: credentials never reach the engine, usage is forced on
streams and marked for the usage report, and a rejected request leaves no reservation behind."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import orjson

from extproc.auth import AuthConfig
from extproc.gateway import Gateway, Immediate, Routed
from extproc.metrics import GatewayMetrics
from extproc.policies import Policies, PolicySettings
from extproc.servicer import from_decision
from tests.extproc.helpers import config, server_yaml

ROUTE = """---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  modelName: m
  rateLimit: {requestsPerUnit: 1, unit: hour, scope: user}
  rules: [{targets: [{modelServerName: s}]}]
"""
HEADERS = {
    ":method": "POST",
    ":path": "/v1/chat/completions",
    "content-type": "application/json",
    "authorization": "Bearer secret-key",
}


def gateway(tmp_path: Path) -> Gateway:
    from extproc.datastore import Datastore

    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(b"secret-key").hexdigest()
    keys.write_text(f"keys: [{{sha256: {digest}, tenant: t, user: u}}]\n")
    ds = Datastore()
    ds.apply(
        config(server_yaml("s", {"app": "x"}) + ROUTE, [("p0", "10.0.0.1:8000", {"app": "x"})])
    )
    gw = Gateway(ds, GatewayMetrics())
    gw.policies = Policies(PolicySettings(auth=AuthConfig(api_keys_file=keys)), gw.metrics.registry)
    return gw


async def decide(gw: Gateway, body: Mapping[str, object]) -> Routed | Immediate:
    state, answer = gw.start(HEADERS, False)
    assert answer is None
    decided = gw.decide(state, json.dumps(body).encode())
    result = decided if isinstance(decided, (Routed, Immediate)) else await decided
    gw.finish(state)
    return result


async def test_credentials_stripped_usage_forced_and_marked(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    routed = await decide(gw, body)
    assert isinstance(routed, Routed)
    assert routed.headers["authorization"] == ""  # "" = remove the client's header
    reply = from_decision(routed, b"", duplex=False)
    mutation = reply.request_body.response.header_mutation
    assert "authorization" in mutation.remove_headers
    assert all(h.header.key != "authorization" for h in mutation.set_headers)
    sent = orjson.loads(reply.request_body.response.body_mutation.body)
    assert sent["stream_options"] == {"include_usage": True}
    lb = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["matrixinfer_rid"].string_value in gw.policies.ledger.open  # type: ignore[union-attr]


async def test_rejected_request_is_a_429_with_headers(tmp_path: Path) -> None:
    gw = gateway(tmp_path)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert isinstance(await decide(gw, body), Routed)
    limited = await decide(gw, body)
    assert isinstance(limited, Immediate) and limited.status == 429
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(limited.headers["retry-after"]) >= 1
