"""bench.soak's pure parts: the request rotation, what counts as an expected outcome, RSS and FD
growth, the verdict, and the report built from them (the soak itself is a benchmark: its
figures are in bench/reports/soak.md)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest

from bench.soak import (
    EXPECTED,
    MIX,
    ROUTED,
    Sample,
    Tally,
    fd_changes,
    growth,
    kind_at,
    outcome,
    report,
    verdict,
)


def samples(rss: list[int], fds: list[int]) -> list[Sample]:
    return [
        Sample(float(t), {"envoy": r, "extproc": 1000}, {"envoy": f, "extproc": 40}, t, 0)
        for t, (r, f) in enumerate(zip(rss, fds, strict=True))
    ]


def test_every_kind_is_in_the_rotation_and_known() -> None:
    assert set(MIX) == set(EXPECTED)
    assert set(EXPECTED) >= ROUTED
    assert [kind_at(i) for i in range(len(MIX))] == list(MIX)
    assert kind_at(len(MIX) + 3) == MIX[3]


@pytest.mark.parametrize(
    ("kind", "status", "error", "expected"),
    [
        ("chat", 200, None, (True, "200")),
        ("chat", 429, None, (False, "429")),
        ("bad_key", 401, None, (True, "401")),
        ("bad_json", 200, None, (False, "200")),  # a bad request that got through
        ("grpc", 0, None, (True, "0")),
        ("grpc", 8, None, (False, "8")),
        ("stream", 200, "stream without [DONE]", (False, "stream without [DONE]")),
        ("unknown_model", 0, "timeout", (False, "timeout")),
    ],
)
def test_outcome(kind: str, status: int, error: str | None, expected: tuple[bool, str]) -> None:
    assert outcome(kind, status, error) == expected


def test_growth_compares_the_first_and_last_quarters_after_warm_up() -> None:
    s = samples([500, 100, 100, 101, 103, 104, 110, 110], [1] * 8)
    g = growth(s, warmup=1.0, series="rss_kib", name="envoy")  # the 500 is warm-up
    assert (g.first, g.last) == (100.0, 110.0)
    assert g.percent == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no sample after the warm-up"):
        growth(s, warmup=100.0, series="rss_kib", name="envoy")


def tally(unexpected: int = 0) -> Tally:
    t = Tally()
    for _ in range(3):
        t.add("chat", 200, None, 0.1)
    t.add("aborted", 200, None, 0.1)
    t.add("bad_key", 401, None, 0.01)
    for _ in range(unexpected):
        t.add("chat", 503, None, 0.1, "no healthy upstream")
    return t


def checks(
    t: Tally, rss: list[int], settled: dict[str, float], fds: list[int] | None = None
) -> dict[str, bool]:
    s = samples(rss, fds or [30] * len(rss))
    # idle FDs are reported, not judged: a pool that filled up during warm-up is no leak
    idle = ({"envoy": 30, "extproc": 40}, {"envoy": 90, "extproc": 40})
    return {name: ok for name, ok, _ in verdict(t, s, 0.0, settled, idle)}


def test_verdict_passes_a_clean_soak_and_names_each_failure() -> None:
    flat = [100] * 8
    clean = checks(tally(), flat, {"reported": 3.0, "aborted": 1.0})
    assert all(clean.values()) and len(clean) == 6
    assert tally().routed == 4  # chat and aborted; a refused bad key reached no pod
    failed = checks(tally(unexpected=1), flat, {"reported": 3.0, "aborted": 1.0})
    assert [k for k, ok in failed.items() if not ok] == ["zero unexpected errors"]
    grown = checks(tally(), [100, 100, 106, 106], {"reported": 4.0}, fds=[30, 30, 30, 31])
    assert [k for k, ok in grown.items() if not ok] == [
        "envoy RSS growth after warm-up < 5 %",
        "envoy no FD growth after warm-up",
    ]
    lost = checks(tally(), flat, {"reported": 3.0, "unreported": 1.0})
    assert [k for k, ok in lost.items() if not ok] == ["every usage report settled"]


def test_report_shows_the_verdict_the_figures_and_the_unexpected_answers(tmp_path: Path) -> None:
    t = tally(unexpected=2)
    for kind in MIX:
        t.sent[kind] += 1
    s = samples([100] * 8, [30] * 8)
    idle = ({"envoy": 30, "extproc": 40}, {"envoy": 30, "extproc": 40})
    results = verdict(t, s, 0.0, {"reported": 3.0, "aborted": 1.0}, idle)
    args = argparse.Namespace(
        minutes=0.3, pods=2, time_scale=0.05, workers=32, saturation_seconds=5.0, load=0.8,
        sample_seconds=1.0, warmup=0.0, fd_changes={"envoy": "no kind changed"},
        out=tmp_path / "soak.md",
    )  # fmt: skip
    (tmp_path / "soak.findings.md").write_text("What the run found.\n")
    text = report(args, 50.0, 40.0, t, s, {"reported": 3.0}, results, ((1, 1, 1), (2, 2, 2)), t)
    assert "**Verdict: FAIL.**" in text
    assert "| zero unexpected errors | FAIL | 2 (chat 503: 2) |" in text
    assert "- chat 503: `no healthy upstream`" in text
    assert "**40.0 req/s**" in text and "envoy: no kind changed" in text
    assert "**Verdict: FAIL.**\n\nWhat the run found.\n" in text


def test_fd_changes_names_the_kinds_that_moved() -> None:
    before = Counter({"out 127.0.0.1:6379": 1, "pipe": 2})
    after = Counter({"out 127.0.0.1:6379": 2, "pipe": 2, "in :9002": 1})
    assert fd_changes(before, after) == "in :9002 0 -> 1; out 127.0.0.1:6379 1 -> 2"
    assert fd_changes(before, before) == "no kind changed"
