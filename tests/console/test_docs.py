"""docs/console.md carries the REST API reference and the RBAC table as generated from the
OpenAPI document and console.auth.ACTIONS: a route or an action changed without the docs fails."""

from __future__ import annotations

import re
from pathlib import Path

from console.app import ConsoleConfig, create_app
from console.auth import ACTIONS
from console.reference import markdown, rbac_markdown
from fleet.kubeconfig import KubeAccess

DOC = Path(__file__).resolve().parents[2] / "docs" / "console.md"


def test_the_api_reference_is_the_openapi_document() -> None:
    text = DOC.read_text()
    generated = markdown(
        create_app(ConsoleConfig(kube=KubeAccess(server="http://unused"))).openapi()
    )
    assert generated in text, "regenerate it: python -m console.reference"


def test_the_rbac_table_is_the_actions_table() -> None:
    assert rbac_markdown(ACTIONS) in DOC.read_text(), "regenerate: python -m console.reference rbac"


def test_the_screenshots_shown_exist_and_every_one_is_shown() -> None:
    shown = set(re.findall(r"\]\((images/console-[\w.-]+\.png)\)", DOC.read_text()))
    images = DOC.parent / "images"
    files = {f"images/{p.name}" for p in images.glob("console-*.png")}
    assert shown and shown == files, "regenerate: CONSOLE_SCREENSHOTS=docs/images (docs/console.md)"
    for name in files:
        assert (DOC.parent / name).stat().st_size < 150_000, f"{name}: not a small PNG"
