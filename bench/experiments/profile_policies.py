"""Where the extproc's CPU goes with policies on, under load (not product code).

``python -m bench.experiments.profile_policies [--config local|redis|data] [--seconds 10]``:
one gateway stack of ``bench.policy_overhead`` (nginx upstream, 1 KB chat body, API key) at an
evenly paced 200 req/s, the extproc sampled by ``py-spy record`` (collapsed stacks, native frames
off). Prints the CPU per request measured meanwhile and the functions with the largest inclusive
and self share of the samples, and keeps the collapsed stacks (``--keep FILE``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gateway_overhead import (
    UPSTREAM_HOSTS,
    gateway_config,
    hey_run,
    nginx_child,
    request_body,
)
from bench.policy_overhead import KEY, policy_routes, start_stack
from matrixinfer.process import free_port


def summarise(collapsed: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    out = [f"{total} samples"]
    out.append("-- inclusive --")
    out += [f"{n / total * 100:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out.append("-- self --")
    out += [f"{n / total * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.profile_policies")
    p.add_argument("--config", choices=("data", "local", "redis"), default="local")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--keep", type=Path, help="write the collapsed stacks here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        port = free_port(UPSTREAM_HOSTS[0])
        wanted = {f"{h}:{port}" for h in UPSTREAM_HOSTS}
        body = json.loads(request_body())
        body["model"] = "limited-model" if args.config != "data" else body["model"]
        (run / "body.json").write_text(json.dumps(body))
        (run / "keys.yaml").write_text(
            f"keys: [{{sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, tenant: bench, "
            "user: bench}]\n"
        )
        (run / "auth.yaml").write_text(f"apiKeysFile: {run / 'keys.yaml'}\n")
        from tests.policies.conftest import RedisServer

        redis = RedisServer(shutil.which("redis-server") or "redis-server", run)
        with nginx_child(run, port):
            redis.start()
            try:
                config = gateway_config(run / "config", port)
                address = redis.address if args.config == "redis" else None
                (config / "limited.yaml").write_text(policy_routes(port, address))
                extra = () if args.config == "data" else ("--auth-config", str(run / "auth.yaml"))
                stack = start_stack(config, run / "stack", wanted, extra)
                try:
                    url = f"{stack.url}/chat/completions"
                    auth = {"authorization": f"Bearer {KEY}"}
                    pids = (stack.envoy.pid, stack.extproc.pid)
                    hey_run(url, run / "body.json", args.rate, 2, pids, headers=auth)  # warm-up
                    out = args.keep or run / "collapsed.txt"
                    spy_bin = str(Path(sys.executable).with_name("py-spy"))
                    spy = subprocess.Popen(
                        [spy_bin, "record", "--pid", str(stack.extproc.pid), "--format", "raw",
                         "--nonblocking", "--rate", "200", "--duration", str(int(args.seconds)),
                         "-o", str(out)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                    )  # fmt: skip
                    res = hey_run(url, run / "body.json", args.rate, args.seconds, pids,
                                  headers=auth)  # fmt: skip
                    spy.wait(timeout=60)
                    print(f"{args.config}: {res.count} requests, {res.errors} errors; CPU/req "
                          f"envoy {res.cpu_ms[0]:.3f} ms, extproc {res.cpu_ms[1]:.3f} ms "
                          "(with the profiler attached)")  # fmt: skip
                    print(summarise(out, args.top))
                finally:
                    stack.stop()
            finally:
                redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
