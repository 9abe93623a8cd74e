"""The PD proxy's request bodies per connector (runtime.pd_proxy, pure part)."""

from __future__ import annotations

import random

import pytest

from runtime.pd_proxy import bootstrap_fields, decode_request, prefill_request

BODY = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 100,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@pytest.mark.parametrize("connector", ["nixl", "mooncake", "lmcache"])
def test_vllm_connectors_prefill_one_token_for_a_remote_decoder(connector: str) -> None:
    p = prefill_request(connector, BODY)  # type: ignore[arg-type]
    assert p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p
    assert p["kv_transfer_params"]["do_remote_decode"] is True
    assert p["kv_transfer_params"]["do_remote_prefill"] is False
    handed = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "remote_host": "10.0.0.1"}
    d = decode_request(connector, BODY, handed)  # type: ignore[arg-type]
    assert d["kv_transfer_params"] == handed
    assert d["max_tokens"] == 100 and d["stream"] is True and d["stream_options"]
    assert "kv_transfer_params" not in BODY  # the client's body is not changed


def test_sglang_sends_the_same_bootstrap_room_to_both() -> None:
    boot = bootstrap_fields("10.0.0.7:8000", 8998, random.Random(1))
    assert boot["bootstrap_host"] == "10.0.0.7" and boot["bootstrap_port"] == 8998
    p = prefill_request("sglang", BODY, boot)
    d = decode_request("sglang", BODY, bootstrap=boot)
    for key in ("bootstrap_host", "bootstrap_port", "bootstrap_room"):
        assert p[key] == d[key] == boot[key]
    assert "kv_transfer_params" not in p and "kv_transfer_params" not in d


def test_http_connector_decodes_the_unchanged_request() -> None:
    p = prefill_request("http", {**BODY, "max_completion_tokens": 50})
    assert p["max_tokens"] == 1 and p["max_completion_tokens"] == 1
    assert "kv_transfer_params" not in p
    assert decode_request("http", BODY, {"ignored": True}) == BODY


def test_only_nixl_and_mooncake_require_transfer_parameters() -> None:
    from runtime.pd_proxy import TRANSFER_REQUIRED

    assert {"nixl", "mooncake"} == TRANSFER_REQUIRED
    assert "kv_transfer_params" not in decode_request("lmcache", BODY, None)
