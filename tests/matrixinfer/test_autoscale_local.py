"""The autoscaler in the local stack: ``matrixinfer demo`` on examples/demo/autoscale (a Model
whose inline policy scales one simulator backend between 0 and 3 pods on the gateway's metrics),
driven through Envoy with the official openai client. The policy's windows are shortened (here,
in a copy of the example) and the sync interval set by the demo's flags, so that a scale takes
seconds; every check polls the API server for a state, none measures time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from matrixinfer.process import free_port
from matrixinfer.resources import project_file
from matrixinfer.testing.demo import DemoProcess

pytestmark = pytest.mark.timeout(480)

MODEL = "scaled-model"
TARGET = "scaled-model-sim"  # the backend's ModelInfer (and ModelServer)
MI_PATH = f"/apis/workload.matrixinfer.ai/v1alpha1/namespaces/default/modelinfers/{TARGET}"
POLICY_PATH = (
    f"/apis/registry.matrixinfer.ai/v1alpha1/namespaces/default/autoscalingpolicies/{MODEL}"
)
SCALE_UPS = {"WakeUp", "ScaleUp", "PanicScaleUp"}


def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {within:.0f}s: {what}")


class ScaledDemo(DemoProcess):
    """``matrixinfer demo --requests 0`` on the directory ``config``, with ``extra`` flags."""

    def __init__(self, tmp_path: Path, config: Path, first_host: str, *extra: str) -> None:
        super().__init__(
            tmp_path / "run", config, *extra, state=tmp_path / "state.json",
            first_host=first_host,
        )  # fmt: skip

    def replicas(self) -> int:
        return int(self.api(MI_PATH)["spec"]["replicas"])

    def ready_pods(self) -> int:
        pods = self.api("/api/v1/namespaces/default/pods")["items"]
        return sum(
            1
            for p in pods
            if p["metadata"].get("labels", {}).get("workload.matrixinfer.ai/model-infer") == TARGET
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or ()
            )
        )

    def pods(self) -> int:
        return sum(
            1
            for p in self.api("/api/v1/namespaces/default/pods")["items"]
            if p["metadata"].get("labels", {}).get("workload.matrixinfer.ai/model-infer") == TARGET
        )

    def scale_events(self) -> list[str]:
        """The reasons of the autoscaler's Events on the ModelInfer, oldest first."""
        items = self.api("/api/v1/namespaces/default/events")["items"]
        mine = [
            e
            for e in items
            if (e.get("involvedObject") or {}).get("kind") == "ModelInfer"
            and (e.get("involvedObject") or {}).get("name") == TARGET
            and "replicas" in str(e.get("message"))
        ]
        return [str(e["reason"]) for e in mine]

    def policy_message(self) -> str:
        status = self.api(POLICY_PATH).get("status") or {}
        active = [c for c in status.get("conditions") or () if c.get("type") == "Active"]
        return str(active[0].get("message")) if active else ""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledDemo]:
    """The demo on a copy of examples/demo/autoscale with short windows."""
    tmp_path = tmp_path_factory.mktemp("scaled")
    config = tmp_path / "config"
    config.mkdir()
    doc = yaml.safe_load(project_file("examples/demo/autoscale/model.yaml").read_text())
    behavior = doc["spec"]["autoscalingPolicy"]["spec"]["behavior"]
    # a scale-up needs 4 s of demand (a burst shorter than that does not scale),
    # a scale-down (and zero) 3 s without; one pod per second either way
    behavior["scaleUp"]["stablePolicy"].update(period="1s", stabilizationWindow="4s")
    behavior["scaleDown"].update(period="1s", stabilizationWindow="3s")
    (config / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    d = ScaledDemo(
        tmp_path, config, "127.0.0.150", "--time-scale", "0.5", "--autoscale-interval", "500ms",
        "--autoscale-stable-window", "2s", "--autoscale-panic-window", "1s",
    )  # fmt: skip
    try:
        yield d
    finally:
        d.stop()


def _chat(url: str, max_tokens: int = 4) -> str:
    """One chat request through Envoy; the pod that answered it."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=90)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=max_tokens
        )
        assert raw.status_code == 200
        assert raw.parse().choices[0].message.content
        return str(raw.headers["x-inference-pod"])
    finally:
        client.close()


def _idle(demo: ScaledDemo) -> bool:
    """The autoscaler's last sync saw no request in flight or waiting."""
    message = demo.policy_message()
    return "gateway_in_flight_requests=0," in message and "gateway_queue_length=0" in message


def _try_chat(url: str, max_tokens: int = 4) -> str:
    """The pod that answered, or ``"saturated"`` for the gateway's 503 when every pod stayed
    saturated for the whole wait for room (``--wake-timeout``)."""
    from openai import InternalServerError

    try:
        return _chat(url, max_tokens)
    except InternalServerError as exc:
        assert exc.status_code == 503 and "saturated" in str(exc), exc
        return "saturated"


def test_fifty_concurrent_first_requests_wake_one_scale_up(demo: ScaledDemo) -> None:
    assert demo.replicas() == 0 and demo.pods() == 0  # minReplicas 0: the Model starts at zero
    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(lambda _: _try_chat(demo.url), range(50)))
    # every request went to the one pod the wake-up started: the burst released at once looks
    # saturated to the gateway (waiting >= 8 between two scrapes), so woken requests wait on for
    # room, and a request of the burst that only arrives once the pod is ready waits behind
    # them (tests/extproc/test_wake.py); none is shed or lost
    assert outcomes == [f"{TARGET}-0-server-0-0"] * 50, outcomes
    eventually(lambda: _idle(demo), 30, "a sync after the requests")
    eventually(lambda: "WakeUp" in demo.scale_events(), 30, "the WakeUp Event")
    ups = [r for r in demo.scale_events() if r in SCALE_UPS]
    assert ups == ["WakeUp"], demo.scale_events()
    assert demo.replicas() == 1


def test_load_through_envoy_raises_replicas(demo: ScaledDemo) -> None:
    stop = threading.Event()
    answered: list[str] = []

    def client() -> None:
        while not stop.is_set():
            answered.append(_try_chat(demo.url, max_tokens=256))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # not a burst
    try:
        # 12 requests in flight for one pod per 4: up to maxReplicas 3, one pod per second
        eventually(lambda: demo.replicas() == 3, 240, "3 replicas under load")
        eventually(lambda: demo.ready_pods() == 3, 60, "3 ready pods")
        eventually(lambda: len(set(answered) - {"saturated"}) == 3, 60, "every pod answering")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert "ScaleUp" in demo.scale_events(), demo.scale_events()


def test_idleness_lowers_replicas_to_zero_and_a_request_wakes_it_again(
    demo: ScaledDemo,
) -> None:
    eventually(lambda: demo.replicas() == 0, 120, "scaled to zero after the idle window")
    eventually(lambda: demo.pods() == 0, 60, "the pods stopped")
    events = demo.scale_events()
    assert "ScaleToZero" in events, events
    wakes = events.count("WakeUp")
    # a request at zero waits for the wake-up and is answered, not lost
    assert _chat(demo.url).startswith(f"{TARGET}-")
    assert demo.replicas() == 1
    eventually(lambda: demo.scale_events().count("WakeUp") == wakes + 1, 30, "one more WakeUp")


def test_demo_sends_its_requests_to_the_example_model_at_zero(tmp_path: Path) -> None:
    """The documented way to try it: the shipped example as it is; the demo's requests go to
    its Model (at zero: the first one wakes it) and are answered."""
    done = subprocess.run(
        [
            sys.executable, "-m", "matrixinfer.cli", "demo", "--requests", "2", "--no-console",
            "--port", str(free_port()), "--first-host", "127.0.0.170",
            "--run-dir", str(tmp_path / "run"),
            "--examples", str(project_file("examples/demo/autoscale")),
            "--autoscale-interval", "1s",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
        env={**os.environ, "MATRIXINFER_STATE": str(tmp_path / "state.json")},
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert '"model": "scaled-model"' in out  # the curl line names the example's Model
    answers = re.findall(rf"request \d/2 \((?:chat|stream)\) -> ({TARGET}-\S+): '(.+)'", out)
    assert len(answers) == 2, out


def test_a_request_waits_for_a_pod_that_takes_time_to_start(tmp_path: Path) -> None:
    """``--pod-start-delay``: the woken pod runs but is not Ready for a while (its simulator's
    /health answers 503, as an engine loading its model); the request at zero waits through
    that and is answered by it."""
    demo = ScaledDemo(
        tmp_path, project_file("examples/demo/autoscale"), "127.0.0.190",
        "--autoscale-interval", "500ms", "--pod-start-delay", "5s",
    )  # fmt: skip
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_chat, demo.url)
            eventually(lambda: demo.pods() == 1, 60, "the woken pod")
            assert demo.ready_pods() == 0 and not answer.done()  # started, not Ready yet
            assert answer.result(timeout=90) == f"{TARGET}-0-server-0-0"
        assert demo.ready_pods() == 1
    finally:
        demo.stop()
