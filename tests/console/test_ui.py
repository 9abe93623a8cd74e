"""The web UI in real Chromium (Debian's, driven by Playwright) against the console over the
emulated API server: deploy through the wizard, see it listed, open its page, read its logs,
chat with it (through a stand-in gateway), delete it; a screenshot of each page; every form
field has a label; keyboard navigation."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from matrixinfer.testing.kube import eventually
from tests.console.conftest import ADMIN, Console, Gateway

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian chromium (make system-deps)"
)

UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea')]
  .filter(e => e.type !== 'hidden' && e.labels.length === 0 && !e.getAttribute('aria-label'))
  .map(e => e.id || e.name || e.outerHTML.slice(0, 80))"""


@pytest.fixture
def console_extra(gateway: Gateway) -> dict[str, Any]:
    return gateway.config()


@pytest.fixture
async def page(console: Console) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = await browser.new_page(viewport={"width": 1280, "height": 900})
            pg.set_default_timeout(15000)
            yield pg
        finally:
            await browser.close()


async def test_deploy_list_open_and_delete(console: Console, page: Any, tmp_path: Path) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    shots = tmp_path / "screenshots"
    shots.mkdir()

    async def shot(name: str) -> None:
        await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        assert await page.evaluate(UNLABELLED) == [], f"unlabelled form fields on {name}"

    # sign in with the token in the URL (what --local-token prints)
    await page.goto(f"{console.url}/ui/index.html#token={ADMIN}")
    await page.get_by_role("heading", name="Deployments").wait_for()
    await page.get_by_text("No deployments yet.").wait_for()
    await shot("1-deployments-empty")

    # the wizard: model -> engine and GPU shape -> options -> YAML -> deploy
    await page.get_by_role("link", name="Deploy a model").first.click()
    await page.get_by_label("Model from the catalog").select_option("Qwen/Qwen2.5-7B-Instruct")
    await page.get_by_label("Context length (tokens)").fill("8192")
    await page.get_by_label("Concurrent sequences").fill("8")  # 19.69 GiB: one L4 (21.6 GiB)
    await page.get_by_role("button", name="Next: engine and GPUs").click()
    first = page.get_by_label("vllm on NVIDIA-L4 x1")
    await first.wait_for()
    assert await first.is_checked()  # the recommended option is preselected
    await page.get_by_text("0.70 USD").first.wait_for()
    await shot("2-wizard-engine")
    await page.get_by_role("button", name="Next: options").click()
    await page.get_by_label("Deployment name (requests use it as model)").fill("chat")
    await page.get_by_role("button", name="Next: preview").click()
    yaml_box = page.get_by_label("The Model the console will create (you may edit it)")
    await yaml_box.wait_for()
    text = await yaml_box.input_value()
    assert "kind: Model" in text and "modelURI: hf://Qwen/Qwen2.5-7B-Instruct" in text
    await shot("3-wizard-preview")
    await page.get_by_role("button", name="Deploy").click()

    # the deployment page
    await page.get_by_role("heading", name="Deployment chat").wait_for()
    models = console.api.objects("registry.matrixinfer.ai/v1alpha1/models")
    assert models["chat"]["spec"]["backends"][0]["type"] == "vLLM"
    annotations = models["chat"]["metadata"]["annotations"]
    assert annotations == {"console.matrixinfer.ai/gpu-product": "NVIDIA-L4"}  # the chosen shape
    await console.api.request(
        "POST",
        "/api/v1/namespaces/ns/pods",
        {
            "metadata": {
                "name": "chat-main-0",
                "namespace": "ns",
                "labels": {"workload.matrixinfer.ai/model-infer": "chat-main"},
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        },
    )
    await page.get_by_role("cell", name="chat-main-0").wait_for(timeout=15000)
    await page.get_by_role("button", name="Show logs").click()
    await page.get_by_text("INFO serving on :8000").wait_for()
    await page.get_by_text("requests 10, errors 2, mean TTFT 250 ms").wait_for()  # gateway figures
    await page.get_by_role("img", name="requests per second").wait_for()  # charted per poll
    await page.get_by_role("img", name="output tokens per second").wait_for()

    # the chat playground streams through the console to the gateway
    await page.get_by_label("Message").fill("hi")
    await page.get_by_role("button", name="Send").click()
    await page.get_by_text("chat: Hello there").wait_for()
    await shot("4-deployment")

    # listed, with its status
    await page.get_by_role("link", name="Deployments", exact=True).click()
    await page.get_by_role("link", name="chat").wait_for()
    await page.get_by_text("Pending").wait_for()
    await shot("5-deployments")

    # keyboard: Tab reaches the deployment's link; Enter opens it
    for _ in range(12):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.textContent") == "chat":
            break
    else:
        pytest.fail("Tab never reached the deployment's link")
    await page.keyboard.press("Enter")
    await page.get_by_role("heading", name="Deployment chat").wait_for()

    # delete it (the confirmation dialog is accepted)
    page.on("dialog", lambda d: d.accept())
    await page.get_by_role("button", name="Delete deployment").click()
    await page.get_by_text("No deployments yet.").wait_for()
    await eventually(
        lambda: "chat" not in console.api.objects("registry.matrixinfer.ai/v1alpha1/models"),
        10,
        "the Model to be deleted",
    )

    await page.get_by_role("link", name="Runtimes").click()
    await page.get_by_role("cell", name="vLLMDisaggregated").wait_for()
    await shot("6-runtimes")
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-deployments-empty.png",
        "2-wizard-engine.png",
        "3-wizard-preview.png",
        "4-deployment.png",
        "5-deployments.png",
        "6-runtimes.png",
    ]
    assert errors == []


async def test_sign_in_form_and_rejected_token(console: Console, page: Any) -> None:
    await page.goto(f"{console.url}/ui/index.html")
    await page.get_by_label("Bearer token").fill("wrong")
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_text(  # back to the sign-in form, with the reason
        "The console refused the token: the bearer token is not valid"
    ).wait_for()
    await page.get_by_label("Bearer token").fill(ADMIN)
    await page.keyboard.press("Enter")
    await page.get_by_text("No deployments yet.").wait_for()
