"""Fault injection, readiness states and OpenAI-style errors for bad input."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import openai
import pytest

from matrixinfer.process import http_ok, wait_until
from sim.fleet import SimPod

from .conftest import MODEL, SimFactory, get, post, state

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def client(pod: SimPod, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pod.url}/v1", api_key="sim", max_retries=0, timeout=timeout)


def set_fault(pod: SimPod, **kw: object) -> dict:
    status, _, body = post(f"{pod.url}/sim/fault", kw)
    assert status == 200, body
    return dict(json.loads(body))


def assert_error(resp: tuple[int, dict[str, str], bytes], status: int, pod: str) -> dict:
    code, headers, body = resp
    assert code == status, body
    assert headers["x-inference-pod"] == pod
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    return dict(err)


def test_runtime_faults(sim_factory: SimFactory) -> None:
    with sim_factory("--time-scale", "0.05", name="faulty") as pod:
        url = f"{pod.url}/v1/chat/completions"
        assert post(url, CHAT)[0] == 200

        set_fault(pod, error_rate=1.0)
        err = assert_error(post(url, CHAT), 500, "faulty")
        assert err["type"] == "InternalServerError"
        with pytest.raises(openai.InternalServerError):
            client(pod).chat.completions.create(**CHAT)  # type: ignore[call-overload]

        set_fault(pod, error_rate=0.0, reset_rate=1.0)
        conn = http.client.HTTPConnection(pod.host, pod.port, timeout=5)
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            conn.request("POST", "/v1/chat/completions", json.dumps(CHAT))
            conn.getresponse().read()
        conn.close()
        with pytest.raises(openai.APIConnectionError):
            client(pod).chat.completions.create(**CHAT)  # type: ignore[call-overload]

        set_fault(pod, reset_rate=0.0, hang_rate=1.0)
        with pytest.raises(openai.APITimeoutError):
            client(pod, timeout=0.5).chat.completions.create(**CHAT)  # type: ignore[call-overload]

        set_fault(pod, hang_rate=0.0, not_ready=True)
        status, headers, _ = get(f"{pod.url}/health")
        assert status == 503 and headers["x-inference-pod"] == "faulty"
        assert post(url, CHAT)[0] == 200  # readiness only: the engine still serves
        set_fault(pod, not_ready=False)
        assert get(f"{pod.url}/health")[0] == 200
        assert post(url, CHAT)[0] == 200

        assert_error(post(f"{pod.url}/sim/fault", {"error_rate": 2}), 400, "faulty")
        assert_error(post(f"{pod.url}/sim/fault", {"nonsense": 1}), 400, "faulty")


def test_partial_error_rate_is_seeded(sim_factory: SimFactory) -> None:
    with sim_factory("--time-scale", "0.02", "--error-rate", "0.5", "--seed", "1") as pod:
        codes = [post(f"{pod.url}/v1/chat/completions", CHAT)[0] for _ in range(40)]
    assert set(codes) == {200, 500}
    assert 8 <= codes.count(500) <= 32


def test_slow_start_and_not_ready_flag(sim_factory: SimFactory) -> None:
    slow_start = 3.0
    # the sim's window starts after this (CLOCK_MONOTONIC is shared by the processes): an answer
    # received less than slow_start after it was certainly given inside the window. A machine
    # so slow that the sim takes longer than that to listen skips the check (it cannot tell)
    launched = time.monotonic()
    with sim_factory(
        "--slow-start", str(slow_start), "--time-scale", "0.05", wait_health=False
    ) as pod:
        first = get(f"{pod.url}/health")
        if time.monotonic() - launched < slow_start:
            assert first[0] == 503
        wait_until(lambda: http_ok(f"{pod.url}/health"), 30, "slow start to end")
        assert post(f"{pod.url}/v1/chat/completions", CHAT)[0] == 200
    with sim_factory("--not-ready", wait_health=False) as pod:
        assert get(f"{pod.url}/health")[0] == 503
        set_fault(pod, not_ready=False)
        assert get(f"{pod.url}/health")[0] == 200


def test_bad_input_errors(sim_factory: SimFactory) -> None:
    with sim_factory("--max-model-len", "64", "--time-scale", "0.05", name="strict") as pod:
        chat = f"{pod.url}/v1/chat/completions"
        comp = f"{pod.url}/v1/completions"
        assert_error(post(chat, b'{"model": '), 400, "strict")
        assert_error(post(chat, b"[1, 2]"), 400, "strict")
        err = assert_error(post(chat, {"model": MODEL}), 400, "strict")
        assert err["param"] == "messages" and "messages" in err["message"]
        assert_error(post(chat, {"model": MODEL, "messages": []}), 400, "strict")
        assert_error(post(chat, {**CHAT, "max_tokens": 0}), 400, "strict")
        assert_error(post(chat, {**CHAT, "n": 2}), 400, "strict")
        assert_error(post(comp, {"model": MODEL}), 400, "strict")
        assert_error(post(comp, {"model": MODEL, "prompt": ""}), 400, "strict")
        err = assert_error(post(chat, {**CHAT, "model": "nope"}), 404, "strict")
        assert err["type"] == "NotFoundError" and "nope" in err["message"]
        long_prompt = " ".join(["word"] * 80)
        err = assert_error(post(comp, {"model": MODEL, "prompt": long_prompt}), 400, "strict")
        assert "maximum context length is 64" in err["message"]
        err = assert_error(
            post(comp, {"model": MODEL, "prompt": "short", "max_tokens": 100}), 400, "strict"
        )
        assert err["param"] == "max_tokens"
        assert_error(post(f"{pod.url}/v1/load_lora_adapter", {"lora_name": "x"}), 400, "strict")
        assert_error(post(f"{pod.url}/v1/unload_lora_adapter", {"lora_name": "x"}), 404, "strict")
        assert get(f"{pod.url}/health")[0] == 200  # and still alive
        with pytest.raises(openai.BadRequestError):
            client(pod).completions.create(model=MODEL, prompt=long_prompt)
        with pytest.raises(openai.NotFoundError):
            client(pod).completions.create(model="nope", prompt="x")


def test_waiting_queue_over_max_waiting_is_429(sim_factory: SimFactory) -> None:
    args = ("--max-num-seqs", "1", "--max-waiting", "1", "--time-scale", "1")
    with sim_factory(*args, name="busy") as pod:
        c = client(pod)
        msgs = [{"role": "user", "content": "long answer"}]
        a = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2000, stream=True)  # type: ignore[arg-type]
        next(iter(a))
        b = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2000, stream=True)  # type: ignore[arg-type]
        wait_until(lambda: state(pod)["waiting"] == 1, 10, "second request queued")
        err = assert_error(post(f"{pod.url}/v1/chat/completions", CHAT), 429, "busy")
        assert "waiting queue is full" in err["message"]
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)  # type: ignore[arg-type]
        a.close()
        b.close()
        wait_until(lambda: state(pod)["running"] + state(pod)["waiting"] == 0, 10, "aborts")
        assert state(pod)["success"]["abort"] == 2


def test_process_age_counts_from_the_process_start() -> None:
    code = "import time; time.sleep(1.5); from sim.server import process_age; print(process_age())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) >= 1.5


async def test_slow_start_counts_from_the_process_start() -> None:
    """An engine's start-up includes its process's own start (imports on a busy machine): a
    slow start shorter than this process's age is already over when the server starts."""
    from aiohttp.test_utils import TestClient, TestServer

    from sim.config import SimConfig
    from sim.server import SimServer, process_age

    age = process_age()
    assert age > 0.2  # pytest itself took that long to get here
    server = SimServer(SimConfig(slow_start=age / 2))
    async with TestClient(TestServer(server.app())) as client:
        assert (await client.get("/health")).status == 200
    server = SimServer(SimConfig(slow_start=age + 600))  # still starting
    async with TestClient(TestServer(server.app())) as client:
        assert (await client.get("/health")).status == 503
