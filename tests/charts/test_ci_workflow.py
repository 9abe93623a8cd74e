"""The CI workflow (.github/workflows/ci.yml) cannot run here (no container engine, no GitHub
runner): its shape is checked instead — the jobs run the Makefile targets that exist, the kind
job has Docker and installs the tools ``make e2e`` looks for, actions are pinned to a major
version, the Python version meets ``requires-python``."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import yaml

from e2e.cluster import KindCluster

from .chart import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
_ACTION = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+@v\d+$")


def workflow() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as the boolean true
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def runs(job: dict[str, Any]) -> list[str]:
    return [s["run"] for s in job["steps"] if "run" in s]


def uses(job: dict[str, Any]) -> list[str]:
    return [s["uses"] for s in job["steps"] if "uses" in s]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9_-]*):", text, flags=re.M))


def test_triggers_and_jobs() -> None:
    doc = workflow()
    assert doc["name"]
    assert {"push", "pull_request"} <= set(doc["on"])
    assert doc["permissions"] == {"contents": "read"}  # least privilege for the token
    assert set(doc["jobs"]) == {"test", "e2e"}
    for name, job in doc["jobs"].items():
        assert job["runs-on"].startswith("ubuntu-"), name
        assert 0 < job["timeout-minutes"] <= 120, name
        assert job["steps"], name
        for step in job["steps"]:
            assert ("run" in step) != ("uses" in step), (name, step)
            assert set(step) <= {"name", "run", "uses", "with", "if", "env"}, (name, step)


def test_actions_are_pinned_to_a_major_version() -> None:
    for job in workflow()["jobs"].values():
        for action in uses(job):
            assert _ACTION.match(action), action
        # the code is checked out before anything runs
        assert job["steps"][0]["uses"].startswith("actions/checkout@")


def test_jobs_run_existing_make_targets() -> None:
    targets = make_targets()
    jobs = workflow()["jobs"]
    commands = {name: " ".join(runs(job)) for name, job in jobs.items()}
    for name, text in commands.items():
        for target in re.findall(r"\bmake ([a-z][a-z0-9_-]*)", text):
            assert target in targets, f"job {name}: no Makefile target {target!r}"
    assert "make test" in commands["test"]
    assert "make lint" in commands["test"]
    assert "make e2e" in commands["e2e"]


def test_test_job_runs_debian_as_root_so_make_installs_the_system_deps() -> None:
    job = workflow()["jobs"]["test"]
    image = job["container"]
    assert re.fullmatch(r"python:3\.\d+-bookworm", image), image
    # what `make system-deps` installs when it runs as root with apt-get (Debian packages)
    assert "apt-get" in (ROOT / "Makefile").read_text()


def test_e2e_job_has_what_make_e2e_needs() -> None:
    job = workflow()["jobs"]["e2e"]
    # Docker is on the hosted runner itself (no container: the job would have no Docker engine)
    assert "container" not in job
    actions = {a.split("@")[0] for a in uses(job)}
    assert {"helm/kind-action", "azure/setup-helm", "azure/setup-kubectl"} <= actions
    kind = next(s for s in job["steps"] if s.get("uses", "").startswith("helm/kind-action@"))
    assert kind["with"]["install_only"] is True  # KindCluster creates its own cluster
    make = next(i for i, s in enumerate(job["steps"]) if s.get("run") == "make e2e")
    tools = [i for i, s in enumerate(job["steps"]) if "setup-" in s.get("uses", "")]
    assert max(tools) < make
    # the clean-up steps name the cluster KindCluster makes
    cluster = KindCluster.__init__.__defaults__[0]  # type: ignore[index]
    cleanup = [r for r in runs(job) if r.startswith("kind ")]
    assert cleanup and all(f"--name {cluster}" in r for r in cleanup), cleanup
    steps = job["steps"]
    assert any(s.get("if") == "always()" and "kind delete" in s.get("run", "") for s in steps)


def test_python_version_meets_requires_python() -> None:
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in required.removeprefix(">=").split("."))
    jobs = workflow()["jobs"]
    setup = next(
        s for s in jobs["e2e"]["steps"] if s.get("uses", "").startswith("actions/setup-python@")
    )
    versions = [setup["with"]["python-version"], jobs["test"]["container"].split(":")[1][:4]]
    for v in versions:
        assert tuple(int(p) for p in v.split(".")[:2]) >= minimum, v
