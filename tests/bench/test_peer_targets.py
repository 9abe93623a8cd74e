"""bench.suite.peer_targets: the prefix suite's targets against the best vllm-router policy."""

from __future__ import annotations

from typing import Any

import pytest

from bench.suite.cache_bounds import CacheBounds
from bench.suite.peer_targets import check_peer_targets, peer_target_rows


def point(
    contender: str,
    workload: str,
    p90: float,
    tok: float = 1000.0,
    mode: str = "open",
    computed: int = 300,
) -> dict[str, Any]:
    return {
        "contender": contender,
        "workload": workload,
        "mode": mode,
        "qps": 0.0 if mode == "probe" else 30.0,
        "summary": {
            "ttft_p50": p90,
            "ttft_p90": p90,
            "output_tok_per_s": tok,
            "requests": 10,
            "ok": 10 if tok else 9,
        },
        "sim_state": {"sim-0": {"prompt_tokens": 1000, "prefill_computed_tokens": computed}},
    }


def result(points: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = {"baseline": "envoy-rr", "sweep_workload": "shared", "replicas": 8, "sim_args": []}
    return {"config": cfg, "points": points}


def bounds(cold: float) -> CacheBounds:
    # 100 requests of 10 tokens each; the partitioned bound serves 750 of 1000 prompt tokens
    return CacheBounds(1000, 800, 760, 750, (0, 0, 0), 100, round(cold * 100))


def fleet(workload: str, ours_p90: float, loaded_base: float = 2.0) -> list[dict[str, Any]]:
    return [
        point("envoy-rr", workload, loaded_base, tok=600),
        point("ours-default", workload, ours_p90, tok=1500, computed=310),
        point("vllm-router-cache_aware", workload, 0.4, tok=1400),
        point("vllm-router-power_of_two", workload, 1.5, tok=1550),
    ]


def test_ours_is_held_to_the_best_policy_of_each_measure() -> None:
    res = result(
        [point("envoy-rr", "shared", 0.3, mode="probe"), *fleet("shared", 0.19), *fleet("z", 0.3)]
    )
    checks = {
        c.workload: c for c in check_peer_targets(res, {"shared": bounds(0.04), "z": bounds(0.2)})
    }
    shared, z = checks["shared"], checks["z"]
    # p90 against the lowest peer p90 (cache_aware), tok/s against the highest (power_of_two)
    assert shared.peer_p90_name == "vllm-router-cache_aware" and shared.peer_p90 == 0.4
    assert shared.peer_tok_name == "vllm-router-power_of_two" and shared.peer_tok == 1550
    assert shared.p90_ratio == pytest.approx(0.475) and shared.p90_ok
    assert not z.p90_ok  # 0.3 > 0.5 x 0.4
    assert not shared.tok_ok and shared.tok_ratio == pytest.approx(1500 / 1550)
    # served from cache from the engines' counters, against the partitioned bound
    assert shared.served == pytest.approx(0.69) and shared.achievable == pytest.approx(0.75)
    assert shared.cache_ok  # 0.92 of the achievable
    # the floor applies where more than a tenth of requests prefill their whole prompt under
    # the offline-optimal cache
    assert shared.floor is None and shared.floor_ratio is None
    assert z.floor == 0.3 and z.floor_ratio == pytest.approx(0.75)
    rows = peer_target_rows([shared, z])
    assert "| shared | 30 | 190 ms | 400 ms (vllm-router-cache_aware) | 0.47 met | - |" in rows[-3]
    assert "| 0.75 MISSED | 0.75 |" in rows[-2]


def test_points_the_baseline_is_not_loaded_at_or_without_peers_are_not_checked() -> None:
    probe = point("envoy-rr", "shared", 0.3, mode="probe")
    light = result([probe, *fleet("shared", 0.2, loaded_base=1.4)])  # 1.4 < 5 x 0.3
    assert check_peer_targets(light, {"shared": bounds(0.0)}) == []
    alone = result([probe, *fleet("shared", 0.2)[:2]])  # no vllm-router contender
    assert check_peer_targets(alone, {"shared": bounds(0.0)}) == []
    assert peer_target_rows([]) == []
    no_probe = result(fleet("shared", 0.2))
    assert check_peer_targets(no_probe, {"shared": bounds(0.0)}) == []


def test_throughput_is_level_within_a_percent_only_where_both_served_everything() -> None:
    probe = point("envoy-rr", "shared", 0.3, mode="probe")
    pts = fleet("shared", 0.19)
    pts[1]["summary"]["output_tok_per_s"] = 1540.0  # 0.994 of power_of_two's 1550
    res = result([probe, *pts])
    (check,) = check_peer_targets(res, {"shared": bounds(0.0)})
    assert check.all_served and check.tok_ok
    pts[1]["summary"]["ok"] = 9  # ours lost a request: held to the plain comparison
    (check,) = check_peer_targets(result([probe, *pts]), {"shared": bounds(0.0)})
    assert not check.all_served and not check.tok_ok
