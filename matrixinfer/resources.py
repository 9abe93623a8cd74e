"""Files the project ships outside its Python packages: Envoy templates and filter code
(``envoy/``) and the demo's resources (``examples/demo/``).

In a source checkout (and an editable install) they are read where they are; a wheel installs
them as data files under ``<prefix>/share/matrixinfer/`` (``[tool.setuptools.data-files]`` in
pyproject.toml), which is where they are looked up next.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

__all__ = ["project_file", "search_roots"]

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def search_roots() -> list[Path]:
    """Where shipped files are looked for, in order: the source tree, the installed data files."""
    return [_SOURCE_ROOT, Path(sysconfig.get_path("data")) / "share" / "matrixinfer"]


def project_file(relative: str) -> Path:
    """``relative`` (e.g. ``envoy/ads.yaml.tmpl``, ``examples/demo``) from the first search root
    that has it."""
    for root in search_roots():
        candidate = root / relative
        if candidate.exists():
            return candidate
    where = ", ".join(str(r) for r in search_roots())
    raise FileNotFoundError(f"{relative} not found (looked under {where}); reinstall matrixinfer")
