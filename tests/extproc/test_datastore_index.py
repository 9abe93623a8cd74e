"""The datastore's label index selects exactly what a full scan with ``selects`` selects."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleet.config import StaticEndpoint
from fleet.pods import index_by_label, selected, selects

keys = st.sampled_from(["app", "role", "zone", "tier"])
values = st.sampled_from(["a", "b", "c"])
label_maps = st.dictionaries(keys, values, max_size=4)


@given(
    endpoint_labels=st.lists(label_maps, max_size=30),
    selector=st.one_of(st.none(), label_maps),
)
def test_index_selects_like_a_full_scan(
    endpoint_labels: list[dict[str, str]], selector: dict[str, str] | None
) -> None:
    endpoints = [
        StaticEndpoint(f"pod-{i}", f"10.0.0.{i}:8000", lbl) for i, lbl in enumerate(endpoint_labels)
    ]
    expected = [e for e in endpoints if selects(selector, e.labels)]
    assert selected(selector, index_by_label(endpoints)) == expected


def test_a_selector_picks_pods_of_its_own_namespace_only() -> None:
    """Kubernetes endpoints carry their namespace: two ModelServers with the same selector in two
    namespaces each get their own namespace's pods, and equal pod names do not collide."""
    from extproc.datastore import Datastore
    from fleet.config import GatewayConfig
    from tests.extproc.helpers import objects, server_yaml

    def in_namespace(text: str, ns: str) -> str:
        return text.replace("metadata: {name: pool}", f"metadata: {{name: pool, namespace: {ns}}}")

    servers = objects(
        in_namespace(server_yaml("pool", {"app": "chat"}), "team-a")
        + "---\n"
        + in_namespace(server_yaml("pool", {"app": "chat"}), "team-b")
    )
    endpoints = [
        StaticEndpoint("team-a/engine-0", "10.0.1.1:8000", {"app": "chat"}, namespace="team-a"),
        StaticEndpoint("team-b/engine-0", "10.0.2.1:8000", {"app": "chat"}, namespace="team-b"),
        StaticEndpoint("team-b/engine-1", "10.0.2.2:8000", {"app": "chat"}, namespace="team-b"),
        StaticEndpoint("file-pod", "10.0.3.1:8000", {"app": "chat"}),  # files: any namespace
    ]
    ds = Datastore()
    snapshot = ds.apply(GatewayConfig(servers=servers, endpoints=endpoints))
    members = {key: [p.name for p in view.pods] for key, view in snapshot.servers.items()}
    assert members == {
        "team-a/pool": ["team-a/engine-0", "file-pod"],
        "team-b/pool": ["team-b/engine-0", "team-b/engine-1", "file-pod"],
    }
