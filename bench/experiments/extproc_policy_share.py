"""Whose CPU is usage accounting's (``python -m bench.experiments.extproc_policy_share``). Not a
test.

Three stacks of ``bench.policy_overhead`` (nginx upstream, 1 KB chat body, 200 req/s, interleaved
rounds): the data path; usage accounting (``--policies``); and ``--policies`` with Envoy's usage
filters and access log left out (xDS ``--no-policy-filters``: the extproc decides and marks as
with accounting, but no report ever comes back). Prints, per stack, the medians over the rounds of
p50 and of Envoy's and the extproc's CPU per request, and the paired differences to the data path.
"""

from __future__ import annotations

import argparse
import statistics as st
import tempfile
from pathlib import Path

from bench.gateway_overhead import UPSTREAM_HOSTS, gateway_config, nginx_child, request_body
from bench.policy_overhead import Window, hey, paired_median, rotation, start_stack
from matrixinfer.process import free_port, unwind_on_sigterm

STACKS = (
    ("data path", (), ()),
    ("usage accounting", ("--policies",), ()),
    ("policies, no Envoy usage filters", ("--policies",), ("--no-policy-filters",)),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.extproc_policy_share")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rate", type=float, default=200.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        port = free_port(UPSTREAM_HOSTS[0])
        wanted = {f"{h}:{port}" for h in UPSTREAM_HOSTS}
        body = run / "body.json"
        body.write_bytes(request_body())
        with nginx_child(run, port):
            stacks = []
            try:
                for i, (name, extra, xds) in enumerate(STACKS):
                    config = gateway_config(run / f"config-{i}", port)
                    stacks.append((name, start_stack(config, run / f"run-{i}", wanted, extra, xds)))
                rows: dict[str, list[Window]] = {name: [] for name, _ in stacks}
                for r in range(args.rounds):
                    for name, s in rotation(stacks, r):
                        pids = (s.envoy.pid, s.extproc.pid)
                        w = hey(name, f"{s.url}/chat/completions", body, args.rate, args.seconds,
                                pids)  # fmt: skip
                        rows[name].append(w)
            finally:
                for _, s in stacks:
                    s.stop()
    base = rows[STACKS[0][0]]
    print(f"{'stack':34} {'p50':>6} {'Δp50':>6} {'Envoy':>6} {'ΔEnvoy':>7} {'extproc':>7} "
          f"{'Δextproc':>8}  (ms; CPU per request)")  # fmt: skip
    for name, ws in rows.items():
        print(f"{name:34} {st.median(w.p50 for w in ws):6.2f} "
              f"{paired_median(ws, base, lambda w: w.p50):+6.2f} "
              f"{st.median(w.cpu_envoy_ms for w in ws):6.3f} "
              f"{paired_median(ws, base, lambda w: w.cpu_envoy_ms):+7.3f} "
              f"{st.median(w.cpu_extproc_ms for w in ws):7.3f} "
              f"{paired_median(ws, base, lambda w: w.cpu_extproc_ms):+8.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    raise SystemExit(main())
