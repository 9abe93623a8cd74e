"""``--cluster local`` (default: the local stack, runs anywhere) or ``--cluster kind``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import Cluster, KindCluster, LocalStackCluster


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster",
        choices=["local", "kind"],
        default="local",
        help="where the e2e suite runs: the local stack, or a kind cluster (Docker, kind, helm)",
    )


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    kind = request.config.getoption("--cluster")
    c: Cluster
    if kind == "kind":
        c = KindCluster()
    else:
        c = LocalStackCluster(Path(tmp_path_factory.mktemp("e2e-local")))
    c.install()
    try:
        yield c
    finally:
        c.uninstall()
