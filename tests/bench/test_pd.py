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
