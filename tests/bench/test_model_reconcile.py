"""The Model reconcile benchmark at toy size: the real operator against the emulator converges on
apply and on an edit of every Model, and the report is built from what it measured. Checks
convergence and structure, never timings (figures belong to bench/reports)."""

from __future__ import annotations

import pytest

from bench.model_reconcile import bucket_quantile, report, run

pytestmark = pytest.mark.timeout(300)

N = 5


async def test_five_models_converge_on_apply_and_edit() -> None:
    apply, edit, stats = await run(N, deadline_s=180.0, progress=False, idle_s=1.0)
    assert stats["pods"] == 2 * N  # one pod per backend, the old ones rolled away
    for phase in (apply, edit):
        assert len(phase.per_model) == N, phase.name  # every Model settled
        assert phase.reconciles >= N and phase.operator_cpu_s > 0
        assert sum(phase.buckets.values()) > 0
    want = {"create_ModelInfer": 2 * N, "create_ModelServer": 2 * N, "create_ModelRoute": N}
    assert set(apply.actions) == set(want), apply.actions  # and no errors
    # a reconcile woken by one child's event may run before the index shows a sibling created
    # a moment ago, and create it again (kmock answers 200 where an API server says 409)
    assert all(apply.actions[k] >= v for k, v in want.items()), apply.actions
    assert apply.by_kind["POST models"] == N
    assert set(edit.actions) == {"patch_ModelInfer"}  # only the image changed
    assert edit.by_kind["PATCH models"] >= N and edit.by_kind["DELETE pods"] == 2 * N
    text = "\n".join(report(N, (apply, edit), stats))
    assert "| apply |" in text and "| edit |" in text


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    cumulative = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert bucket_quantile(cumulative, 0.5) == pytest.approx(0.1)
    assert bucket_quantile(cumulative, 0.7) == pytest.approx(0.3)
    assert bucket_quantile(cumulative, 0.95) == pytest.approx(0.75)
    assert bucket_quantile({}, 0.5) != bucket_quantile({}, 0.5)  # NaN without observations
