"""Passive health's pure core (extproc.health) and its candidate sets in the datastore."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.datastore import Datastore
from extproc.health import HealthPolicy, PassiveHealth, attempt_failed, capped
from fleet.files import load_directory
from fleet.pods import Pod

POLICY = HealthPolicy(
    consecutive_failures=2, base_ejection_s=10, max_ejection_s=35, max_ejection_percent=50
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_attempt_outcomes() -> None:
    assert attempt_failed(500, []) is True
    assert attempt_failed(503, []) is True
    assert attempt_failed(200, []) is False
    assert attempt_failed(404, []) is False  # the engine answered: not the pod's health
    assert attempt_failed(0, ["upstream_connection_failure"]) is True
    assert attempt_failed(0, ["upstream_remote_reset"]) is True
    assert attempt_failed(0, ["upstream_request_timeout"]) is True
    assert attempt_failed(0, ["downstream_connection_termination"]) is None


def test_ejection_backs_off_on_repeat_and_half_open_allows_one_probe() -> None:
    clock = Clock()
    h = PassiveHealth(clock)
    a = "10.0.0.1:8000"
    assert h.record(a, POLICY, True) is None  # 1 of 2
    assert h.record(a, POLICY, False) is None  # a success resets the count
    assert h.record(a, POLICY, True) is None
    assert h.record(a, POLICY, True) == "ejected"
    assert h.excluded(a) is not None
    clock.now += 9.9
    assert h.excluded(a) is not None
    clock.now += 0.2  # the ejection is over: half-open
    assert h.excluded(a) is None
    assert h.probe(a) is True  # one request goes there ...
    assert h.excluded(a) is not None  # ... and no other until its outcome is known
    assert h.record(a, POLICY, True) == "ejected"  # the probe failed: twice as long
    clock.now += 19.9
    assert h.excluded(a) is not None
    clock.now += 0.2
    assert h.probe(a) is True
    assert h.record(a, POLICY, True) == "ejected"  # 40 s, capped at 35 s
    clock.now += 34.9
    assert h.excluded(a) is not None
    clock.now += 0.2
    assert h.excluded(a) is None
    assert h.probe(a) is True
    assert h.record(a, POLICY, False) == "returned"  # the probe succeeded: healthy
    assert a not in h.pods and h.excluded(a) is None


def test_a_probe_whose_outcome_never_arrives_frees_the_slot() -> None:
    clock = Clock()
    h = PassiveHealth(clock)
    a = "10.0.0.1:8000"
    h.record(a, POLICY, True)
    h.record(a, POLICY, True)
    clock.now += 10.1
    assert h.probe(a)
    clock.now += 9.9
    assert h.excluded(a) is not None
    clock.now += 0.2
    assert h.excluded(a) is None


@pytest.mark.parametrize(("percent", "out"), [(0, 0), (34, 1), (50, 1), (67, 2), (100, 3)])
def test_at_most_the_set_share_is_ejected(percent: int, out: int) -> None:
    pods = [Pod(f"p{i}", f"10.0.0.{i}:8000") for i in range(3)]
    excluded = {"10.0.0.0:8000": 5.0, "10.0.0.1:8000": 3.0, "10.0.0.2:8000": 4.0}
    candidates, ejected = capped(pods, excluded.get, percent)
    assert len(ejected) == out and len(candidates) == 3 - out
    # the pods ejected first stay ejected
    assert {p.name for p in ejected} == set(["p1", "p2", "p0"][:out])


CONFIG = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: guarded}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  trafficPolicy:
    passiveHealth: {consecutiveFailures: 1, baseEjectionTime: 5s, maxEjectionPercent: 50}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: plain}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
---
apiVersion: gateway.matrixinfer.ai/v1alpha1
kind: Endpoints
metadata: {name: sims}
spec:
  endpoints:
  - {name: a, address: 10.0.0.1, labels: {app: sim}}
  - {name: b, address: 10.0.0.2, labels: {app: sim}}
  - {name: c, address: 10.0.0.3, labels: {app: sim}}
  - {name: d, address: 10.0.0.4, labels: {app: sim}}
"""


def test_datastore_candidates_follow_passive_health(tmp_path: Path) -> None:
    clock = Clock()
    ds = Datastore(clock)
    events: list[tuple[str, str, str]] = []
    ds.on_health.append(lambda *e: events.append(e))
    (tmp_path / "config.yaml").write_text(CONFIG)
    ds.apply(load_directory(tmp_path))
    guarded = ds.snapshot.servers["default/guarded"]
    assert guarded.health is not None and len(guarded.pods) == 4
    for address in ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"):
        ds.attempt(address, "guarded", True)
    guarded = ds.snapshot.servers["default/guarded"]
    # three pods failing, but at most half of the four may be ejected
    assert [p.name for p in guarded.ejected] == ["a", "b"]
    assert [p.name for p in guarded.pods] == ["c", "d"]
    assert events == [("guarded", "a", "ejected"), ("guarded", "b", "ejected")]
    assert "10.0.0.3:8000" not in ds.health.pods  # refused: counted again from zero
    # a ModelServer without passiveHealth keeps every pod
    assert len(ds.snapshot.servers["default/plain"].pods) == 4
    # reports for it change nothing
    ds.attempt("10.0.0.4:8000", "plain", True)
    assert "10.0.0.4:8000" not in ds.health.pods
    state = ds.to_json()
    assert next(s for s in state["modelServers"] if s["key"] == "default/guarded")["ejected"] == [
        "a",
        "b",
    ]
    assert state["passiveHealth"]["10.0.0.1:8000"]["state"] == "ejected"
    # the ejection ends: half-open, one request at a time
    clock.now += 5.1
    ds.tick()
    guarded = ds.snapshot.servers["default/guarded"]
    assert "a" in [p.name for p in guarded.pods]
    pod_a = ds.snapshot.pods["a"]
    ds.begin(pod_a)
    assert "a" in [p.name for p in ds.snapshot.servers["default/guarded"].ejected]
    ds.attempt("10.0.0.1:8000", "guarded", False)
    assert "a" in [p.name for p in ds.snapshot.servers["default/guarded"].pods]
    assert ("guarded", "a", "returned") in events
    # ejected pods are still scraped
    assert {t[0] for t in ds.scrape_targets()} == {"a", "b", "c", "d"}
