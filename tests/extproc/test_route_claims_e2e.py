"""Through Envoy: a route file added later that claims a served model does not take it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from tests.extproc.conftest import debug_state
from tests.extproc.test_gateway_e2e import chat

pytestmark = pytest.mark.timeout(180)

USURPER = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: aaa-usurper}
spec:
  modelName: split-model
  rules: [{targets: [{modelServerName: pinned-0}]}]
"""


@pytest.fixture(scope="module")
def client(stack: GatewayStack) -> Iterator[OpenAI]:
    c = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)
    yield c
    c.close()


def _routes(stack: GatewayStack) -> dict[str, dict[str, object]]:
    return {r["key"]: r for r in debug_state(stack)["modelRoutes"]}


def test_hot_added_duplicate_route_leaves_the_incumbent_serving(
    stack: GatewayStack,
    client: OpenAI,
    config_dir: Path,
) -> None:
    # sorts before every other file and names itself first: the old rule gave it the model
    added = config_dir / "00-usurper.yaml"
    added.write_text(USURPER)
    try:
        wait_until(lambda: "default/aaa-usurper" in _routes(stack), 30, "the new file applied")
        route = _routes(stack)["default/aaa-usurper"]
        assert route["notServed"] == [{"name": "split-model", "servedBy": "default/split"}]
        assert any("'default/aaa-usurper' also claims" in w for w in debug_state(stack)["warnings"])
        # split-model stays on its route's ModelServers (sim-2, sim-3), never pinned-0 (sim-0)
        pods = {chat(client, model="split-model")[0] for _ in range(8)}
        assert pods <= {"sim-2", "sim-3"}, pods
    finally:
        added.unlink(missing_ok=True)
    wait_until(lambda: "default/aaa-usurper" not in _routes(stack), 30, "the file removed")
