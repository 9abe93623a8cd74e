"""The examples a user applies are not only valid objects: the gateway accepts what they ask for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import crds
from extproc.scheduling import build_scheduler

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _model_servers() -> list[tuple[str, crds.ModelServer]]:
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        if "invalid" in path.parts:
            continue
        # example folders also hold other kinds (Deployments, gateway config): take ModelServers
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "ModelServer":
                obj = crds.parse_object(doc, source=str(path))
                assert isinstance(obj, crds.ModelServer)
                found.append((f"{path.parent.name}/{path.name}:{obj.metadata.name}", obj))
    return found


SERVERS = _model_servers()


def test_examples_include_model_servers_with_profiles() -> None:
    assert any(server.spec.scheduler is not None for _, server in SERVERS)


@pytest.mark.parametrize(("where", "server"), SERVERS, ids=[w for w, _ in SERVERS])
def test_scheduler_profile_of_every_example_builds(where: str, server: crds.ModelServer) -> None:
    # raises ValueError naming the plugin or argument when an example asks for something unknown
    build_scheduler(server.spec.scheduler)
