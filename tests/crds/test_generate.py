"""The committed CRD YAML is what the models generate, and `python -m crds --check` says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crds import generate
from crds.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_yaml_matches_the_models() -> None:
    assert generate.check() == []


def test_generation_is_deterministic() -> None:
    assert generate.render_all() == generate.render_all()


def test_one_file_per_kind() -> None:
    names = sorted(p.name for p in generate.CRD_DIR.glob("*.yaml"))
    assert names == sorted(s.filename for s in generate.SPECS)
    assert {s.kind for s in generate.SPECS} == {
        "ModelRoute",
        "ModelServer",
        "ModelInfer",
        "Model",
        "AutoscalingPolicy",
    }


def test_check_cli_passes_on_the_repository() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "crds", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_check_names_the_drifted_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    drifted = tmp_path / "networking.matrixinfer.ai_modelroutes.yaml"
    drifted.write_text(drifted.read_text().replace("first that matches wins", "last wins"))
    (tmp_path / "registry.matrixinfer.ai_models.yaml").unlink()
    capsys.readouterr()
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{drifted}: out of date with the models" in err
    assert "registry.matrixinfer.ai_models.yaml: missing" in err
    assert "modelservers" not in err


def test_stale_extra_file_is_reported(tmp_path: Path) -> None:
    main(["--dir", str(tmp_path)])
    (tmp_path / "old.yaml").write_text("kind: CustomResourceDefinition\n")
    assert any("old.yaml: not generated" in p for p in generate.check(tmp_path))
