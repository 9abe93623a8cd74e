"""bench.pd's pure parts: the stalled-gap share and the --prefill-pods option."""

from __future__ import annotations

import math

import pytest

from bench import pd
from bench.loadgen import LoadResult, RequestRecord


def _rec(itl: list[float], error: str = "") -> RequestRecord:
    return RequestRecord(tag="", turn=0, scheduled=0.0, sent=0.0, itl=itl, error=error)


def test_stall_share_counts_long_gaps_of_successful_streams() -> None:
    result = LoadResult(
        records=[_rec([0.01, 0.01, 0.2]), _rec([0.01]), _rec([0.3, 0.3], error="http 503")],
        wall=1.0,
        max_send_lag=0.0,
        mode="open",
        target=1.0,
    )
    assert pd.stall_share(result) == pytest.approx(1 / 4)


def test_stall_share_without_gaps_is_nan() -> None:
    assert math.isnan(pd.stall_share(LoadResult([], 0.0, 0.0, "open", 1.0)))


def test_prefill_pods_must_leave_both_roles(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pd.main(["--pods", "4", "--prefill-pods", "2,4", "--no-write"])
    assert "--prefill-pods: [4] leave no prefill or no decode pod of --pods 4" in (
        capsys.readouterr().err
    )


def test_prefill_pods_must_be_integers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pd.main(["--prefill-pods", "two"])
    assert "not comma-separated integers: 'two'" in capsys.readouterr().err


def test_to_simulated_divides_every_time_by_the_time_scale() -> None:
    rec = RequestRecord(tag="len4000", turn=0, scheduled=2.0, sent=2.2, ttft=0.8, e2e=3.0,
                        itl=[0.02, 0.3])  # fmt: skip
    result = pd.to_simulated(LoadResult([rec], 40.0, 0.4, "open", 6.0), 2.0)
    r = result.records[0]
    assert (r.scheduled, r.sent, r.ttft, r.e2e, r.itl) == (1.0, 1.1, 0.4, 1.5, [0.01, 0.15])
    assert (result.wall, result.max_send_lag) == (20.0, 0.2)


def test_breakdown_splits_ttft_by_prompt_length_and_reads_no_page_without_pods() -> None:
    recs = [
        RequestRecord(tag="len4000", turn=0, scheduled=0.0, sent=0.0, ttft=t)
        for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    ] + [RequestRecord(tag="len100", turn=0, scheduled=0.0, sent=0.0, ttft=0.05)]
    pods = pd.Pods([], "", [], [], [], [])
    b = pd.breakdown(LoadResult(recs, 1.0, 0.0, "open", 1.0), pods, long_tokens=4000)
    assert b.ttft_short_p90 == pytest.approx(0.05)
    assert b.ttft_long_mean == pytest.approx(0.55)
    assert 0.9 <= b.ttft_long_p90 <= 1.0
    assert math.isnan(b.handoff) and math.isnan(b.prefill_queue)
