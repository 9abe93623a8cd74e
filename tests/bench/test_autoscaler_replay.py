"""The autoscaler replay at one seed: every contender is reported with its misses by phase, and a
hand-written Findings section survives a re-run. Structure only, never figures."""

from __future__ import annotations

from pathlib import Path

from bench.autoscaler_replay import PHASES, main, phase_of


def test_report_has_every_contender_and_keeps_findings(tmp_path: Path) -> None:
    report = tmp_path / "autoscaler_replay.md"
    report.write_text("# old\n\nold tables\n\n## Findings\n\n- written by hand\n")
    assert main(["--seeds", "1", "--out", str(tmp_path)]) == 0
    text = report.read_text()
    assert "old tables" not in text
    assert text.endswith("## Findings\n\n- written by hand\n")
    assert text.count("| static fleet sized for the peak |") == 2  # main and phase tables
    for name in (
        "autoscaler, panic mode (target 2.6, scale-down window 120 s)",
        "autoscaler, no panic mode (target 2.6, scale-down window 120 s)",
        "autoscaler, API defaults + panic mode (target 6)",
        "autoscaler, target 6 + scheduled minimum 12 (00:29, 6 min)",
    ):
        assert text.count(f"| {name} |") == 3, name  # main, phase and seed tables
    for phase, _ in PHASES:
        assert f"| {phase} (" in text or f" {phase} (" in text
    assert (tmp_path / "autoscaler_replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_phase_of_names_the_phase_of_each_second() -> None:
    assert [phase_of(t) for t in (0, 899.9, 900, 1800, 2099, 2100, 2700, 3599)] == [
        "quiet",
        "quiet",
        "ramp",
        "spike",
        "spike",
        "decay",
        "quiet again",
        "quiet again",
    ]
