"""A vLLMDisaggregated Model in the local stack: the decode pod runs its PD proxy on the serving
port in front of the decode simulator, and a request through Envoy is prefilled on the prefill
pod and decoded on the decode pod."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from matrixinfer.resources import project_file
from tests.matrixinfer.test_demo import POD_HEADER, Demo

pytestmark = pytest.mark.timeout(240)

MODEL = {
    "apiVersion": "registry.matrixinfer.ai/v1alpha1",
    "kind": "Model",
    "metadata": {"name": "demo-model", "namespace": "default"},
    "spec": {
        "backends": [
            {
                "name": "pd",
                "type": "vLLMDisaggregated",
                "modelURI": "pvc://demo-artefacts/demo-model",
                "workers": [
                    {"type": "prefill", "replicas": 1, "pods": 1},
                    {"type": "decode", "replicas": 1, "pods": 1},
                ],
                "minReplicas": 1,
            }
        ]
    },
}


def test_a_request_is_prefilled_on_the_prefill_pod_and_decoded_behind_the_pd_proxy(
    tmp_path: Path,
) -> None:
    from openai import OpenAI

    source = tmp_path / "source"
    shutil.copytree(project_file("examples/demo/volumes"), source / "volumes")
    (source / "model.yaml").write_text(yaml.safe_dump(MODEL, sort_keys=False))
    demo = Demo(tmp_path, first_host="127.0.0.150", source=source)
    try:
        ips = {name: cols[2] for name, cols in demo.pods().items()}
        prefill, decode = "demo-model-pd-0-prefill-0-0", "demo-model-pd-0-decode-0-0"
        assert set(ips) == {prefill, decode}
        client = OpenAI(base_url=demo.url, api_key="unused", max_retries=0, timeout=30)
        raw = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        client.close()
        assert raw.status_code == 200 and raw.parse().choices[0].message.content
        assert raw.headers[POD_HEADER] == decode
        log = (demo.run_dir / f"pod-default-{decode}.log").read_text()
        assert "local kubelet: container pd-proxy:" in log
        assert f"prefill {ips[prefill]}:8000 -> decode {decode}" in log  # the proxy's line
    finally:
        demo.stop()
