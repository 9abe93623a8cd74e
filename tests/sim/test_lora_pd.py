"""LoRA adapters (load/unload, /v1/models, lora_requests_info) and prefill/decode handoff."""

from __future__ import annotations

import json

import openai
import pytest

from sim.fleet import SimPod

from .conftest import MODEL, SimFactory, get, metrics, post, sample, state

pytestmark = pytest.mark.timeout(60)


def client(pod: SimPod) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pod.url}/v1", api_key="sim", max_retries=0, timeout=20)


def model_ids(pod: SimPod) -> dict[str, dict]:
    status, _, body = get(f"{pod.url}/v1/models")
    assert status == 200
    return {m["id"]: m for m in json.loads(body)["data"]}


def lora_info(pod: SimPod) -> dict[str, str]:
    fams = metrics(pod)
    samples = fams["vllm:lora_requests_info"].samples
    assert len(samples) == 1
    return dict(samples[0].labels)


def test_lora_load_serve_show_unload(sim_factory: SimFactory) -> None:
    with sim_factory("--time-scale", "1", "--max-loras", "2") as pod:
        url = pod.url
        status, _, body = post(
            f"{url}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/a/sql"}
        )
        assert status == 200 and b"sql" in body
        ids = model_ids(pod)
        assert ids["sql"]["parent"] == MODEL and ids["sql"]["root"] == "/a/sql"
        # loading twice is an error
        status, _, body = post(
            f"{url}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/a/sql"}
        )
        assert status == 400 and json.loads(body)["error"]["type"] == "BadRequestError"

        c = client(pod)
        stream = c.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "select"}], max_tokens=500,
            stream=True,
        )  # fmt: skip
        first = next(iter(stream))
        assert first.model == "sql"
        labels = lora_info(pod)
        assert labels["running_lora_adapters"] == "sql"
        assert labels["waiting_lora_adapters"] == ""
        assert labels["max_lora"] == "2"
        stream.close()  # the server aborts the request

        def aborted() -> bool:
            return sample(metrics(pod), "vllm:request_success_total", finished_reason="abort") >= 1

        from matrixinfer.process import wait_until

        wait_until(aborted, 10, "abort of the closed stream")
        assert lora_info(pod)["running_lora_adapters"] == ""

        status, _, _ = post(f"{url}/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert status == 200
        assert "sql" not in model_ids(pod)
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(
                model="sql", messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        status, _, body = post(f"{url}/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert status == 404 and json.loads(body)["error"]["code"] == 404


def test_max_cpu_loras_bounds_loaded_adapters(sim_factory: SimFactory) -> None:
    with sim_factory("--max-cpu-loras", "1") as pod:
        ok = post(f"{pod.url}/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/a"})
        assert ok[0] == 200
        status, _, body = post(
            f"{pod.url}/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/b"}
        )
        assert status == 400 and "max-cpu-loras" in json.loads(body)["error"]["message"]


PROMPT = " ".join(f"piece{i}" for i in range(300))  # 600 tokens


def test_vllm_nixl_style_prefill_to_decode_handoff(sim_factory: SimFactory) -> None:
    with (
        sim_factory("--time-scale", "0.05", "--role", "prefill", name="prefill-0") as prefill,
        sim_factory("--time-scale", "0.05", "--role", "decode", name="decode-0") as decode,
    ):
        kvp = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
        status, headers, body = post(
            f"{prefill.url}/v1/completions",
            {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": kvp},
        )
        assert status == 200 and headers["x-inference-pod"] == "prefill-0"
        p = json.loads(body)
        out = p["kv_transfer_params"]
        assert out["do_remote_prefill"] is True and out["do_remote_decode"] is False
        assert out["remote_host"] == prefill.host and isinstance(out["remote_port"], int)
        assert out["remote_engine_id"].startswith("prefill-0")
        prompt_tokens = p["usage"]["prompt_tokens"]
        assert len(out["remote_block_ids"]) == -(-prompt_tokens // 16)
        assert p["usage"]["completion_tokens"] == 1

        c = client(decode)
        stream = c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, stream=True,
            extra_body={"kv_transfer_params": out},
        )  # fmt: skip
        texts = [ch.choices[0].text for ch in stream if ch.choices]
        assert len(texts) == 8
        st = state(decode)
        assert st["kv_transfers"] == 1
        assert st["kv_transfer_tokens"] == prompt_tokens - 1
        assert st["prefill_computed_tokens"] == 1  # only the last prompt token is computed
        assert state(prefill)["prefill_computed_tokens"] == prompt_tokens

        # roles are enforced
        status, _, body = post(
            f"{prefill.url}/v1/completions",
            {"prompt": "x", "max_tokens": 2, "kv_transfer_params": out},
        )
        assert status == 400 and "role prefill" in json.loads(body)["error"]["message"]
        status, _, _ = post(
            f"{decode.url}/v1/completions",
            {"prompt": "x", "max_tokens": 2, "kv_transfer_params": kvp},
        )
        assert status == 400


def test_sglang_bootstrap_handoff_and_metric_names(sim_factory: SimFactory) -> None:
    with (
        sim_factory("--engine", "sglang", "--role", "prefill", "--time-scale", "0.05") as pre,
        sim_factory("--engine", "sglang", "--role", "decode", "--time-scale", "0.05") as dec,
    ):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 6,
            "bootstrap_host": pre.host,
            "bootstrap_port": 8998,
            "bootstrap_room": 12345,
        }
        sp, _, bp = post(f"{pre.url}/v1/chat/completions", body)
        sd, _, bd = post(f"{dec.url}/v1/chat/completions", body)
        assert sp == 200 and sd == 200
        assert json.loads(bp)["usage"]["completion_tokens"] == 1
        assert json.loads(bd)["usage"]["completion_tokens"] == 6
        assert state(dec)["kv_transfers"] == 1 and state(pre)["kv_transfers"] == 0

        fams = metrics(dec)
        assert not any(n.startswith("vllm:") for n in fams)
        want = {
            "sglang:num_running_reqs": "gauge",
            "sglang:num_queue_reqs": "gauge",
            "sglang:token_usage": "gauge",
            "sglang:cache_hit_rate": "gauge",
            "sglang:prompt_tokens": "counter",
            "sglang:generation_tokens": "counter",
            "sglang:time_to_first_token_seconds": "histogram",
            "sglang:inter_token_latency_seconds": "histogram",
            "sglang:e2e_request_latency_seconds": "histogram",
        }
        for name, typ in want.items():
            assert fams[name].type == typ, name
            assert all(set(s.labels) - {"le"} == {"model_name"} for s in fams[name].samples), name
        assert sample(fams, "sglang:generation_tokens_total", model_name=MODEL) == 6
        ttft_bounds = [
            float(s.labels["le"])
            for s in fams["sglang:time_to_first_token_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
        ]
        assert ttft_bounds[:5] == [0.1, 0.2, 0.4, 0.6, 0.8] and ttft_bounds[-1] == 400
