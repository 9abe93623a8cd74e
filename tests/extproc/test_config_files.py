from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from extproc.datastore import Datastore
from fleet.config import GatewayConfig
from fleet.files import ConfigError, ConfigWatcher, load_directory
from tests.extproc.helpers import server_yaml

ROUTE = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  modelName: chat
  rules: [{targets: [{modelServerName: pool}]}]
"""
ENDPOINTS = """apiVersion: gateway.matrixinfer.ai/v1alpha1
kind: Endpoints
metadata: {name: mine}
spec:
  endpoints:
  - {name: p0, address: "10.0.0.1:8000", labels: {app: chat}}
  - {name: p1, address: "10.0.0.2", labels: {app: chat}}
  - {name: other, address: "10.0.0.3:9000", labels: {app: other}}
"""
GATEWAY = """apiVersion: gateway.matrixinfer.ai/v1alpha1
kind: GatewayConfig
metadata: {name: gw}
spec:
  scheduler:
    filters: [{name: ready}]
    scorers: [{name: random, weight: 1}]
"""


def write_good(d: Path) -> None:
    (d / "10-model.yaml").write_text(
        server_yaml("pool", {"app": "chat"}, port=8001) + "---\n" + ROUTE
    )
    (d / "20-endpoints.yml").write_text(ENDPOINTS + "---\n" + GATEWAY)
    (d / "notes.txt").write_text("ignored")


def test_loads_every_kind(tmp_path: Path) -> None:
    write_good(tmp_path)
    config = load_directory(tmp_path)
    assert [r.metadata.name for r in config.routes] == ["chat"]
    assert [s.metadata.name for s in config.servers] == ["pool"]
    assert [e.name for e in config.endpoints] == ["p0", "p1", "other"]
    assert [f.name for f in config.scheduler_profile.filters] == ["ready"]
    snap = Datastore().apply(config)
    # the port-less endpoint takes the ModelServer's workloadPort; 'other' is selected by nothing
    assert [p.address for p in snap.servers["default/pool"].pods] == [
        "10.0.0.1:8000",
        "10.0.0.2:8001",
    ]


@pytest.mark.parametrize(
    ("file_text", "needles"),
    [
        (
            ROUTE.replace("modelServerName: pool", "modelServerName: pool, weight: 500"),
            ['ModelRoute "chat"', "spec.rules[0].targets[0].weight"],
        ),
        (
            ENDPOINTS.replace('address: "10.0.0.1:8000", ', ""),
            ['Endpoints "mine"', "spec.endpoints[0].address", "Field required"],
        ),
        ("kind: [unclosed", ["not readable YAML"]),
        (
            ENDPOINTS.replace("name: p1", "name: p0").replace("name: mine", "name: more"),
            ["endpoint 'p0' is listed twice"],
        ),
    ],
)
def test_bad_file_is_reported_with_file_object_and_field(
    tmp_path: Path, file_text: str, needles: list[str]
) -> None:
    write_good(tmp_path)
    (tmp_path / "30-bad.yaml").write_text(file_text)
    with pytest.raises(ConfigError) as err:
        load_directory(tmp_path)
    message = str(err.value)
    assert "30-bad.yaml" in message or "20-endpoints" in message
    for needle in needles:
        assert needle in message


async def test_watcher_applies_changes_and_keeps_last_good(tmp_path: Path) -> None:
    write_good(tmp_path)
    applied: list[GatewayConfig] = []
    watcher = ConfigWatcher(tmp_path, applied.append, interval=0.05)
    assert watcher.load_now()
    assert await watcher.check() is None  # unchanged
    # a broken edit: rejected, the error is kept, nothing applied
    (tmp_path / "10-model.yaml").write_text(ROUTE.replace("modelName: chat", "modelName: 5: x"))
    assert await watcher.check() is False
    assert len(applied) == 1 and "10-model.yaml" in (watcher.status.last_error or "")
    # fixed again (same size is caught by the mtime)
    write_good(tmp_path)
    os.utime(tmp_path / "10-model.yaml", ns=(1, 1))
    assert await watcher.check() is True
    assert len(applied) == 2 and watcher.status.last_error is None
    watcher.start()
    await asyncio.sleep(0)  # the polling task runs until stopped
    await watcher.stop()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_directory(tmp_path / "nope")


def test_bad_scheduler_profile_is_a_config_error(tmp_path: Path) -> None:
    write_good(tmp_path)
    bad = server_yaml("odd", {"app": "x"}) + "  scheduler:\n    filters: [{name: no-such-filter}]\n"
    (tmp_path / "40-odd.yaml").write_text(bad)
    with pytest.raises(ConfigError) as err:
        load_directory(tmp_path)
    message = str(err.value)
    assert "40-odd.yaml" in message and 'ModelServer "odd"' in message
    assert "spec.scheduler filters[0]" in message and "no-such-filter" in message


def test_other_matrixinfer_kinds_are_ignored(tmp_path: Path) -> None:
    write_good(tmp_path)
    (tmp_path / "50-infer.yaml").write_text(
        "apiVersion: workload.matrixinfer.ai/v1alpha1\nkind: ModelInfer\nmetadata: {name: m}\n"
        "spec:\n  template:\n    roles:\n    - name: server\n      entryTemplate:\n"
        "        spec: {containers: [{name: c, image: i}]}\n"
    )
    config = load_directory(tmp_path)
    assert [r.metadata.name for r in config.routes] == ["chat"]


async def test_hot_added_duplicate_route_leaves_the_incumbent_serving(tmp_path: Path) -> None:
    """A file added later that claims a served model (and sorts first) does not take it."""
    write_good(tmp_path)
    ds = Datastore()
    watcher = ConfigWatcher(tmp_path, ds.apply, interval=0.05)
    assert watcher.load_now()
    (tmp_path / "00-newcomer.yaml").write_text(
        server_yaml("other", {"app": "other"}, port=9000)
        + "---\n"
        + ROUTE.replace("{name: chat}", "{name: aaa-newcomer}").replace("pool", "other")
    )
    assert await watcher.check() is True
    snap = ds.snapshot
    assert snap.routes.lookup("chat")[0].key == "default/chat"
    assert any("'default/aaa-newcomer' also claims 'chat'" in w for w in snap.warnings)
    state = {r["key"]: r for r in ds.to_json()["modelRoutes"]}
    assert state["default/aaa-newcomer"]["notServed"] == [
        {"name": "chat", "servedBy": "default/chat"}
    ]
    assert state["default/chat"]["notServed"] == []
    # when the incumbent goes away, the newcomer serves the model
    (tmp_path / "10-model.yaml").write_text(server_yaml("pool", {"app": "chat"}, port=8001))
    assert await watcher.check() is True
    assert ds.snapshot.routes.lookup("chat")[0].key == "default/aaa-newcomer"


def test_dangling_target_is_warned_and_its_model_not_listed(tmp_path: Path) -> None:
    write_good(tmp_path)
    (tmp_path / "30-ghost.yaml").write_text(
        ROUTE.replace("{name: chat}", "{name: ghostly}")
        .replace("modelName: chat", "modelName: ghost-model")
        .replace("pool", "ghost")
    )
    ds = Datastore()
    snap = ds.apply(load_directory(tmp_path))
    (warning,) = [w for w in snap.warnings if "ghostly" in w]
    assert "ModelServer 'ghost'" in warning and "does not exist" in warning
    assert snap.routes.model_names() == ["chat"]
    state = {r["key"]: r for r in ds.to_json()["modelRoutes"]}
    assert state["default/ghostly"]["missingModelServers"] == ["default/ghost"]


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    write_good(tmp_path)
    bad_route = ROUTE.replace("modelServerName: pool", "modelServerName: pool, weight: 500")
    # the bad ModelRoute is the second document and starts on line 9
    (tmp_path / "30-bad.yaml").write_text(server_yaml("x", {"app": "x"}) + "---\n" + bad_route)
    assert server_yaml("x", {"app": "x"}).count("\n") == 7
    with pytest.raises(ConfigError) as err:
        load_directory(tmp_path)
    assert f"{tmp_path / '30-bad.yaml'}:9 (document 2)" in str(err.value)
    (tmp_path / "30-bad.yaml").write_text("kind: ModelRoute\nmetadata:\n  name: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_directory(tmp_path)
    assert f"{tmp_path / '30-bad.yaml'}:4: not readable YAML" in str(err.value)
