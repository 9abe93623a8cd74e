"""The suite report: Markdown tables, target checks and PNG plots (matplotlib, Agg backend).

Works on the plain JSON-able result (``SuiteResult.to_json()`` loaded back), so a report can be
rebuilt from ``<name>.json`` without rerunning: ``python -m bench --from-json <name>.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.suite.peer_targets import check_peer_targets, peer_target_rows

__all__ = ["TargetCheck", "check_targets", "write_plots", "write_report"]

OURS = "ours-default"
PEER = "vllm-router-cache_aware"


def _ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * 1000:.0f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _points(result: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [p for p in result["points"] if all(p.get(k) == v for k, v in match.items())]


def _point(result: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    found = _points(result, **match)
    return found[0] if found else None


@dataclass(slots=True)
class TargetCheck:
    qps: float
    baseline_p90: float
    unloaded: float
    ours_p90: float
    peer_p90: float | None
    ours_tok: float
    baseline_tok: float
    p90_ratio: float
    p90_ok: bool
    vs_peer_ok: bool | None
    tok_ratio: float
    tok_ok: bool
    ours_errors: int

    @property
    def passed(self) -> bool:
        return self.p90_ok and self.vs_peer_ok is not False and self.tok_ok


def check_targets(result: dict[str, Any]) -> tuple[float, list[TargetCheck]]:
    """(unloaded TTFT, one check per sweep QPS where the baseline's p90 TTFT >= 5x unloaded).

    Unloaded TTFT = the baseline's median TTFT in the probe (one request at a time)."""
    cfg = result["config"]
    base = cfg["baseline"]
    workload = cfg["sweep_workload"]
    probe = _point(result, contender=base, workload=workload, mode="probe")
    if probe is None:
        return math.nan, []
    unloaded = probe["summary"]["ttft_p50"]
    checks = []
    for qps in cfg["sweep_qps"]:
        b = _point(result, contender=base, workload=workload, mode="open", qps=qps)
        o = _point(result, contender=OURS, workload=workload, mode="open", qps=qps)
        if b is None or o is None:
            continue
        bp90 = b["summary"]["ttft_p90"]
        if not bp90 >= 5 * unloaded:
            continue
        peer = _point(result, contender=PEER, workload=workload, mode="open", qps=qps)
        op90 = o["summary"]["ttft_p90"]
        pp90 = peer["summary"]["ttft_p90"] if peer else None
        otok, btok = o["summary"]["output_tok_per_s"], b["summary"]["output_tok_per_s"]
        checks.append(
            TargetCheck(
                qps=qps,
                baseline_p90=bp90,
                unloaded=unloaded,
                ours_p90=op90,
                peer_p90=pp90,
                ours_tok=otok,
                baseline_tok=btok,
                p90_ratio=op90 / bp90,
                p90_ok=op90 <= 0.3 * bp90,
                vs_peer_ok=None if pp90 is None else op90 <= pp90,
                tok_ratio=otok / btok if btok else math.nan,
                tok_ok=btok > 0 and otok >= 1.5 * btok,
                ours_errors=int(o["summary"]["errors"]),
            )
        )
    return unloaded, checks


def _contenders(result: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for p in result["points"]:
        if p["contender"] not in seen:
            seen.append(p["contender"])
    return seen


def write_plots(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """TTFT CDF per contender (highest sweep QPS), throughput and p90 TTFT versus QPS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cfg = result["config"]
    workload = cfg["sweep_workload"]
    contenders = [c for c in _contenders(result) if _points(result, contender=c, mode="open")]
    paths: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. TTFT CDF at every sweep QPS (one panel each)
    qps_list = list(cfg["sweep_qps"])
    if qps_list:
        cols = min(len(qps_list), 4)
        rows = math.ceil(len(qps_list) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
        for k, qps in enumerate(qps_list):
            ax = axes[k // cols][k % cols]
            for c in contenders:
                p = _point(result, contender=c, workload=workload, mode="open", qps=qps)
                if p is None or not p["ttfts"]:
                    continue
                xs = p["ttfts"]
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=c, linewidth=1.2)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{workload} @ {qps:g} QPS", fontsize=9)
            ax.set_xlabel("TTFT (s)", fontsize=8)
            ax.set_ylabel("fraction", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for k in range(len(qps_list), rows * cols):
            axes[k // cols][k % cols].axis("off")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        path = out_dir / f"{name}-ttft-cdf.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)

    # 2. throughput and p90 TTFT versus QPS
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for c in contenders:
        pts = sorted(
            _points(result, contender=c, workload=workload, mode="open"), key=lambda p: p["qps"]
        )
        xs = [p["qps"] for p in pts]
        ax1.plot(xs, [p["summary"]["output_tok_per_s"] for p in pts], marker="o", label=c)
        ax2.plot(xs, [p["summary"]["ttft_p90"] for p in pts], marker="o", label=c)
    ax1.set_xlabel("offered QPS", fontsize=8)
    ax1.set_ylabel("output tokens/s", fontsize=8)
    ax1.set_title(f"{workload}: throughput", fontsize=9)
    ax2.set_xlabel("offered QPS", fontsize=8)
    ax2.set_ylabel("p90 TTFT (s)", fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title(f"{workload}: p90 TTFT", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{name}-vs-qps.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
    return paths


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _point_rows(points: list[dict[str, Any]], baseline: dict[float, dict[str, Any]]) -> list[str]:
    lines = [
        _row(
            [
                "contender",
                "QPS",
                "ok / sent",
                "TTFT p50",
                "TTFT p90",
                "TTFT p99",
                "ITL p50",
                "ITL p90",
                "e2e p90",
                "req/s",
                "out tok/s",
                "cached",
                "p90 / base",
                "tok/s / base",
            ]
        ),
        _row(["---"] * 14),
    ]
    for p in points:
        s = p["summary"]
        b = baseline.get(p["qps"])
        p90r = tokr = "-"
        if b is not None:
            bs = b["summary"]
            if bs["ttft_p90"] and not math.isnan(bs["ttft_p90"]):
                p90r = f"{s['ttft_p90'] / bs['ttft_p90']:.2f}"
            if bs["output_tok_per_s"]:
                tokr = f"{s['output_tok_per_s'] / bs['output_tok_per_s']:.2f}"
        lines.append(
            _row(
                [
                    p["contender"],
                    _num(p["qps"], "g") if p["mode"] == "open" else "probe",
                    f"{s['ok']} / {s['requests']}",
                    _ms(s["ttft_p50"]),
                    _ms(s["ttft_p90"]),
                    _ms(s["ttft_p99"]),
                    _num(s["itl_p50"] * 1000),
                    _num(s["itl_p90"] * 1000),
                    _ms(s["e2e_p90"]),
                    _num(s["req_per_s"]),
                    _num(s["output_tok_per_s"], ".0f"),
                    _num(s["cached_fraction"], ".2f"),
                    p90r,
                    tokr,
                ]
            )
        )
    return lines


def write_report(
    result: dict[str, Any],
    out_dir: Path,
    *,
    machine: dict[str, str],
    versions: dict[str, str],
    command: str,
    notes: str = "",
) -> Path:
    cfg = result["config"]
    name = cfg["name"]
    base = cfg["baseline"]
    workload = cfg["sweep_workload"]
    plots = write_plots(result, out_dir, name)
    unloaded, checks = check_targets(result)
    out: list[str] = [f"# Benchmark suite `{name}`: scheduling quality side by side", ""]
    out += [
        f"Run {result['started']}, {result['seconds'] / 60:.1f} min. Command: `{command}` "
        "(`make bench` runs `.venv/bin/python -m bench`).",
        "",
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items())
        + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".",
        "",
        f"Fleet: {cfg['replicas']} simulator pods (`matrixinfer-sim`), each with "
        f"`{' '.join(cfg['sim_args'])}`, {cfg['adapters']} LoRA adapters loaded through "
        "`POST /v1/load_lora_adapter`; a fresh fleet (cold KV caches) for every contender.",
        "",
        f"Sweep workload `{workload}` with {cfg['sweep_args']}, open-loop Poisson arrivals for "
        f"{cfg['duration']:g} s per point (then up to {cfg['drain_timeout']:g} s to finish); "
        "each point uses new system prompts (workload seed + point index).",
        "",
    ]
    if notes:
        out += [notes.strip(), ""]
    findings = out_dir / f"{name}.findings.md"
    if findings.exists():  # hand-written commentary on the committed run, kept across rebuilds
        out += [findings.read_text().strip(), ""]
    if result["failures"]:
        out += ["**Contenders that failed to run:**", ""]
        out += [f"- {f}" for f in result["failures"]]
        out += [""]

    out += ["## Targets", ""]
    if math.isnan(unloaded):
        out += ["No probe of the baseline: targets not evaluated.", ""]
    elif not checks:
        out += [
            f"Unloaded TTFT ({base}, one request at a time): {_ms(unloaded)} ms. No sweep point "
            f"loaded {base} to a p90 TTFT of 5x that, so the targets were not evaluated "
            "(raise the sweep QPS).",
            "",
        ]
    else:
        out += [
            f"Unloaded TTFT ({base}, one request at a time, p50): {_ms(unloaded)} ms. Checked at "
            f"every sweep QPS where {base}'s p90 TTFT is at least 5x that. Targets: {OURS} p90 "
            f"TTFT <= 0.3x {base}'s and <= {PEER}'s; output tokens/s >= 1.5x {base}'s.",
            "",
            _row(
                [
                    "QPS",
                    f"{base} p90",
                    f"{OURS} p90",
                    "ratio (<= 0.3)",
                    f"{PEER} p90",
                    "<= peer",
                    "tok/s ratio (>= 1.5)",
                    f"{OURS} errors",
                    "all met",
                ]
            ),
            _row(["---"] * 9),
        ]
        for c in checks:
            out.append(
                _row(
                    [
                        f"{c.qps:g}",
                        f"{_ms(c.baseline_p90)} ms",
                        f"{_ms(c.ours_p90)} ms",
                        f"{c.p90_ratio:.2f} {'met' if c.p90_ok else 'MISSED'}",
                        f"{_ms(c.peer_p90)} ms" if c.peer_p90 is not None else "not run",
                        "-" if c.vs_peer_ok is None else ("met" if c.vs_peer_ok else "MISSED"),
                        f"{c.tok_ratio:.2f} {'met' if c.tok_ok else 'MISSED'}",
                        str(c.ours_errors),
                        "yes" if c.passed else "no",
                    ]
                )
            )
        out.append("")

    out += peer_target_rows(check_peer_targets(result))
    out += [f"## Sweep: `{workload}`", ""]
    for p in plots:
        out += [f"![{p.stem}]({p.name})", ""]
    base_pts = {
        p["qps"]: p for p in _points(result, contender=base, workload=workload, mode="open")
    }
    sweep_points = [p for p in result["points"] if p["workload"] == workload]
    sweep_points.sort(key=lambda p: (p["mode"] != "probe", p["qps"]))
    out += [
        "Times in ms. `cached` = prompt tokens served from the engines' prefix cache / prompt "
        "tokens (from `usage.prompt_tokens_details.cached_tokens`). Ratios are against "
        f"{base} at the same QPS. Output tokens/s = output tokens of completed requests / "
        "(last completion - first send), so a contender that falls behind the offered load "
        "shows its capacity.",
        "",
    ]
    out += _point_rows(sweep_points, base_pts)
    out.append("")

    extra = [p for p in result["points"] if p["workload"] != workload]
    if extra:
        out += ["## Other workloads", ""]
        for wl in dict.fromkeys(p["workload"] for p in extra):
            pts = [p for p in extra if p["workload"] == wl]
            bpts = {p["qps"]: p for p in pts if p["contender"] == base}
            out += [f"### `{wl}`", ""]
            out += _point_rows(pts, bpts)
            out.append("")

    out += [
        "## Where the CPU went",
        "",
        "Cores used during each point (CPU seconds / wall seconds) by the load generator, the "
        "routing layer and the simulators, and how busy the whole 2-core machine was (other "
        "work on the machine included). Send lag = worst delay of an open-loop arrival behind "
        "its schedule.",
        "",
        _row(
            [
                "contender",
                "workload",
                "QPS",
                "loadgen",
                "envoy",
                "extproc",
                "vllm-router",
                "sims",
                "machine busy",
                "send lag (ms)",
            ]
        ),
        _row(["---"] * 10),
    ]
    for p in result["points"]:
        cpu = p.get("cpu", {})
        out.append(
            _row(
                [
                    p["contender"],
                    p["workload"],
                    _num(p["qps"], "g") if p["mode"] == "open" else "probe",
                    f"{p['loadgen_cpu']:.2f}",
                    *(f"{cpu[k]:.2f}" if k in cpu else "-" for k in ("envoy", "extproc")),
                    f"{cpu['vllm-router']:.2f}" if "vllm-router" in cpu else "-",
                    f"{cpu['sims']:.2f}" if "sims" in cpu else "-",
                    f"{p['machine_busy']:.0%}",
                    _ms(p["summary"]["max_send_lag"]),
                ]
            )
        )
    out.append("")
    errors = [p for p in result["points"] if p["summary"]["errors"]]
    if errors:
        out += ["## Errors", ""]
        for p in errors:
            out.append(
                f"- {p['contender']} / {p['workload']} @ {p['qps']:g}: "
                f"{p['summary']['errors']} ({p['summary']['error_kinds']})"
            )
        out.append("")
    related = [
        (f, what)
        for f, what in (
            ("gateway_overhead.md", "added latency and CPU per request of Envoy + extproc"),
            ("scheduler_cost.md", "CPU per scheduling decision, profiles compared offline"),
            ("sim_itl.md", "the simulator's timing fidelity"),
        )
        if (out_dir / f).exists()
    ]
    if related:
        out += ["## Related reports", ""]
        out += [f"- [{f}]({f}): {what}" for f, what in related]
        out.append("")
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(out))
    return path
