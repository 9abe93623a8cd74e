"""What a virtual-time run writes: the suite's table and plots, per-request and per-pod data.

The summary table and the TTFT / throughput plots are the benchmark suite's own
(``bench.suite.report``), fed the same point shape (:meth:`SimResult.point`), so a virtual run
and a wall-clock run read alike. On top: one JSONL line per request (TTFT, inter-token latency,
end-to-end, queue time, cached tokens, pod) and each pod's load over time (CSV and a plot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.fleetsim.core import SimResult
from bench.suite.report import _point_rows, write_plots

__all__ = [
    "comparison_table",
    "summary_table",
    "write_load_csv",
    "write_load_plot",
    "write_outputs",
    "write_requests",
]


def summary_table(results: Sequence[SimResult], baseline: str = "envoy-rr") -> str:
    """The suite's Markdown table of these points, one per workload (under a ``###`` heading when
    there are several), ratios against ``baseline`` at the same QPS."""
    points = [r.point() for r in results]
    workloads = list(dict.fromkeys(p["workload"] for p in points))
    out: list[str] = []
    for w in workloads:
        mine = [p for p in points if p["workload"] == w]
        # a trace's QPS is NaN: key it by a placeholder so its baseline is found
        base = {_key(p["qps"]): p for p in mine if p["contender"] == baseline}
        keyed = [{**p, "qps": _key(p["qps"])} for p in mine]
        rows = _point_rows(keyed, base)
        if len(workloads) > 1:
            out += [f"### {w or 'trace'}", ""]
        out += [*(r.replace("| -1 |", "| - |") for r in rows), ""]
    return "\n".join(out).rstrip("\n")


def _key(qps: float) -> float:
    return -1.0 if math.isnan(qps) else qps


def comparison_table(
    rows: Sequence[tuple[str, str, float, float]], header: tuple[str, str] = ("before", "after")
) -> str:
    """A before/after table: (case, metric, before, after) rows, with the after/before ratio."""
    out = [
        f"| case | metric | {header[0]} | {header[1]} | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case, metric, a, b in rows:
        ratio = b / a if a else math.nan
        out.append(f"| {case} | {metric} | {a:.4g} | {b:.4g} | {ratio:.2f} |")
    return "\n".join(out)


def write_requests(result: SimResult, path: Path) -> None:
    """One JSON line per request (times in seconds; ``itl`` = the mean inter-token gap)."""
    with open(path, "w") as f:
        for r in result.records:
            line: dict[str, Any] = {
                "request_id": r.request_id,
                "session": r.tag,
                "turn": r.turn,
                "sent": round(r.sent, 6),
                "pod": r.pod,
                "status": r.status,
                "ttft": r.ttft,
                "itl": sum(r.itl) / len(r.itl) if r.itl else None,
                "e2e": r.e2e,
                "queue": r.queue,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "output_tokens": r.output_tokens,
            }
            if r.error:
                line["error"] = r.error
            f.write(json.dumps(line) + "\n")


def write_load_csv(result: SimResult, path: Path) -> None:
    """``t,pod,in_flight,waiting,running,kv_usage`` rows, one per pod per sample."""
    with open(path, "w") as f:
        f.write("t,pod,in_flight,waiting,running,kv_usage\n")
        for s in result.load:
            f.write(f"{s.t:.3f},{s.pod},{s.in_flight},{s.waiting},{s.running},{s.kv_usage:.4f}\n")


def write_load_plot(results: Sequence[SimResult], path: Path) -> Path:
    """Requests in flight per pod over time, one panel per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 1, figsize=(8, 2.2 * len(results)), squeeze=False, sharex=True
    )
    for ax, res in zip((a[0] for a in axes), results, strict=True):
        for pod in res.pods:
            xs = [s.t for s in res.load if s.pod == pod]
            ys = [s.in_flight for s in res.load if s.pod == pod]
            ax.plot(xs, ys, linewidth=0.9, label=pod)
        ax.set_title(f"{res.contender}: requests in flight per pod", fontsize=9)
        ax.set_ylabel("in flight", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("virtual time (s)", fontsize=8)
    axes[0][0].legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_outputs(
    results: Sequence[SimResult], out_dir: Path, name: str, *, plots: bool = True
) -> list[Path]:
    """Per contender: ``<name>-<contender>.requests.jsonl`` and ``.load.csv``; with ``plots``
    the suite's TTFT CDF and versus-QPS plots and ``<name>-load.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for r in results:
        stem = f"{name}-{r.contender}-{r.workload or 'trace'}"
        if not math.isnan(r.qps):
            stem += f"-{r.qps:g}"
        write_requests(r, out_dir / f"{stem}.requests.jsonl")
        write_load_csv(r, out_dir / f"{stem}.load.csv")
        written += [out_dir / f"{stem}.requests.jsonl", out_dir / f"{stem}.load.csv"]
    if plots and results:
        workload = results[0].workload or "trace"
        qps = sorted({r.qps for r in results if r.mode == "open" and not math.isnan(r.qps)})
        suite_like = {
            "config": {"sweep_workload": workload, "sweep_qps": qps},
            "points": [{**r.point(), "workload": workload} for r in results if r.mode == "open"],
        }
        if qps:
            written += write_plots(suite_like, out_dir, name)
        last_qps = qps[-1] if qps else math.nan
        top = [r for r in results if r.qps == last_qps] or list(results)
        written.append(write_load_plot(top, out_dir / f"{name}-load.png"))
    return written
