"""Which pods serve the Open Inference Protocol's gRPC service, and where (fleet.pods)."""

from __future__ import annotations

from fleet.pods import grpc_pod_addresses, index_by_label, members
from tests.extproc.helpers import config, server_yaml

GRPC_SERVER = server_yaml("with-grpc", {"app": "a"}, grpc_port=8001)
HTTP_SERVER = server_yaml("http-only", {"app": "b"})


def test_a_model_servers_grpc_port_gives_its_pods_grpc_addresses() -> None:
    cfg = config(
        GRPC_SERVER + "---\n" + HTTP_SERVER,
        [
            ("a1", "10.0.0.1", {"app": "a"}),
            ("a2", "10.0.0.2:9000", {"app": "a"}),  # an endpoint's own port: HTTP only
            ("b1", "10.0.0.3", {"app": "b"}),
        ],
    )
    assert grpc_pod_addresses(cfg) == ["10.0.0.1:8001", "10.0.0.2:8001"]
    by_label = index_by_label(cfg.endpoints)
    http_only = next(s for s in cfg.servers if s.metadata.name == "http-only")
    assert [m.grpc for m in members(http_only, by_label, [])] == [None]


def test_a_pod_label_no_longer_marks_grpc() -> None:
    cfg = config(HTTP_SERVER, [("b1", "10.0.0.3", {"app": "b", "matrixinfer.io/grpc-port": "1"})])
    assert grpc_pod_addresses(cfg) == []
