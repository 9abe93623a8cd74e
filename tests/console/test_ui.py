"""The web UI in real Chromium (Debian's, driven by Playwright).

Against the local stack as a user runs it (``matrixinfer demo``: the local API server, the real
operator, the local kubelet running pods as simulators, extproc and Envoy, and the console it
starts): deploy a model through the wizard, watch its pod start and turn ready, chat with it with
the answer streaming in, read its pod's log, see the gateway's figures, delete it and see its pod
go; a screenshot of each page (in the test's tmp dir); every form field has a label; keyboard
navigation. ``CONSOLE_SCREENSHOTS=DIR`` also writes the screenshots, made small, as
``DIR/console-*.png`` (the docs' images: ``CONSOLE_SCREENSHOTS=docs/images``).

The sign-in form is checked against the console over the emulated API server (tests/console/
conftest.py), which needs no local stack.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from matrixinfer.process import free_port
from tests.console.conftest import ADMIN, Console

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

# every change of the chat's text, recorded in the page (what a user sees arrive)
RECORD_CHAT = """() => { window.chatFrames = []; const box = document.getElementById('chat');
  new MutationObserver(() => window.chatFrames.push(box.textContent))
    .observe(box, {childList: true, characterData: true, subtree: true});
}"""

# One small Model already served when the console opens (the list is not empty in screenshots)
HELLO = """apiVersion: registry.matrixinfer.ai/v1alpha1
kind: Model
metadata:
  name: hello
  namespace: default
spec:
  backends:
    - name: main
      type: vLLM
      modelURI: hf://Qwen/Qwen2.5-0.5B-Instruct
      minReplicas: 1
"""
SHOTS_ENV = "CONSOLE_SCREENSHOTS"


@dataclass
class LocalStack:
    """``matrixinfer demo --requests 0`` running; its console's URL (with the token) and the
    local API server's."""

    console_url: str
    api_url: str
    output: list[str]

    def items(self, path: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.api_url + path, timeout=5) as resp:
            return list(json.loads(resp.read()).get("items") or [])

    def pods(self) -> list[str]:
        return [str(p["metadata"]["name"]) for p in self.items("/api/v1/namespaces/default/pods")]


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[LocalStack]:
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "hello.yaml").write_text(HELLO)
    env = {**os.environ, "MATRIXINFER_STATE": str(tmp_path / "state.json")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "matrixinfer.cli", "demo", "--requests", "0",
         "--examples", str(examples), "--run-dir", str(tmp_path / "run"),
         "--port", str(free_port()), "--console-port", str(free_port()),
         "--first-host", "127.0.0.110", "--time-scale", "0.5"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, env=env,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while "Press Ctrl-C to stop." not in "".join(lines):
            assert proc.poll() is None or reader.is_alive(), "".join(lines)
            assert time.monotonic() < deadline, "the demo did not start:\n" + "".join(lines)
            time.sleep(0.05)
        text = "".join(lines)
        console = re.search(r"console \(deploy, watch and chat in a browser\): (\S+)", text)
        api = re.search(r"local API server at (\S+);", text)
        assert console is not None and api is not None, text
        yield LocalStack(console.group(1), api.group(1), lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the demo's own session: it and its children
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        reader.join(5)


@pytest.fixture
async def browser_page() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = await browser.new_page(viewport={"width": 1100, "height": 760})
            pg.set_default_timeout(30000)  # a loaded machine; every wait is for a condition
            yield pg
        finally:
            await browser.close()


def _docs_image(src: Path, dest: Path) -> None:
    """A small copy of a screenshot for the docs: 64 colours (the UI's are flat)."""
    try:
        from PIL import Image
    except ImportError:
        shutil.copy(src, dest)
        return
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=64).save(dest, optimize=True)


async def test_deploy_watch_chat_logs_and_delete_on_the_local_stack(
    local_stack: LocalStack, browser_page: Any, tmp_path: Path
) -> None:
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    shots = tmp_path / "screenshots"
    shots.mkdir()

    async def shot(name: str) -> None:
        await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        assert await page.evaluate(UNLABELLED) == [], f"unlabelled form fields on {name}"

    # the URL the demo printed signs in with its token
    await page.goto(local_stack.console_url)
    await page.get_by_role("heading", name="Deployments").wait_for()
    await page.get_by_role("link", name="hello").wait_for()
    hello_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="hello"))
    await hello_row.get_by_text("Ready").wait_for()
    await shot("1-deployments")

    # the wizard: model -> engine and GPU shape (the local node's simulated L4s) -> options ->
    # YAML -> deploy
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

    # the deployment page: the controllers make the pod, the local kubelet starts it, it turns
    # ready (the page polls)
    await page.get_by_role("heading", name="Deployment chat").wait_for()
    pod = page.get_by_role("row").filter(has_text="chat-main-")
    await pod.get_by_role("cell", name="Running", exact=True).wait_for(timeout=60000)
    await pod.get_by_role("cell", name="yes", exact=True).wait_for(timeout=60000)
    await page.locator("#detail .phase.Ready").wait_for(timeout=60000)
    pod_name = (await pod.get_by_role("cell").first.text_content() or "").strip()
    assert pod_name in local_stack.pods()
    models = local_stack.items("/apis/registry.matrixinfer.ai/v1alpha1/namespaces/default/models")
    chat = next(m for m in models if m["metadata"]["name"] == "chat")
    assert chat["spec"]["backends"][0]["type"] == "vLLM"
    assert chat["metadata"]["annotations"]["console.matrixinfer.ai/gpu-product"] == "NVIDIA-L4"

    # its pod's log, through the console and the local API server, from the simulator's output
    await page.get_by_label("Pod", exact=True).select_option(pod_name)
    await page.get_by_role("button", name="Show logs").click()
    await page.get_by_text(f"{pod_name} serving chat").wait_for()

    # the chat playground streams through the console and Envoy to the pod: the answer arrives
    # in pieces, the page showing each
    await page.evaluate(RECORD_CHAT)
    await page.get_by_label("Message").fill("Tell me about the local stack.")
    await page.get_by_role("button", name="Send").click()
    chat_box = page.locator("#chat")
    await chat_box.filter(has_text=re.compile(r"chat: \S+")).wait_for()

    async def answer_done() -> bool:
        frames: list[str] = await page.evaluate("window.chatFrames")
        return len(frames) > 1 and frames[-1] == await chat_box.text_content()

    deadline = time.monotonic() + 30
    frames: list[str] = await page.evaluate("window.chatFrames")
    while True:
        await page.wait_for_timeout(300)
        now: list[str] = await page.evaluate("window.chatFrames")
        if now == frames and await answer_done():
            break
        frames = now
        assert time.monotonic() < deadline, "the chat answer never settled"
    answers = [f.split("chat: ", 1)[1] for f in frames if "chat: " in f]
    pieces = [a for a in dict.fromkeys(answers) if a]
    assert len(pieces) >= 3, f"the answer did not arrive in pieces: {frames}"
    assert all(b.startswith(a) for a, b in itertools.pairwise(pieces)), pieces

    # the gateway's figures count the chat
    figures = re.compile(r"requests [1-9]\d*, errors 0, mean TTFT \d+ ms, output tokens [1-9]")
    await page.locator("#metrics").filter(has_text=figures).wait_for()
    await page.get_by_role("img", name="requests per second").wait_for()  # charted per poll
    await page.get_by_role("img", name="output tokens per second").wait_for()
    await shot("4-deployment")

    # listed with its status
    await page.get_by_role("link", name="Deployments", exact=True).click()
    chat_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="chat"))
    await chat_row.get_by_text("Ready").wait_for()
    await shot("5-deployments")

    # keyboard: Tab reaches the deployment's link; Enter opens it
    for _ in range(15):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.textContent") == "chat":
            break
    else:
        pytest.fail("Tab never reached the deployment's link")
    await page.keyboard.press("Enter")
    await page.get_by_role("heading", name="Deployment chat").wait_for()

    # delete it (the confirmation dialog is accepted): the list drops it, its pod goes
    page.on("dialog", lambda d: d.accept())
    await page.get_by_role("button", name="Delete deployment").click()
    await page.get_by_role("link", name="hello").wait_for()
    await page.get_by_role("link", name="chat").wait_for(state="detached")
    deadline = time.monotonic() + 60
    while pod_name in local_stack.pods():
        assert time.monotonic() < deadline, f"{pod_name} was never deleted"
        await page.wait_for_timeout(200)

    await page.get_by_role("link", name="Runtimes").click()
    await page.get_by_role("cell", name="vLLMDisaggregated").wait_for()
    await shot("6-runtimes")
    names = sorted(p.name for p in shots.iterdir())
    assert names == [
        "1-deployments.png",
        "2-wizard-engine.png",
        "3-wizard-preview.png",
        "4-deployment.png",
        "5-deployments.png",
        "6-runtimes.png",
    ]
    assert errors == []
    docs = os.environ.get(SHOTS_ENV)
    if docs:
        for name in names:
            _docs_image(shots / name, Path(docs) / f"console-{name}")


@pytest.fixture
async def page(console: Console, browser_page: Any) -> Any:
    return browser_page


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
