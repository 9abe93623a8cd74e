"""The OpenAI-compatible HTTP API, called with the official openai client (sync and async)."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from sim.fleet import SimPod
from sim.tokenizer import WORDS, Tokenizer

from .conftest import MODEL, SimFactory, get, metrics, post, sample, state

pytestmark = pytest.mark.timeout(60)

# ~7k tokens: its prefill (~0.5 s at time scale 1) dwarfs the scheduling delays a loaded machine
# adds to both requests' TTFT, so the cached request's shorter TTFT is not left to chance
LONG_PROMPT = " ".join(f"{WORDS[i % 97]} {WORDS[100 + i % 13]}" for i in range(3500))  # 7k tokens


def client(pod: SimPod) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pod.url}/v1", api_key="sim", max_retries=0, timeout=20)


def aclient(pod: SimPod) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{pod.url}/v1", api_key="sim", max_retries=0, timeout=20)


def test_chat_non_streaming(shared_sim: SimPod) -> None:
    r = client(shared_sim).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there!"}], max_tokens=7
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert r.usage is not None
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert Tokenizer().count(choice.message.content or "") == 7


def test_prompt_tokens_match_tokenize(shared_sim: SimPod) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, sim!"}]
    status, _, body = post(f"{shared_sim.url}/tokenize", {"model": MODEL, "messages": msgs})
    assert status == 200
    tok = json.loads(body)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
    r = client(shared_sim).chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens == tok["count"]
    status, _, body = post(f"{shared_sim.url}/tokenize", {"prompt": " ".join(WORDS[:3])})
    assert json.loads(body)["count"] == 3


def test_chat_streaming_with_usage(shared_sim: SimPod) -> None:
    stream = client(shared_sim).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 12
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert Tokenizer().count(text) == 12


def test_sse_wire_format(shared_sim: SimPod) -> None:
    status, headers, raw = post(
        f"{shared_sim.url}/v1/completions",
        {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-inference-pod"] == "sim-shared"
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e[len(b"data: ") :]) for e in events[:-2]]
    assert len(payloads) == 3  # no usage chunk unless asked
    assert all(p["object"] == "text_completion" for p in payloads)
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None, None, "length"]


async def test_async_client_streaming_and_not(shared_sim: SimPod) -> None:
    c = aclient(shared_sim)
    r = await c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert r.object == "text_completion" and r.usage is not None
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"

    async def one(i: int) -> int:
        s = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"question {i}"}],
            max_completion_tokens=6,
            stream=True,
        )
        n = 0
        async for ch in s:
            if ch.choices and ch.choices[0].delta.content:
                n += 1
        return n

    assert await asyncio.gather(*(one(i) for i in range(8))) == [6] * 8
    await c.close()


def test_output_length_without_max_tokens_is_deterministic(sim_factory: SimFactory) -> None:
    with sim_factory("--time-scale", "0.02", "--output-len", "uniform:5:40", "--seed", "3") as pod:
        c = client(pod)
        msgs = [{"role": "user", "content": "tell me something"}]
        a = c.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
        b = c.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
        assert a.usage is not None and b.usage is not None
        assert 5 <= a.usage.completion_tokens <= 40
        assert a.usage.completion_tokens == b.usage.completion_tokens
        assert a.choices[0].message.content == b.choices[0].message.content
        assert a.choices[0].finish_reason == "stop"
        other = c.chat.completions.create(model=MODEL, messages=msgs, seed=99)  # type: ignore[arg-type]
        assert other.choices[0].message.content != a.choices[0].message.content


def test_models_and_health(shared_sim: SimPod) -> None:
    models = client(shared_sim).models.list()
    ids = {m.id: m for m in models.data}
    assert MODEL in ids and "preloaded" in ids
    assert ids["preloaded"].model_extra is not None
    assert ids["preloaded"].model_extra["parent"] == MODEL
    assert ids[MODEL].model_extra is not None and ids[MODEL].model_extra["parent"] is None
    status, headers, _ = get(f"{shared_sim.url}/health")
    assert status == 200 and headers["x-inference-pod"] == "sim-shared"
    status, _, body = get(f"{shared_sim.url}/version")
    assert status == 200 and json.loads(body)["engine"] == "vllm"


def test_embeddings_are_deterministic(shared_sim: SimPod) -> None:
    c = client(shared_sim)
    a = c.embeddings.create(model=MODEL, input="hello")
    b = c.embeddings.create(model=MODEL, input=["hello", "other"])
    assert a.data[0].embedding == b.data[0].embedding
    assert a.data[0].embedding != b.data[1].embedding


VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0]  # fmt: skip
VLLM_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


def bounds(fams: dict, name: str) -> list[float]:
    return [
        float(s.labels["le"])
        for s in fams[name].samples
        if s.name == f"{name}_bucket" and s.labels["le"] != "+Inf"
    ]


def test_vllm_metric_names_types_labels_and_buckets(shared_sim: SimPod) -> None:
    client(shared_sim).completions.create(model=MODEL, prompt="metrics please", max_tokens=4)
    fams = metrics(shared_sim)
    types = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:gpu_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:time_per_output_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "vllm:lora_requests_info": "gauge",
        "vllm:cache_config_info": "gauge",
    }
    for name, typ in types.items():
        assert name in fams, name
        assert fams[name].type == typ, name
    # exposed names as vLLM's prometheus_client renders them
    assert sample(fams, "vllm:prompt_tokens_total", model_name=MODEL, engine="0") > 0
    assert sample(fams, "vllm:generation_tokens_total", model_name=MODEL) >= 4
    assert sample(fams, "vllm:request_success_total", finished_reason="length") >= 1
    assert sample(fams, "vllm:num_requests_running", model_name=MODEL) == 0
    assert bounds(fams, "vllm:time_to_first_token_seconds") == VLLM_TTFT
    assert bounds(fams, "vllm:inter_token_latency_seconds") == VLLM_ITL
    assert bounds(fams, "vllm:time_per_output_token_seconds") == VLLM_ITL
    assert bounds(fams, "vllm:e2e_request_latency_seconds") == VLLM_LATENCY
    assert bounds(fams, "vllm:request_queue_time_seconds") == VLLM_LATENCY
    cache = fams["vllm:cache_config_info"].samples[0]
    assert cache.labels["block_size"] == "16" and cache.labels["num_gpu_blocks"] == "8192"
    lora = fams["vllm:lora_requests_info"].samples[0]
    assert set(lora.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


def test_repeated_long_prompt_hits_the_prefix_cache(sim_factory: SimFactory) -> None:
    # time scale 1: a 7k-token prefill (~0.5 s) against a cached one (~10 ms)
    with sim_factory("--time-scale", "1") as pod:
        c = client(pod)
        msgs = [{"role": "user", "content": LONG_PROMPT}]
        before = metrics(pod)
        a = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)  # type: ignore[arg-type]
        mid = metrics(pod)
        s1 = state(pod)
        b = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)  # type: ignore[arg-type]
        after = metrics(pod)
        s2 = state(pod)
    assert a.usage is not None and b.usage is not None
    assert a.usage.prompt_tokens > 1000
    assert a.usage.prompt_tokens_details is not None and b.usage.prompt_tokens_details is not None
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached >= a.usage.prompt_tokens - 16

    def hits(f: dict) -> float:
        return sample(f, "vllm:prefix_cache_hits_total")

    assert hits(before) == hits(mid) == 0
    assert hits(after) == cached
    # the prefill work the engine did: the second request computed only the uncached tail
    assert s2["prefill_computed_tokens"] - s1["prefill_computed_tokens"] < 20

    def ttft_sum(f: dict) -> float:
        return sample(f, "vllm:time_to_first_token_seconds_sum")

    first_ttft = ttft_sum(mid) - ttft_sum(before)
    second_ttft = ttft_sum(after) - ttft_sum(mid)
    assert second_ttft < first_ttft


def test_responses_api(shared_sim: SimPod) -> None:
    """``POST /v1/responses``: a JSON answer and a stream in the Responses API's shape, with
    ``usage.input_tokens``/``output_tokens`` (the stream's in ``response.completed``)."""
    c = client(shared_sim)
    r = c.responses.create(model=MODEL, input="Hello there!", max_output_tokens=4)
    assert r.object == "response" and r.status == "incomplete"  # stopped at max_output_tokens
    assert r.usage is not None and r.usage.output_tokens == 4 and r.usage.input_tokens > 0
    assert len(r.output_text.split()) == 4
    events = list(
        c.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            instructions="be brief",
            max_output_tokens=3,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds.count("response.output_text.delta") == 3
    assert kinds[-1] == "response.completed"
    done = events[-1]
    assert done.type == "response.completed" and done.response.usage is not None
    assert done.response.usage.output_tokens == 3
    assert [e.sequence_number for e in events] == list(range(len(events)))
