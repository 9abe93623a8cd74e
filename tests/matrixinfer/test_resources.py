"""Files outside the Python packages (Envoy templates and Lua, the demo's resources) are found
in the source tree and are all shipped as wheel data files where project_file looks next."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from matrixinfer import resources

ROOT = Path(__file__).resolve().parents[2]


def test_source_tree_files_are_found() -> None:
    assert resources.project_file("envoy/ads.yaml.tmpl") == ROOT / "envoy" / "ads.yaml.tmpl"
    assert resources.project_file("examples/demo").is_dir()


def test_a_missing_file_names_what_and_where() -> None:
    with pytest.raises(FileNotFoundError, match=r"envoy/nope\.tmpl not found .*share/matrixinfer"):
        resources.project_file("envoy/nope.tmpl")


def test_installed_data_files_are_the_second_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = tmp_path / "share" / "matrixinfer" / "envoy"
    shipped.mkdir(parents=True)
    (shipped / "only-installed.tmpl").write_text("x")
    monkeypatch.setattr(resources.sysconfig, "get_path", lambda name: str(tmp_path))
    assert resources.project_file("envoy/only-installed.tmpl") == shipped / "only-installed.tmpl"


def test_every_file_the_code_reads_is_a_wheel_data_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = config["tool"]["setuptools"]["data-files"]
    shipped = {
        Path(target) / Path(p).name
        for target, patterns in data_files.items()
        for pattern in patterns
        for p in ROOT.glob(pattern)
    }
    needed = {
        Path("share/matrixinfer") / p.relative_to(ROOT)
        for folder in ("envoy", "examples/demo")
        for p in (ROOT / folder).iterdir()
        if p.is_file() and p.name != "README.md"
    }
    assert needed <= shipped, sorted(map(str, needed - shipped))
