"""``/v1/embeddings`` end to end: the openai client -> Envoy -> extproc (parsed, routed,
scheduled) -> a simulator pod; the body is never rewritten except for a ModelServer's model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def client(stack: GatewayStack) -> Iterator[OpenAI]:
    c = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)
    yield c
    c.close()


def test_embeddings_through_envoy_match_the_pods_own_answer(client: OpenAI, fleet: Fleet) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="demo-model", input=["hello embeddings", "a second input"]
    )
    pod = raw.headers["x-inference-pod"]
    assert pod in {p.name for p in fleet.pods}
    answer = raw.parse()
    assert [d.index for d in answer.data] == [0, 1]
    assert len(answer.data[0].embedding) == 64
    assert answer.usage.prompt_tokens > 0
    # the same vectors as asking the pod directly: the body went through unchanged
    direct = next(p for p in fleet.pods if p.name == pod)
    req = urllib.request.Request(
        f"http://{direct.address}/v1/embeddings",
        data=json.dumps({"model": "demo-model", "input": ["hello embeddings"]}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        own = json.loads(resp.read())
    assert own["data"][0]["embedding"] == answer.data[0].embedding


def test_embeddings_model_is_rewritten_for_the_modelserver(client: OpenAI) -> None:
    # ModelRoute alias-model -> ModelServer rewrite (spec.model: demo-model)
    answer = client.embeddings.create(model="alias-model", input="rewrite me")
    assert answer.model == "demo-model"
    assert len(answer.data) == 1


def test_embeddings_unknown_model_and_bad_input_are_answered_by_the_gateway(
    client: OpenAI, stack: GatewayStack
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="x")
    assert "no-such-model" in str(missing.value)
    req = urllib.request.Request(
        f"{stack.url}/embeddings",
        data=json.dumps({"model": "demo-model", "input": 42}).encode(),
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=10)
    assert bad.value.code == 400
    error = json.loads(bad.value.read())["error"]
    assert error["param"] == "input"
    # answered by the extproc (Envoy's header), not by a pod
    assert bad.value.headers.get("x-inference-pod") is None
