"""The datastore's label index selects exactly what a full scan with ``selects`` selects."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from extproc.datastore import StaticEndpoint, index_by_label, selected, selects

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
