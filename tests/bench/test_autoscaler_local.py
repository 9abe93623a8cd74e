"""The local-stack autoscaler benchmark's pure parts: the compressed trace (one trace definition
with the replay), pod-seconds from the local kubelet's lines, the time-compressed policy and the
report from stored runs. No local stack is started here."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.autoscaler_local import (
    FAILED,
    PodEvent,
    alive,
    max_tokens,
    model_doc,
    pod_events,
    pod_intervals,
    pod_seconds,
    scaled_policy,
    static_size,
    trace,
    write_report,
)
from bench.autoscaler_replay import arrivals, day_rate
from crds.registry import Model


def test_the_trace_is_the_replays_day_with_its_time_compressed() -> None:
    day = arrivals(day_rate, 3600.0, 3)
    fast = trace(3, 6.0)
    assert fast == trace(3, 6.0)  # seeded
    assert max(r.arrival for r in fast) < 600.0
    # the rates are the day's: a sixth of its requests, each as long as the day's
    assert abs(len(fast) - len(day) / 6) < 0.1 * len(day) / 6
    assert all(2.0 <= r.decode <= 6.0 for r in fast)
    # the spike (day seconds 1800-2100) is at wall seconds 300-350, at 20 req/s
    spike = [r for r in fast if 300.0 <= r.arrival < 350.0]
    assert 800 <= len(spike) <= 1200
    with pytest.raises(ValueError, match="compress"):
        trace(1, 0.0)


def test_the_static_fleet_is_the_replays_and_answers_last_their_decode() -> None:
    assert static_size() == 14  # 20 req/s x 4 s at 6 of 8 sequences per pod
    assert max_tokens(2.0) == 20 and max_tokens(0.01) == 1


KUBELET = [
    (10.0, "  pod day-model-sim-0-server-0-0: started demo-model at 127.77.0.10:8000\n"),
    (11.0, "  pod day-model-sim-0-server-0-0: ready (1.0s)\n"),
    (20.0, "  pod day-model-sim-1-server-0-0: started demo-model at 127.77.0.11:8000\n"),
    (30.0, "  pod day-model-sim-1-server-0-0: deleted, process stopped\n"),
    (40.0, "  pod day-model-sim-2-server-0-0: started demo-model at 127.77.0.12:8000\n"),
    (45.0, "  requests per pod: a=1\n"),
]


def test_pod_seconds_come_from_the_kubelets_start_and_stop_lines() -> None:
    events = pod_events(KUBELET)
    assert [(e.t, e.start) for e in events] == [
        (10.0, True),
        (20.0, True),
        (30.0, False),
        (40.0, True),
    ]
    # window 0-50: pod 0 runs 40 s, pod 1 10 s, pod 2 10 s (still running at the end)
    assert pod_seconds(events, 0.0, 50.0) == pytest.approx(60.0)
    # clipped: pod 0 started before the window counts from its beginning
    assert pod_seconds(events, 25.0, 35.0) == pytest.approx(10.0 + 5.0)
    assert alive(events, 0.0, 50.0, 10.0) == [0, 1, 2, 1, 2]  # at 0, 10, .. 40
    with pytest.raises(ValueError, match="before it begins"):
        pod_intervals(events, 5.0, 1.0)


def test_a_stop_without_a_start_and_a_double_start_are_ignored() -> None:
    events = [
        PodEvent(1.0, "a", False),
        PodEvent(2.0, "b", True),
        PodEvent(3.0, "b", True),
        PodEvent(4.0, "b", False),
    ]
    assert pod_intervals(events, 0.0, 10.0) == [("b", 2.0, 4.0)]


def test_the_policy_is_the_apis_defaults_compressed_and_a_valid_model() -> None:
    policy = scaled_policy(6.0, 2.6, panic=True)
    up, down = policy["behavior"]["scaleUp"], policy["behavior"]["scaleDown"]
    assert up["stablePolicy"]["period"] == "2500ms"
    assert up["panicPolicy"]["panicModeHold"] == "10s"
    assert down["stabilizationWindow"] == "50s"
    assert "panicPolicy" not in scaled_policy(6.0, 2.6, panic=False)["behavior"]["scaleUp"]
    tuned = scaled_policy(6.0, 2.6, panic=True, down_window=120.0)
    assert tuned["behavior"]["scaleDown"]["stabilizationWindow"] == "20s"
    for doc in (model_doc(14, None, None), model_doc(1, 42, policy)):
        Model.model_validate(doc)  # the API accepts it


def _run(name: str, ttfts: Sequence[float | None], pod_s: float) -> dict[str, object]:
    return {
        "name": name,
        "seed": 1,
        "compress": 6.0,
        "pod_start_delay": 30.0,
        "requests": [
            [i * 60.0, t, "" if t is not None else "http 503"] for i, t in enumerate(ttfts)
        ],
        "pod_seconds": pod_s,
        "alive": [2, 2, 3],
        "replicas": [],
        "scale_events": {"ScaleUp": 2},
        "ready_s": [5.5, 6.0],
        "max_send_lag": 0.01,
        "load": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
        "max_replicas": 42,
    }


def test_the_report_has_every_contender_and_keeps_findings(tmp_path: Path) -> None:
    runs = {
        "static": _run("static fleet", [0.2] * 10, 1000.0),
        "panic": _run("with panic", [0.2] * 9 + [None], 500.0),
        "no-panic": _run("without panic", [0.2] * 8 + [3.0, 0.2], 400.0),
        "cold": {"name": "cold start", "pod_start_delay": 30.0, "interval": 15.0,
                 "at_zero": True, "ttft": 41.5, "error": "", "load": [1, 1, 1]},
    }  # fmt: skip
    stored = tmp_path / "autoscaler_local.json"
    stored.write_text(json.dumps(runs))
    (tmp_path / "autoscaler_local.md").write_text("# old\n\nold\n\n## Findings\n\n- by hand\n")
    text = write_report(stored, tmp_path, 1.0)
    assert text.endswith("## Findings\n\n- by hand\n")
    assert "tuned" not in text  # the optional contender: only when it ran
    assert "| static fleet | 10 | 0 |" in text
    assert "| with panic | 10 | 1 |" in text and "90.0 %" in text and "| 0.50 |" in text
    assert "| without panic | 10 | 0 |" in text and "| 0.40 |" in text
    assert "**41.5 s**" in text and "p50 5.5 s, max 6.0 s (2 pods)" in text
    assert (tmp_path / "autoscaler_local.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs["tuned"] = _run("tuned", [0.2] * 10, 300.0)
    stored.write_text(json.dumps(runs))
    assert "| tuned | 10 | 0 |" in write_report(stored, tmp_path, 1.0)
    del runs["cold"]
    stored.write_text(json.dumps(runs))
    with pytest.raises(SystemExit, match="cold"):
        write_report(stored, tmp_path, 1.0)
    assert not math.isnan(FAILED)
