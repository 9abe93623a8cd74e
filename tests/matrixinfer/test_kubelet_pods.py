"""The local kubelet's plan of a pod (pure): volumes as local directories, mount paths and
loopback URLs remapped, init containers and the MatrixInfer containers as local processes,
readiness from the containers' probes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import crds
from controllers.model.planner import desired
from matrixinfer.kubelet import (
    ContainerConfigError,
    KeyRefs,
    config_map_files,
    engine_command,
    local_program,
    plan_pod,
    remap,
    volume_dirs,
)
from matrixinfer.resources import project_file
from tests.matrixinfer.test_localcluster_units import demo_pods


def _pod(backend: str = "large") -> dict[str, Any]:
    pod = copy.deepcopy(demo_pods()[backend])
    pod["metadata"]["namespace"] = "default"
    return pod


def test_volumes_are_local_directories(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    (claims / "demo-artefacts").mkdir(parents=True)
    pod = _pod()
    pod["spec"]["volumes"] += [
        {"name": "other-claim", "persistentVolumeClaim": {"claimName": "models"}},
        {"name": "here", "hostPath": {"path": str(tmp_path)}},
        {"name": "elsewhere", "hostPath": {"path": "/no/such/dir", "type": "DirectoryOrCreate"}},
    ]
    dirs = volume_dirs(pod, tmp_path / "pod", tmp_path / "state", claims)
    assert dirs == {
        "cache": tmp_path / "pod/volumes/cache",  # emptyDir: the pod's own
        "lora-adapters": tmp_path / "pod/volumes/lora-adapters",  # configMap: the pod's own
        "pvc-0": claims / "demo-artefacts",  # a claim the configuration directory provides
        "other-claim": tmp_path / "state/pvc/models",  # any other claim: under the state dir
        "here": tmp_path,  # a host path that exists is used in place
        "elsewhere": tmp_path / "state/hostpath/no/such/dir",
    }
    pod["spec"]["volumes"].append({"name": "secret", "secret": {"secretName": "s"}})
    with pytest.raises(ValueError, match="volume secret: secret is not supported"):
        volume_dirs(pod, tmp_path / "pod", tmp_path / "state")


def test_remap_moves_mounted_paths_and_loopback_urls() -> None:
    root = Path("/run/pod/fs/runtime")
    mounts = ["/var/cache/matrixinfer", "/mnt/pvc/claim", "/etc/matrixinfer/lora"]
    assert remap("/var/cache/matrixinfer", mounts, root, "h") == f"{root}/var/cache/matrixinfer"
    assert remap("/mnt/pvc", mounts, root, "h") == f"{root}/mnt/pvc"  # above a mount
    assert remap("--lora=/etc/matrixinfer/lora/a.yaml", mounts, root, "h") == (
        f"--lora={root}/etc/matrixinfer/lora/a.yaml"
    )
    assert remap("/etc/passwd", mounts, root, "h") == "/etc/passwd"  # on no mount
    assert remap("/var/cache/matrixinfer-x", mounts, root, "h") == "/var/cache/matrixinfer-x"
    ports = [8000, 8100]  # the pod's: its loopback is the pod's own address
    assert remap("http://127.0.0.1:8000", mounts, root, "127.0.0.9", ports) == (
        "http://127.0.0.9:8000"
    )
    assert remap("http://localhost:8100/x", mounts, root, "127.0.0.9", ports) == (
        "http://127.0.0.9:8100/x"
    )
    # another port on the loopback: a service of this machine (a local S3), left alone
    assert remap("http://127.0.0.1:9000", mounts, root, "127.0.0.9", ports) == (
        "http://127.0.0.1:9000"
    )


def test_the_pod_runs_the_downloader_then_the_simulator_and_the_sidecar(tmp_path: Path) -> None:
    pod = _pod()
    dirs = volume_dirs(pod, tmp_path, tmp_path / "state")
    plan = plan_pod(pod, "127.0.0.10", tmp_path / "fs", dirs, python="py")
    [download] = plan.init
    assert download.argv == [
        "py", "-m", "runtime.downloader", "pvc://demo-artefacts/demo-model",
        "--cache", f"{tmp_path}/fs/download/var/cache/matrixinfer",
        "--pvc-root", f"{tmp_path}/fs/download/mnt/pvc",
    ]  # fmt: skip
    engine, runtime = plan.containers
    assert engine.argv[:3] == ["py", "-m", "sim"] and engine.probe is None
    argv = runtime.argv
    assert argv[:3] == ["py", "-m", "runtime.sidecar"]
    assert argv[argv.index("--engine-url") + 1] == "http://127.0.0.10:8000"
    assert argv[argv.index("--lora-adapters") + 1] == (
        f"{tmp_path}/fs/runtime/etc/matrixinfer/lora/adapters.yaml"
    )
    assert argv[-2:] == ["--host", "127.0.0.10"]
    assert plan.ports == [8000, 8100]
    assert plan.probes == ["http://127.0.0.10:8100/ready"]  # the sidecar's readinessProbe
    assert plan.skipped == []


def test_a_hub_model_is_fetched_only_when_a_hub_is_set(tmp_path: Path) -> None:
    """Nothing downloads from the internet here and the simulator needs no weights: the
    downloader of an hf:// model runs only with a hub (HF_ENDPOINT, e.g. a local mirror)."""
    pod = _pod()
    [init] = pod["spec"]["initContainers"]
    init["args"][0] = "hf://org/model"
    dirs = volume_dirs(pod, tmp_path, tmp_path / "state")
    offline = plan_pod(pod, "127.0.0.10", tmp_path / "fs", dirs, python="py", hub="")
    assert offline.init == []
    assert any("hf://org/model" in s and "HF_ENDPOINT" in s for s in offline.skipped)
    mirror = plan_pod(pod, "127.0.0.10", tmp_path / "fs", dirs, python="py", hub="http://m")
    assert [r.argv[3] for r in mirror.init] == ["hf://org/model"]


def test_without_probes_readiness_is_the_engines_health(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["containers"] = pod["spec"]["containers"][:1]
    plan = plan_pod(pod, "127.0.0.10", tmp_path, {})
    assert plan.probes == ["http://127.0.0.10:8000/health"]


def test_containers_that_cannot_run_here_are_named(tmp_path: Path) -> None:
    pod = _pod()
    pod["spec"]["containers"].append({"name": "logger", "image": "fluent-bit", "command": ["fb"]})
    pod["spec"]["initContainers"].append({"name": "warm", "image": "busybox"})
    plan = plan_pod(pod, "127.0.0.10", tmp_path, volume_dirs(pod, tmp_path, tmp_path))
    assert plan.skipped == [
        "container warm: the image's entrypoint (busybox) is not a MatrixInfer program;"
        " it does not run locally",
        "container logger: fb is not a MatrixInfer program; it does not run locally",
    ]
    assert [r.name for r in plan.containers] == ["engine", "runtime"]


def test_env_values_are_remapped_and_the_downward_api_filled(tmp_path: Path) -> None:
    pod = _pod()
    runtime = pod["spec"]["containers"][1]
    runtime["env"] = [
        {"name": "AWS_ENDPOINT_URL", "value": "http://localhost:9000"},
        {"name": "ENGINE", "value": "http://localhost:8000/v1"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
        {
            "name": "OPT",
            "valueFrom": {"secretKeyRef": {"name": "s", "key": "no", "optional": True}},
        },
        {"name": "IP", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
    ]
    volumes = volume_dirs(pod, tmp_path, tmp_path)
    refs = KeyRefs(
        config_maps={("default", "c"): {"k": "v"}}, secrets={("default", "s"): {"k": "x"}}
    )
    plan = plan_pod(pod, "127.0.0.10", tmp_path, volumes, refs=refs)
    run = plan.containers[1]
    assert run.env == {
        "AWS_ENDPOINT_URL": "http://localhost:9000",  # this machine's
        "ENGINE": "http://127.0.0.10:8000/v1",  # the pod's own port
        "POD": pod["metadata"]["name"],
        "KEY": "x",
        "CM": "v",
    }  # OPT: optional and missing, not set
    assert run.notes and run.notes[0].startswith("env IP: valueFrom")
    # what is missing and not optional: the container cannot be created, the error names it
    for lacking, message in (
        (KeyRefs(config_maps=refs.config_maps), 'secret "s" not found'),
        (KeyRefs(secrets={("default", "s"): {}}), "couldn't find key k in Secret default/s"),
        (KeyRefs(secrets=refs.secrets), 'configmap "c" not found'),
    ):
        with pytest.raises(ContainerConfigError) as e:
            plan_pod(pod, "127.0.0.10", tmp_path, volumes, refs=lacking)
        assert str(e.value) == f"container {runtime['name']}: {message}"
        assert e.value.container == runtime["name"] and e.value.reason == message


def test_decode_pods_run_the_pd_proxy_on_the_serving_port(tmp_path: Path) -> None:

    model = crds.parse_object(
        yaml.safe_load(project_file("examples/model-disaggregated.yaml").read_text()), "pd"
    )
    assert isinstance(model, crds.Model)
    pods = [
        role["entryTemplate"]
        for child in desired(model).children
        if child.ref.kind == "ModelInfer"
        for role in child.manifest["spec"]["template"]["roles"]
        if role["name"] == "decode"
    ]
    labels = {"workload.matrixinfer.ai/role": "decode"}
    pod = {**pods[0], "metadata": {"name": "d-0", "namespace": "default", "labels": labels}}
    plan = plan_pod(pod, "127.0.0.10", tmp_path, volume_dirs(pod, tmp_path, tmp_path))
    by_name = {r.name: r for r in plan.containers}
    assert by_name["engine"].ports == [8001]
    proxy = by_name["pd-proxy"].argv
    assert proxy[:3][1:] == ["-m", "runtime.pd_proxy"]
    assert proxy[proxy.index("--engine") + 1] == "http://127.0.0.10:8001"
    assert proxy[-2:] == ["--host", "127.0.0.10"]
    assert plan.ports == [8000, 8001, 8100]


def test_config_map_volume_files() -> None:
    data = {"adapters.yaml": "- a\n", "other": "x"}
    assert config_map_files({"configMap": {"name": "c"}}, data) == data
    items = {"configMap": {"name": "c", "items": [{"key": "other", "path": "o.txt"}]}}
    assert config_map_files(items, data) == {"o.txt": "x"}
    with pytest.raises(KeyError):
        config_map_files({"configMap": {"items": [{"key": "nope"}]}}, data)


def test_a_program_runs_here_when_it_is_ours_importable_or_on_the_path() -> None:
    def which(p: str) -> str | None:
        return {"tiny": "/opt/bin/tiny", "/srv/engine": "/srv/engine"}.get(p)

    def module(m: str) -> bool:
        return m == "sim"

    def run(*command: str) -> list[str] | str:
        return local_program(list(command), "py", which, module)

    assert run("matrixinfer-sim", "--port", "1") == ["py", "-m", "sim", "--port", "1"]
    assert run("/usr/local/bin/matrixinfer-sim") == ["py", "-m", "sim"]
    assert run("python3", "-m", "sim", "--x") == ["py", "-m", "sim", "--x"]
    assert run("python3", "-m", "sglang.launch_server") == (
        "the Python module sglang.launch_server is not installed here"
    )
    assert run("tiny", "a") == ["/opt/bin/tiny", "a"]
    assert run("/srv/engine") == ["/srv/engine"]
    assert run("vllm", "serve") == "vllm is not installed here"
    assert run() == "the container has no command (the image's entrypoint)"


def test_the_engine_runs_as_written_with_vars_and_the_pods_host() -> None:
    pod = _pod()
    engine = pod["spec"]["containers"][0]
    engine["command"] = ["matrixinfer-sim"]
    engine["args"] = [
        "--served-model-name", "$(NAME)", "--host=0.0.0.0", "--port", "$(PORT)", "$$(PORT)",
        "--missing", "$(NOPE)",
    ]  # fmt: skip
    cmd = engine_command(pod, "127.0.0.10", ["--time-scale", "9"], "py",
                         env={"NAME": "m", "PORT": "8123"})  # fmt: skip
    assert cmd.argv == [
        "py", "-m", "sim", "--served-model-name", "m", "--host=127.0.0.10", "--port", "8123",
        "$(PORT)", "--missing", "$(NOPE)",
    ]  # fmt: skip
    assert (cmd.port, cmd.model, cmd.simulated) == (8123, "m", False)
    assert cmd.why == "engine: matrixinfer-sim runs as written"
    engine["args"] = ["--port", "8000"]
    assert engine_command(pod, "h", python="py").why.endswith(
        "(no --host: it binds the address it chooses)"
    )


def test_an_engine_not_installed_here_runs_as_the_simulator(tmp_path: Path) -> None:
    pod = _pod()  # vllm serve ...
    cmd = engine_command(pod, "127.0.0.10", python="py", which=lambda p: None)
    assert cmd.simulated and cmd.argv[:3] == ["py", "-m", "sim"]
    assert cmd.why == "engine: vllm is not installed here; vllm runs as the simulator"
    found = engine_command(pod, "127.0.0.10", python="py", which=lambda p: f"/x/{p}")
    assert not found.simulated and found.argv[:2] == ["/x/vllm", "serve"]
    assert "--host" in found.argv and found.argv[found.argv.index("--host") + 1] == "127.0.0.10"
    # the plan tells the pod's log which it did, and paths go into the pod's mounts
    plan = plan_pod(pod, "127.0.0.10", tmp_path / "fs", volume_dirs(pod, tmp_path, tmp_path),
                    python="py", which=lambda p: f"/x/{p}")  # fmt: skip
    engine = plan.containers[0]
    assert engine.notes[0] == "engine: vllm runs as written"
    weights = engine.argv[2]
    assert weights.startswith(f"{tmp_path}/fs/engine/mnt/pvc/demo-artefacts/"), weights
