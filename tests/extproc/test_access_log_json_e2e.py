"""Envoy's JSON access line (``access_log_format: json``): one JSON object per request in
Envoy's output, every documented field present, for a streamed answer (usage tokens read by the
policies' filters), a plain answer and a request the gateway rejected."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from controllers.xds.generate import ACCESS_LOG_JSON_FIELDS
from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.extproc.conftest import start_stack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def json_log_stack(
    tmp_path_factory: pytest.TempPathFactory, config_dir: Path, fleet: Fleet
) -> Iterator[GatewayStack]:
    s = start_stack(
        config_dir,
        tmp_path_factory.mktemp("json-log-run"),
        fleet,
        access_log=True,
        access_log_format="json",
        policies=True,  # the usage filters: prompt/completion tokens in the line
    )
    try:
        yield s
    finally:
        s.stop()


def _line(stack: GatewayStack, rid: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def look() -> bool:
        for text in (Path(stack.run_dir) / "envoy.log").read_text().splitlines():
            if text.startswith("{") and rid in text:
                found.append(json.loads(text))
                return True
        return False

    wait_until(look, 10, f"Envoy's JSON access line for {rid}")
    return found[0]


def test_json_access_lines_carry_every_field(json_log_stack: GatewayStack, fleet: Fleet) -> None:
    client = OpenAI(base_url=json_log_stack.url, api_key="unused", max_retries=0, timeout=20)
    addresses = {p.address for p in fleet.pods}
    try:
        streamed = f"streamed-{uuid.uuid4().hex}"
        stream = client.chat.completions.create(
            model="demo-model",
            messages=[{"role": "user", "content": "tell me"}],
            max_tokens=5,
            stream=True,
            extra_headers={"x-request-id": streamed},
        )
        assert [c for c in stream]
        rejected = f"rejected-{uuid.uuid4().hex}"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="no-such-model",
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-request-id": rejected},
            )
        line = _line(json_log_stack, streamed)
        assert set(line) == set(ACCESS_LOG_JSON_FIELDS)
        assert line["request_id"] == streamed
        assert line["method"] == "POST" and line["path"] == "/v1/chat/completions"
        assert line["model"] == "demo-model"
        assert line["route"] == "demo" and line["model_server"] == "pool"
        assert line["pod"] in addresses
        assert line["status"] == 200 and line["details"] == "via_upstream"
        assert line["attempts"] == 1
        assert line["bytes_received"] > 0 and line["bytes_sent"] > 0
        assert 0 <= line["first_byte_ms"] <= line["duration_ms"]
        assert line["completion_tokens"] == 5 and line["prompt_tokens"] > 0
        line = _line(json_log_stack, rejected)
        assert line["status"] == 404
        assert line["details"].startswith("matrixinfer_gateway_")
        assert line["pod"] is None and line["model_server"] is None
        assert line["completion_tokens"] is None
    finally:
        client.close()
