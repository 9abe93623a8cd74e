"""The local cluster's pure parts: the pod → simulator command, admission of a directory's
documents (the webhooks' messages), and ``matrixinfer get``'s tables."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

import crds
from controllers.model.planner import desired
from controllers.webhooks import rules
from matrixinfer.applier import DirectoryError, admit, read_directory
from matrixinfer.get import kind_of, table
from matrixinfer.kubelet import Addresses, sim_command
from matrixinfer.resources import project_file

DEMO = project_file("examples/demo/model.yaml")


def demo_pods() -> dict[str, dict[str, Any]]:
    """Backend name -> the entry pod (template) the controllers make for the demo Model."""
    model = crds.parse_object(yaml.safe_load(DEMO.read_text()), "demo")
    assert isinstance(model, crds.Model)
    out: dict[str, dict[str, Any]] = {}
    for child in desired(model).children:
        if child.ref.kind == "ModelInfer":
            role = child.manifest["spec"]["template"]["roles"][0]
            pod = {**role["entryTemplate"], "metadata": {"name": f"{child.ref.name}-0-server-0-0"}}
            out[str(child.backend)] = pod
    return out


def test_vllm_pod_runs_the_simulator_with_its_model_port_adapters_and_known_flags() -> None:
    pod = demo_pods()["large"]
    cmd = sim_command(pod, "127.0.0.10", ["--time-scale", "0.05"], python="py")
    argv = cmd.argv
    assert argv[:3] == ["py", "-m", "sim"]
    assert argv[argv.index("--model") + 1] == "demo-model"  # --served-model-name, not the URI
    assert argv[argv.index("--engine") + 1] == "vllm"
    assert argv[argv.index("--host") + 1] == "127.0.0.10"
    assert argv[argv.index("--port") + 1] == "8000" and cmd.port == 8000
    assert argv[argv.index("--pod-name") + 1] == "demo-model-large-0-server-0-0"
    assert "--lora-modules" not in argv  # the runtime sidecar loads the Model's adapters
    # the backend's engine args the simulator knows are passed on, in the --flag=value form
    assert "--max-num-seqs" in argv and argv[argv.index("--max-num-seqs") + 1] == "64"
    assert "--enable-prefix-caching" in argv
    assert argv[-2:] == ["--time-scale", "0.05"]  # the kubelet's own flags come last


def test_sglang_pod_serves_the_sglang_api_and_lists_what_it_ignores() -> None:
    pod = demo_pods()["small"]
    cmd = sim_command(pod, "127.0.0.11")
    assert cmd.argv[cmd.argv.index("--engine") + 1] == "sglang"
    assert cmd.argv[cmd.argv.index("--max-num-seqs") + 1] == "8"
    pod["spec"]["containers"][0]["args"] += ["--lora-paths", "a=/x/a"]  # SGLang's adapters
    lora = sim_command(pod, "127.0.0.11").argv
    assert lora[lora.index("--lora-modules") + 1] == "a=/x/a"
    pod["spec"]["containers"][0]["args"] += ["--tensor-parallel-size", "2"]
    assert sim_command(pod, "127.0.0.11").ignored == ["--tensor-parallel-size", "2"]


def test_prefill_and_decode_pods_run_their_role() -> None:
    pod = demo_pods()["large"]
    assert "--role" not in sim_command(pod, "127.0.0.10").argv
    pod["metadata"]["labels"] = {"workload.matrixinfer.ai/role": "decode"}
    argv = sim_command(pod, "127.0.0.10").argv
    assert argv[argv.index("--role") + 1] == "decode"


def test_addresses_skip_taken_ones_and_are_reused_after_release() -> None:
    a = Addresses("127.0.99.10")
    first, second = a.take(8000), a.take(8000)
    assert (first, second) == ("127.0.99.10", "127.0.99.11")
    a.release(first)
    assert a.take(8000) == first
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        Addresses("10.0.0.1")


@pytest.mark.parametrize(
    "name",
    ["model-route-weight-partial.yaml", "model-duplicate-backend.yaml", "model-bad-uri.yaml"],
)
def test_bad_model_gets_the_webhooks_message(name: str) -> None:
    raw = yaml.safe_load(project_file(f"examples/invalid/{name}").read_text())
    review, _ = admit(raw, {})
    expected = rules.parse(raw)
    assert isinstance(expected, rules.Review) and expected.denials
    assert not review.allowed and review.message() == expected.message()


def test_model_whose_adapter_another_model_serves_is_denied() -> None:
    raw = yaml.safe_load(DEMO.read_text())
    other = yaml.safe_load(DEMO.read_text())
    other["metadata"]["name"] = "other"
    review, _ = admit(raw, {("Model", "default", "other"): other})
    assert not review.allowed
    assert "LoRA adapter 'demo-lora-a' is already served by Model default/other" in (
        review.message()
    )
    assert admit(raw, {})[0].allowed


def test_directory_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: Model\nmetadata: {name: x\n")
    with pytest.raises(DirectoryError, match=r"a\.yaml: not valid YAML"):
        read_directory(tmp_path)
    (tmp_path / "a.yaml").write_text("kind: Endpoints\nmetadata: {name: x}\n")
    docs, notes = read_directory(tmp_path)
    assert docs == [] and "kind 'Endpoints' is not a kind of the cluster" in notes[0]


def test_get_tables_read_like_kubectl() -> None:
    now = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
    pods: list[dict[str, Any]] = [
        {
            "metadata": {"name": "m-large-0", "namespace": "default",
                         "creationTimestamp": "2026-01-01T11:58:55Z"},
            "status": {"phase": "Running", "podIP": "127.0.0.10",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        },
        {"metadata": {"name": "m-small-0", "namespace": "default"}, "status": {}},
    ]  # fmt: skip
    lines = table("pods", pods, now).splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "READY", "STATUS", "IP", "AGE"]
    assert lines[1].split() == ["default", "m-large-0", "1/1", "Running", "127.0.0.10", "65s"]
    assert lines[2].split() == ["default", "m-small-0", "0/1", "Pending", "<none>", "<unknown>"]
    model = {
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"backends": [{"name": "large"}, {"name": "small"}]},
        "status": {
            "backends": [{"name": "large", "replicas": 2, "readyReplicas": 2},
                         {"name": "small", "replicas": 1, "readyReplicas": 0}],
            "conditions": [{"type": "Active", "status": "False"},
                           {"type": "Initialized", "status": "True"}],
        },
    }  # fmt: skip
    row = table("models", [model], now).splitlines()[1].split()
    assert row == ["default", "m", "large,small", "2/3", "Initialized", "<unknown>"]
    assert table("modelinfers", [], now) == "No modelinfers found."
    assert kind_of("po") == "pods" and kind_of("Model") == "models"
    with pytest.raises(ValueError, match="unknown kind 'nodes'"):
        kind_of("nodes")


def test_gateway_points_models_to_the_local_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from matrixinfer.cli import _hint_local_mode

    (tmp_path / "m.yaml").write_text(DEMO.read_text())
    _hint_local_mode(tmp_path)
    out = capsys.readouterr().out
    assert "the Model objects in" in out and f"matrixinfer demo --examples {tmp_path}" in out
    (tmp_path / "m.yaml").unlink()
    _hint_local_mode(tmp_path)
    assert capsys.readouterr().out == ""


def test_get_names_a_state_file_whose_cluster_has_exited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import subprocess
    import sys

    from matrixinfer.cli import main

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    state = tmp_path / "local.json"
    state.write_text(json.dumps({"server": "http://127.0.0.1:1", "pid": int(done.stdout)}))
    monkeypatch.setenv("MATRIXINFER_STATE", str(state))
    assert main(["get", "pods"]) == 1
    assert f"the one recorded in {state} (pid {int(done.stdout)}) has exited" in (
        capsys.readouterr().out
    )
    assert main(["get", "nodes"]) == 2
    assert "unknown kind 'nodes'" in capsys.readouterr().out
