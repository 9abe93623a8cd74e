"""Issue #19 end to end in the local stack: a Model whose weights and LoRA adapters are on S3
(a moto server started by the test) comes up pod by pod as a cluster runs it (the downloader
init container fetches the weights into the pod's cache, the runtime sidecar fetches and loads
the adapters) and serves both adapters through Envoy, each answered by a pod that loaded it.
And the kubelet's side of it against the local cluster alone: a failing init container fails
the pod with its message."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from matrixinfer.localcluster import LocalCluster, LocalOptions
from matrixinfer.process import wait_until
from tests.matrixinfer.test_demo import POD_HEADER, Demo
from tests.runtime.conftest import S3, S3_ENV, s3

__all__ = ["s3"]  # the moto S3 server fixture of the runtime tests

pytestmark = pytest.mark.timeout(240)

CONFIG = json.dumps({"model_type": "llama", "vocab_size": 32000}).encode()


def _model(endpoint: str, adapters: list[str]) -> dict[str, Any]:
    env = [{"name": "AWS_ENDPOINT_URL", "value": endpoint}]
    env += [{"name": k, "value": v} for k, v in S3_ENV.items()]
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "s3-model", "namespace": "default"},
        "spec": {
            "backends": [
                {"name": n, "type": t, "modelURI": "s3://models/base", "env": env, "minReplicas": 1}
                for n, t in (("v", "vLLM"), ("s", "SGLang"))
            ],
            "loraAdapters": [{"name": a, "uri": f"s3://models/{a}"} for a in adapters],
        },
    }


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _pod_ips(demo: Demo) -> dict[str, str]:
    return {name: cols[2] for name, cols in demo.pods().items()}


def _answer(demo: Demo, model: str) -> str:
    """The pod that answered one chat request for ``model`` (HTTP 200 asserted)."""
    from openai import OpenAI

    client = OpenAI(base_url=demo.url, api_key="unused", max_retries=0, timeout=30)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    finally:
        client.close()
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content
    return str(raw.headers[POD_HEADER])


def _routable(demo: Demo, adapter: str) -> bool:
    """Whether the gateway has read ``adapter`` in every ready pod's adapter list (its
    /debug/state): from then on a request for it may go to either backend."""
    found = re.search(r"extproc metrics: (http://\S+)/metrics", demo.text)
    assert found, demo.text
    with urllib.request.urlopen(f"{found.group(1)}/debug/state", timeout=5) as resp:
        state = json.load(resp)
    pods = [p for p in state["pods"] if p["ready"]]
    # an adapter list the gateway cannot read (None) never drops a pod (the lora-capable filter)
    known = [p["metrics"]["loadedLoras"] for p in pods]
    return bool(pods) and all(got is None or adapter in got for got in known)


def _answers(demo: Demo, model: str) -> bool:
    """Whether one request for ``model`` is answered (the gateway reads each pod's adapters
    every few seconds, so a newly loaded one is routed after a moment)."""
    from openai import OpenAIError

    try:
        _answer(demo, model)
    except OpenAIError:
        return False
    return True


def _loaded(ip: str) -> dict[str, str]:
    """Adapter name -> local path, from the pod's runtime sidecar."""
    got = _get(f"http://{ip}:8100/v1/lora_adapters")
    return {a["name"]: a["path"] for a in got["adapters"]}


def test_a_model_on_s3_comes_up_and_serves_both_adapters(s3: S3, tmp_path: Path) -> None:
    c = s3.client
    c.create_bucket(Bucket="models")
    c.put_object(Bucket="models", Key="base/config.json", Body=CONFIG)
    for name in ("lora-a", "lora-b", "lora-c"):
        c.put_object(Bucket="models", Key=f"{name}/adapter_config.json", Body=b'{"r": 8}')
    source = tmp_path / "source"
    source.mkdir()
    model = _model(s3.url, ["lora-a", "lora-b"])
    (source / "model.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    demo = Demo(tmp_path, first_host="127.0.0.120", source=source)
    try:
        text = demo.text
        assert "pod s3-model-v-0-server-0-0: init container download started" in text
        ips = _pod_ips(demo)
        assert set(ips) == {"s3-model-v-0-server-0-0", "s3-model-s-0-server-0-0"}
        # the downloader fetched the weights into each pod's cache (an emptyDir of its own)
        fetched = list((demo.run_dir / "state/pods").glob("*/volumes/cache/s3/models/base"))
        assert len(fetched) == 2 and all((d / "config.json").read_bytes() == CONFIG
                                         for d in fetched)  # fmt: skip
        for adapter in ("lora-a", "lora-b"):
            # the pods turned ready once their sidecars loaded the adapters; the gateway learns
            # a pod's adapters from its next /v1/models scrape
            wait_until(lambda a=adapter: _routable(demo, a), 30, f"the gateway to read {adapter}")
            for _ in range(4):
                pod = _answer(demo, adapter)
                path = _loaded(ips[pod])[adapter]  # the pod that answered loaded it
                assert path.endswith(f"/var/cache/matrixinfer/s3/models/{adapter}"), path
                assert Path(path, "adapter_config.json").read_bytes() == b'{"r": 8}'
        # a third adapter in the Model: the ConfigMap changes, the kubelet rewrites the
        # mounted file, the sidecars load it (no new pods)
        mark = len(demo.lines)
        model = _model(s3.url, ["lora-a", "lora-b", "lora-c"])
        (demo.dir / "model.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
        demo.wait_for("configured Model default/s3-model", after=mark)
        wait_until(lambda: all("lora-c" in _loaded(ip) for ip in ips.values()), 60, "lora-c")
        wait_until(lambda: _routable(demo, "lora-c"), 30, "the gateway to read lora-c")
        assert "lora-c" in _loaded(ips[_answer(demo, "lora-c")])
        assert _pod_ips(demo) == ips  # the same pods
        assert "started" not in "".join(demo.lines[mark:])
    finally:
        demo.stop()


def test_a_failing_init_container_keeps_its_pod_in_back_off_with_its_message(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    model = _model("http://127.0.0.1:1", [])
    model["spec"]["backends"] = [
        {"name": "v", "type": "vLLM", "modelURI": "pvc://no-such-claim/weights", "minReplicas": 1}
    ]
    del model["spec"]["loraAdapters"]
    (config / "model.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    options = LocalOptions(config_dir=config, run_dir=tmp_path / "run", first_host="127.0.0.140")
    with LocalCluster(options) as cluster:
        lines: list[str] = []

        def failed() -> bool:
            while not cluster.lines.empty():
                lines.append(cluster.lines.get())
            return any("init container download exited with code 4" in x for x in lines)

        wait_until(failed, 60, "the init container to fail")
        line = next(x for x in lines if "exited with code 4" in x)
        assert "pvc://no-such-claim/weights: not found" in line
        assert "restarting in 10s (CrashLoopBackOff, restart 1)" in line
        assert not any(": ready" in x or "started s3-model" in x for x in lines)
        pods = _get(f"{cluster.url}/api/v1/namespaces/default/pods")["items"]
        inits = [
            c
            for p in pods
            if p["status"].get("phase") == "Pending"
            for c in p["status"].get("initContainerStatuses") or ()
            if (c.get("state") or {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
        ]
        messages = [c["lastState"]["terminated"]["message"] for c in inits]  # fmt: skip
        assert any("pvc://no-such-claim/weights: not found" in m for m in messages), pods
        log = (tmp_path / "run" / "pod-default-s3-model-v-0-server-0-0.log").read_text()
        assert "local kubelet: init container download:" in log
        assert "pvc://no-such-claim/weights: not found" in log
