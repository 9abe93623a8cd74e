"""Per-request CPU of the policy path in process, without gRPC (not product code).

``python -m bench.experiments.policy_inproc [--n 5000]``: the real ``ExtProcServicer.Process``
(grpc.aio-like fake context, as ``bench.experiments.inproc``) on ``bench.policy_overhead``'s
configuration — data path; ``--policies`` (usage accounting only); ``--auth-config`` with an API
key and local limits — and, for the policy configurations, the usage report of each request
through the real ``AccessLogServicer`` (an access-log message with 20 entries shaped like
Envoy's). Best of 5 rounds, CPU time (``time.process_time``) per request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2

from bench.experiments.inproc import FakeContext
from bench.experiments.inproc import messages as chat_messages
from bench.gateway_overhead import gateway_config, request_body
from bench.policy_overhead import KEY, policy_routes
from extproc.datastore import Datastore
from extproc.gateway import Gateway
from extproc.metrics import GatewayMetrics
from extproc.policies.auth import AuthConfig
from extproc.policies.enforce import Policies, PolicySettings
from extproc.policies.usage import AccessLogServicer
from extproc.transport.grpc_servicer import ExtProcServicer
from fleet.config import GatewayConfig
from fleet.files import ConfigWatcher

BATCH = 20  # entries per access-log message (100 ms of 200 req/s)


def messages(body: bytes, auth: bool) -> list[bytes]:
    extra = [("authorization", f"Bearer {KEY}")] if auth else []
    return [m.SerializeToString() for m in chat_messages(body, extra)]


class Capture(FakeContext):
    """Keeps the envoy.lb metadata of the routing reply (for the access-log entry)."""

    last: Any = None

    async def write(self, msg: Any) -> None:
        self.out += len(msg.SerializeToString())
        if msg.HasField("dynamic_metadata"):
            Capture.last = msg.dynamic_metadata


def log_entry(lb: struct_pb2.Struct) -> al.HTTPAccessLogEntry:
    """An entry shaped like Envoy's http_grpc one for a routed, reported request."""
    e = al.HTTPAccessLogEntry()
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "127.0.0.1"
    c.downstream_remote_address.socket_address.port_value = 40000
    c.downstream_local_address.socket_address.address = "127.0.0.1"
    c.downstream_local_address.socket_address.port_value = 10000
    c.upstream_remote_address.socket_address.address = "127.0.0.61"
    c.upstream_remote_address.socket_address.port_value = 8080
    c.upstream_cluster = "matrixinfer_pods"
    c.start_time.GetCurrentTime()
    c.time_to_last_rx_byte.nanos = 900_000
    c.time_to_first_upstream_tx_byte.nanos = 1_500_000
    c.time_to_last_downstream_tx_byte.nanos = 3_000_000
    c.metadata.filter_metadata["envoy.lb"].CopyFrom(lb.fields["envoy.lb"].struct_value)
    md = c.metadata.filter_metadata["matrixinfer"]
    md.update({"prompt": 250, "completion": 20, "done": True})
    e.protocol_version = al.HTTPAccessLogEntry.HTTP11
    r = e.request
    r.request_method = base_pb2.POST
    r.scheme = "http"
    r.authority = "127.0.0.1:10000"
    r.path = "/v1/chat/completions"
    r.user_agent = "hey/0.0.1"
    r.request_id = "b1c4e3a0-1111-2222-3333-444455556666"
    r.request_headers_bytes = 300
    r.request_body_bytes = 1024
    e.response.response_code.value = 200
    e.response.response_headers_bytes = 200
    e.response.response_body_bytes = 1100
    return e


async def bench(gw: Gateway, wire: list[bytes], n: int, als: bool, rounds: int = 5) -> list[float]:
    servicer = ExtProcServicer(gw)
    policies = gw.policies
    usage = AccessLogServicer(policies.ledger) if policies is not None else None
    out = []
    for _ in range(rounds):
        entries: list[al.HTTPAccessLogEntry] = []
        t0 = time.process_time()
        for _ in range(n):
            await servicer.Process(None, Capture(wire))  # type: ignore[arg-type]
            if usage is not None and als:
                entries.append(log_entry(Capture.last))
                if len(entries) == BATCH:
                    t1 = time.process_time()
                    msg = als_pb2.StreamAccessLogsMessage()
                    msg.http_logs.log_entry.extend(entries)
                    data = msg.SerializeToString()
                    entries.clear()
                    t0 += time.process_time() - t1  # building the entries is Envoy's work

                    async def stream(data: bytes = data) -> AsyncIterator[Any]:
                        yield als_pb2.StreamAccessLogsMessage.FromString(data)

                    await usage.StreamAccessLogs(stream(), None)
        out.append((time.process_time() - t0) / n * 1e6)
    return out


def build(tmp: Path, config: str) -> Gateway:
    cfg = gateway_config(tmp / "config", 8080)
    (cfg / "limited.yaml").write_text(policy_routes(8080, None))
    ds = Datastore()

    def apply(c: GatewayConfig) -> None:
        ds.apply(c)

    assert ConfigWatcher(cfg, apply).load_now()
    metrics = GatewayMetrics()
    gw = Gateway(ds, metrics)
    if config != "data":
        auth = None
        if config == "local":
            (tmp / "keys.yaml").write_text(
                f"keys: [{{sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, tenant: bench, "
                "user: bench}]\n"
            )
            (tmp / "auth.yaml").write_text(f"apiKeysFile: {tmp / 'keys.yaml'}\n")
            auth = AuthConfig.load(tmp / "auth.yaml")
        gw.policies = Policies(PolicySettings(auth=auth), metrics.registry)
    return gw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.policy_inproc")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--case", type=int, help="run only this case (0-4; for callgrind)")
    args = p.parse_args(argv)
    body = request_body()
    limited = json.loads(body)
    limited["model"] = "limited-model"
    cases = (
        ("data path", "data", body, False),
        ("usage accounting only, decision", "usage", body, False),
        ("usage accounting only, decision + report", "usage", body, True),
        ("auth + local limits, decision", "local", json.dumps(limited).encode(), False),
        ("auth + local limits, decision + report", "local", json.dumps(limited).encode(), True),
    )
    for i, (label, config, raw, als) in enumerate(cases):
        if args.case is not None and i != args.case:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            gw = build(Path(tmp), config)
            wire = messages(raw, auth=True)
            us = uvloop.run(bench(gw, wire, args.n, als, args.rounds))
            print(f"{label:45s} best {min(us):6.1f} us/request, rounds "
                  f"{', '.join(f'{x:.1f}' for x in us)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
