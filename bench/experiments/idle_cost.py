"""Background CPU of an idle MatrixInfer extproc (scraper, config poll) in ms per second.

``python -m bench.experiments.idle_cost``: the bench configuration (4 nginx pods), no traffic,
8 s windows at scrape intervals 0.2 s (the default) and 1 s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.gateway_overhead import UPSTREAM_HOSTS, cpu_seconds, gateway_config, nginx_child
from matrixinfer.process import free_port, wait_until
from matrixinfer.stack import GatewayStack, StackOptions


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        port = free_port(UPSTREAM_HOSTS[0])
        wanted = {f"{h}:{port}" for h in UPSTREAM_HOSTS}
        with nginx_child(run, port):
            for scrape in (0.2, 1.0):
                options = StackOptions(extproc_log_level="WARNING", scrape_interval=scrape)
                stack = GatewayStack(gateway_config(run, port), run / f"s{scrape}", options)
                with stack:

                    def ready(s: GatewayStack = stack) -> bool:
                        return s.extproc_ready() and wanted <= s.envoy_hosts()

                    wait_until(ready, 20, "ready")
                    time.sleep(1)
                    c0, t0 = cpu_seconds(stack.extproc.pid), time.monotonic()
                    time.sleep(8)
                    used = cpu_seconds(stack.extproc.pid) - c0
                    print(
                        f"scrape interval {scrape}s: idle extproc CPU "
                        f"{1000 * used / (time.monotonic() - t0):.1f} ms per second"
                    )


if __name__ == "__main__":
    main()
