"""A model's life on a cluster, through the gateway with the official openai client: chat and
streaming answers, scaling up and down, a new revision, a crashed pod, uninstall. The tests run in
order on one installation (module-scoped cluster)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from openai import OpenAI

from e2e.cluster import POD_HEADER, Cluster

pytestmark = pytest.mark.timeout(300)

MODEL = "e2e-model"


def client(cluster: Cluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused", max_retries=0)


def chat(cluster: Cluster, text: str = "Hello") -> tuple[str, str]:
    """(answer, pod) of one non-streaming chat request."""
    raw = client(cluster).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=8
    )
    answer = raw.parse().choices[0].message.content or ""
    return answer, raw.headers.get(POD_HEADER, "")


def served_by(cluster: Cluster, n: int) -> Counter[str]:
    pods: Counter[str] = Counter()
    for i in range(n):
        answer, pod = chat(cluster, f"request {i} " + "x" * i)
        assert answer.strip(), f"empty answer from {pod}"
        pods[pod] += 1
    return pods


def test_install_and_first_requests(cluster: Cluster) -> None:
    cluster.deploy_model(MODEL, replicas=2)
    assert len(cluster.pods(MODEL)) == 2
    answer, pod = chat(cluster)
    assert answer.strip() and pod in cluster.pods(MODEL)


def test_streaming(cluster: Cluster) -> None:
    with client(cluster).chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        pod = resp.headers.get(POD_HEADER, "")
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert pod in cluster.pods(MODEL)


def test_unknown_model_is_an_openai_error(cluster: Cluster) -> None:
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client(cluster).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )


def test_scale_up_spreads_requests_to_the_new_pod(cluster: Cluster) -> None:
    cluster.scale(MODEL, 3)
    pods = set(cluster.pods(MODEL))
    assert len(pods) == 3
    seen = served_by(cluster, 30)
    assert set(seen) <= pods
    assert len(seen) >= 2, seen  # the scheduler spreads the load


def test_scale_down(cluster: Cluster) -> None:
    cluster.scale(MODEL, 2)
    pods = set(cluster.pods(MODEL))
    assert len(pods) == 2
    assert set(served_by(cluster, 10)) <= pods


def test_new_revision_replaces_every_pod(cluster: Cluster) -> None:
    before = set(cluster.pod_ids(MODEL))
    cluster.roll(MODEL)
    after = set(cluster.pod_ids(MODEL))
    assert len(after) == 2 and not before & after
    assert set(served_by(cluster, 10)) <= set(cluster.pods(MODEL))


def test_a_crashed_pod_costs_no_request(cluster: Cluster) -> None:
    killed = cluster.kill_pod(MODEL)  # name/uid: a replacement may take the same name
    # until the pod is replaced the gateway routes around it (retries, scrape staleness): every
    # request is answered
    served_by(cluster, 10)
    cluster.wait_replaced(MODEL, 2)
    ids = set(cluster.pod_ids(MODEL))
    assert killed not in ids and len(ids) == 2
    assert set(served_by(cluster, 10)) <= set(cluster.pods(MODEL))


def test_uninstall_stops_the_gateway(cluster: Cluster) -> None:
    url = cluster.gateway_url
    cluster.uninstall()
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=2)
        except (urllib.error.URLError, ConnectionError, OSError):
            break
        assert time.monotonic() < deadline, "the gateway still answers after uninstall"
        time.sleep(0.2)
