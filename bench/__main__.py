"""``python -m bench``: run a benchmark suite and write its report (``make bench``: the default).

python -m bench                          # default suite -> bench/reports/default.md + PNGs
python -m bench --suite smoke --out DIR  # the tiny suite the tests run
python -m bench --contenders envoy-rr,ours-default --qps 20,40 --duration 10
python -m bench --from-json bench/reports/default.json   # rebuild the report only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    from bench.suite.config import SUITES

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="default", choices=sorted(SUITES), help="suite to run")
    p.add_argument("--out", type=Path, default=_ROOT / "reports", help="report directory")
    p.add_argument("--name", help="report name (default: the suite's)")
    p.add_argument("--run-dir", type=Path, help="logs of the sims and routers (default: temp)")
    p.add_argument("--contenders", help="comma-separated contenders (default: the suite's)")
    p.add_argument("--qps", help="comma-separated sweep QPS points (default: the suite's)")
    p.add_argument(
        "--duration",
        type=float,
        help="seconds of arrivals per point (default: the suite's; other workloads that set "
        "their own keep it)",
    )
    p.add_argument("--replicas", type=int, help="simulator pods")
    p.add_argument("--no-extra", action="store_true", help="only the sweep, no other workloads")
    p.add_argument("--from-json", type=Path, help="rebuild the report from a results file")
    p.add_argument("--notes", type=Path, help="Markdown file added to the report's introduction")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bench.contenders import CONTENDERS, contender_versions
    from bench.suite.config import SUITES
    from bench.suite.report import write_report
    from bench.suite.run import machine_info, run_suite

    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    notes = args.notes.read_text() if args.notes else None
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        path = write_report(
            data["result"],
            args.out,
            machine=data["machine"],
            versions=data["versions"],
            command=data["command"],
            notes=data["result"]["config"].get("notes", "") if notes is None else notes,
        )
        print(f"report: {path}")
        return 0
    update: dict[str, object] = {}
    if args.name:
        update["name"] = args.name
    if args.contenders:
        names = [c.strip() for c in args.contenders.split(",") if c.strip()]
        unknown = [c for c in names if c not in CONTENDERS]
        if unknown:
            print(
                f"error: unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}",
                file=sys.stderr,
            )
            return 2
        update["contenders"] = names
        if "envoy-rr" not in names:
            update["baseline"] = names[0]
    if args.qps:
        try:
            update["sweep_qps"] = [float(x) for x in args.qps.split(",")]
        except ValueError:
            print(
                f"error: --qps must be comma-separated numbers, got {args.qps!r}", file=sys.stderr
            )
            return 2
    if args.duration:
        update["duration"] = args.duration
    if args.replicas:
        update["replicas"] = args.replicas
    if args.no_extra:
        update["extra"] = []
    config = SUITES[args.suite].model_copy(update=update)
    config = type(config).model_validate(config.model_dump())  # validate the overrides
    if args.contenders:
        extras = [
            e.model_copy(update={"contenders": [c for c in e.contenders if c in config.contenders]})
            for e in config.extra
        ]
        config = config.model_copy(update={"extra": extras})
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix=f"bench-{config.name}-"))
    print(f"suite {config.name}: logs in {run_dir}", flush=True)
    result = run_suite(config, run_dir)
    data = json.loads(result.to_json())
    machine, versions = machine_info(), contender_versions()
    args.out.mkdir(parents=True, exist_ok=True)
    for p in data["points"]:
        p["ttfts"] = [round(x, 5) for x in p["ttfts"]]
    (args.out / f"{config.name}.json").write_text(
        json.dumps(
            {"result": data, "machine": machine, "versions": versions, "command": command},
            separators=(",", ":"),
        )
    )
    path = write_report(
        data,
        args.out,
        machine=machine,
        versions=versions,
        command=command,
        notes=config.notes if notes is None else notes,
    )
    print(f"report: {path} ({result.seconds / 60:.1f} min)")
    return 1 if result.failures else 0


if __name__ == "__main__":
    from matrixinfer.process import unwind_on_sigterm

    unwind_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the children started are stopped
    sys.exit(main())
