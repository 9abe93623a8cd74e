"""`matrixinfer demo` as a user runs it: the local cluster (emulated API server, the real
operator, pods as simulator processes), extproc and Envoy, from the shipped example: one Model
with an aggregated vLLM backend, an aggregated SGLang backend and a prefill/decode backend."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controllers.webhooks import rules
from matrixinfer.process import free_port, http_ok, wait_until
from matrixinfer.resources import project_file
from matrixinfer.testing.demo import DemoProcess

pytestmark = pytest.mark.timeout(240)

STARTED = re.compile(r"pod (\S+): started (\S+) at (\S+)")
POD_HEADER = "x-inference-pod"
PODS = [
    "demo-model-large-0-server-0-0",
    "demo-model-pd-0-decode-0-0",
    "demo-model-pd-0-prefill-0-0",
    "demo-model-small-0-server-0-0",
]
"""The example's pods: one per aggregated backend, a prefill and a decode pod."""
DECODE = "demo-model-pd-0-decode-0-0"


def _demo_argv(run_dir: Path, *extra: str, first_host: str = "127.0.0.70") -> list[str]:
    return [
        sys.executable, "-m", "matrixinfer.cli", "demo", "--port", str(free_port()),
        "--first-host", first_host, "--run-dir", str(run_dir), *extra,
    ]  # fmt: skip


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MATRIXINFER_STATE": str(tmp_path / "state.json")}


def test_demo_without_a_terminal_sends_requests_and_exits_zero(tmp_path: Path) -> None:
    proc = subprocess.run(
        _demo_argv(tmp_path, "--requests", "3"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(tmp_path),
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "created Model default/demo-model" in out
    started = STARTED.findall(out)
    assert sorted(p for p, _, _ in started) == PODS, out
    assert len({addr.rsplit(":")[0] for _, _, addr in started}) == 4  # one loopback address each
    assert "curl -s http://127.0.0.1:" in out and "from openai import OpenAI" in out
    # the console, started beside the gateway: its URL signs in with the token it was given
    console = re.search(r"console \(deploy, watch and chat in a browser\): (\S+)", out)
    assert console is not None, out
    token = (tmp_path / "console.token").read_text().strip()
    assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/ui/index\.html#token={token}", console[1])
    assert "Application startup complete" in (tmp_path / "console.log").read_text()
    answers = re.findall(r"request (\d)/3 \((chat|stream)\) -> (demo-model-\S+): '(.+)'", out)
    assert len(answers) == 3 and all(a[3].strip() for a in answers), out
    assert "stream" in {a[1] for a in answers}
    assert "stopped: pods, controllers, local API server, extproc and Envoy" in out
    assert not (tmp_path / "state.json").exists()  # the state file goes with the cluster


class Demo(DemoProcess):
    """``matrixinfer demo --requests 0`` on a copy of ``source`` (default examples/demo)."""

    def __init__(self, tmp_path: Path, first_host: str, source: Path | None = None) -> None:
        self.dir = tmp_path / "config"  # the Model and its claim's folder (volumes/)
        shutil.copytree(source or project_file("examples/demo"), self.dir)
        super().__init__(
            tmp_path / "run", self.dir, state=tmp_path / "state.json", first_host=first_host
        )
        assert "console (" not in self.text and not (self.run_dir / "console.log").exists()

    def get(self, kind: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "matrixinfer.cli", "get", kind],
            capture_output=True, text=True, timeout=30, env=self.env,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def pods(self) -> dict[str, list[str]]:
        """name -> the other columns of ``matrixinfer get pods``."""
        rows = [line.split() for line in self.get("pods").splitlines()[1:]]
        return {r[1]: r[2:] for r in rows}

    def edit(self, change: dict[str, int]) -> None:
        """Set ``minReplicas`` of the named backends in the Model file."""
        doc = yaml.safe_load((self.dir / "model.yaml").read_text())
        for b in doc["spec"]["backends"]:
            if b["name"] in change:
                b["minReplicas"] = change[b["name"]]
        (self.dir / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(tmp_path_factory.mktemp("demo"), first_host="127.0.0.80")
    try:
        yield d
    finally:
        d.stop()


def _chat_pod(url: str, model: str = "demo-model") -> str:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4
    )
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content
    client.close()
    return str(raw.headers[POD_HEADER])


def _served(demo: Demo, pod: str | None = None) -> bool:
    """One request answered, by ``pod`` (None: by any pod the API lists)."""
    from openai import OpenAIError

    try:
        got = _chat_pod(demo.url)
    except OpenAIError:
        return False
    return got == pod if pod is not None else got in demo.pods()


def _paired(demo: Demo) -> float:
    """Requests the decode pod's PD proxy served after a prefill on the prefill pod."""
    ip = demo.pods()[DECODE][2]
    with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "matrixinfer_pd_requests_total"
        and sample.labels.get("outcome") == "paired"
    )


def test_the_model_answers_chat_and_streams_from_every_backend(demo: Demo) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=demo.url, api_key="unused", max_retries=0, timeout=30)
    with client.chat.completions.with_streaming_response.create(
        model="demo-model",
        messages=[{"role": "user", "content": "Stream, please."}],
        max_tokens=12,
        stream=True,
    ) as resp:
        assert resp.headers[POD_HEADER].startswith("demo-model-")
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text.strip()
    listed = {m.id for m in client.models.list()}
    assert {"demo-model", "demo-lora-a", "demo-lora-b"} <= listed
    client.close()
    # 50/20/30 between the backends: 60 requests miss the 20 % one with odds below 2e-6
    paired = _paired(demo)
    served = {_chat_pod(demo.url) for _ in range(60)}
    assert {p.split("-")[2] for p in served} == {"large", "small", "pd"}, served
    # the pd backend's answers come from the decode pod, after a prefill on the prefill pod
    assert "demo-model-pd-0-prefill-0-0" not in served and DECODE in served
    assert _paired(demo) > paired
    assert _chat_pod(demo.url, "demo-lora-b").startswith("demo-model-")


def test_get_shows_what_the_controllers_made(demo: Demo) -> None:
    models = demo.get("models").splitlines()
    assert models[0].split() == ["NAMESPACE", "NAME", "BACKENDS", "READY", "STATUS", "AGE"]
    row = models[1].split()
    assert row[:5] == ["default", "demo-model", "large,small,pd", "3/3", "Active"], models
    infers = {r.split()[1]: r.split()[2] for r in demo.get("modelinfers").splitlines()[1:]}
    assert infers == {"demo-model-large": "1/1", "demo-model-small": "1/1", "demo-model-pd": "1/1"}
    pods = demo.pods()
    assert sorted(pods) == PODS
    assert all(cols[:2] == ["1/1", "Running"] for cols in pods.values())
    assert all(cols[2].startswith("127.0.0.") for cols in pods.values())
    routes = demo.get("modelroutes")
    for weight in ("demo-model-large=50", "demo-model-small=20", "demo-model-pd=30"):
        assert weight in routes, routes


def test_editing_replicas_adds_and_removes_pods(demo: Demo) -> None:
    mark = len(demo.lines)
    demo.edit({"small": 2})
    demo.wait_for("configured Model default/demo-model", after=mark)
    demo.wait_for("pod demo-model-small-1-server-0-0: ready", after=mark)
    wait_until(lambda: len(demo.pods()) == 5, 30, "a fifth pod")
    new_ip = demo.pods()["demo-model-small-1-server-0-0"][2]
    # the gateway routes to it (the small backend now has two pods for its 20 %)
    wait_until(lambda: _served(demo, "demo-model-small-1-server-0-0"), 60, "the new pod serves")
    mark = len(demo.lines)
    demo.edit({"small": 1})  # back to the example
    demo.wait_for("deleted, process stopped", after=mark)
    wait_until(lambda: len(demo.pods()) == 4, 30, "four pods left")
    gone = "demo-model-small-1-server-0-0"
    assert gone not in demo.pods()
    wait_until(lambda: not http_ok(f"http://{new_ip}:8000/health", 0.3), 10, "its process gone")
    served = {_chat_pod(demo.url) for _ in range(10)}
    assert gone not in served


def test_a_bad_model_file_gets_the_webhooks_message_and_the_stack_keeps_serving(
    demo: Demo,
) -> None:
    good = (demo.dir / "model.yaml").read_text()
    doc = yaml.safe_load(good)
    doc["spec"]["backends"][1]["routeWeight"] = None  # weights: all set or none
    del doc["spec"]["backends"][1]["routeWeight"]
    expected = rules.parse(doc)
    assert isinstance(expected, rules.Review)
    mark = len(demo.lines)
    (demo.dir / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    text = demo.wait_for("configuration rejected", after=mark)
    assert expected.message() in text, text
    assert 'admission webhook "validate-model" denied the request' in text
    assert "model.yaml (document 1): Model default/demo-model" in text
    pods = set(demo.pods())
    assert len(pods) == 4
    assert _chat_pod(demo.url) in pods  # the last good state stays in force
    mark = len(demo.lines)
    (demo.dir / "model.yaml").write_text(good)
    time.sleep(1.5)  # nothing to wait for: the good file equals what is applied
    assert "configuration rejected" not in "".join(demo.lines[mark:])
    assert _chat_pod(demo.url) in pods


def test_a_crashed_engine_restarts_in_place(demo: Demo) -> None:
    pods = demo.pods()
    victim = "demo-model-small-0-server-0-0"
    assert victim in pods
    mark = len(demo.lines)
    os.kill(_pid_of(victim, demo.env["MATRIXINFER_STATE"]), signal.SIGKILL)
    demo.wait_for(
        f"pod {victim}: container engine exited with code 137", after=mark
    )  # restartPolicy Always: the kubelet restarts it after its back-off (10 s)
    demo.wait_for("restarting in 10s (CrashLoopBackOff, restart 1)", after=mark)
    demo.wait_for(f"pod {victim}: ready", 60, after=mark)
    wait_until(lambda: len(demo.pods()) == 4, 30, "four pods")
    assert demo.pods()[victim][:2] == ["1/1", "Running"]


def _pid_of(pod: str, state: str) -> int:
    """The pid of the simulator process running ``pod`` (its command line names the pod) of
    this test's demo (its environment holds the demo's ``MATRIXINFER_STATE``: another demo on
    the machine may run a pod of the same name)."""
    mine = f"MATRIXINFER_STATE={state}".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            if not (b"sim" in argv and pod.encode() in argv and b"--pod-name" in argv):
                continue
            if mine in (cmdline.parent / "environ").read_bytes().split(b"\0"):
                return int(cmdline.parent.name)
        except OSError:
            continue
    raise AssertionError(f"no process runs {pod}")


def _none_left(demo: Demo, kind: str) -> bool:
    return demo.get(kind).startswith("No ")


def _gone(ip: str) -> bool:
    return not http_ok(f"http://{ip}:8000/health", 0.3)


def test_removing_the_model_file_removes_everything_it_made(demo: Demo) -> None:
    addresses = [cols[2] for cols in demo.pods().values()]
    mark = len(demo.lines)
    (demo.dir / "model.yaml").rename(demo.dir / "model.yaml.off")
    demo.wait_for("deleted Model default/demo-model", after=mark)
    for kind in ("models", "modelinfers", "modelservers", "modelroutes", "pods"):
        wait_until(functools.partial(_none_left, demo, kind), 30, f"no {kind} left")
    for ip in addresses:
        wait_until(functools.partial(_gone, ip), 10, ip)
    (demo.dir / "model.yaml.off").rename(demo.dir / "model.yaml")
    demo.wait_for("created Model default/demo-model", after=mark)
    wait_until(lambda: len(demo.pods()) == 4, 60, "four pods again")
    wait_until(lambda: _served(demo), 60, "served again")


def test_live_view_stops_everything_on_sigterm(demo: Demo) -> None:
    addresses = [cols[2] for cols in demo.pods().values()]
    demo.stop()
    assert demo.proc.returncode == 0, demo.text
    demo.reader.join(10)
    assert "stopped: pods, controllers, local API server, extproc and Envoy" in demo.text
    wait_until(lambda: not http_ok(demo.url + "/models", timeout=0.3), 5, "Envoy gone")
    for ip in addresses:
        assert not http_ok(f"http://{ip}:8000/health", timeout=0.3), ip
    assert (demo.run_dir / "extproc.log").exists()
    assert list(demo.run_dir.glob("pod-default-demo-model-*.log"))
    done = subprocess.run(
        [sys.executable, "-m", "matrixinfer.cli", "get", "pods"],
        capture_output=True, text=True, timeout=30, env=demo.env,
    )  # fmt: skip
    assert done.returncode == 1 and "no running local cluster" in done.stdout
