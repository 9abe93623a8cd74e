"""`matrixinfer console` as a process: --local-token prints the URL and a token that the API then
takes (and nothing else); a bad rule file stops it at start, naming the engine and the rule."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp

from matrixinfer.testing.kube import emulator
from tests.console.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "matrixinfer.cli", "console", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


async def test_local_token_is_printed_and_required() -> None:
    async with emulator() as api:
        port = free_port()
        proc = await _spawn("--server", api.url, "--namespace", "ns", "--port", str(port),
                            "--local-token")  # fmt: skip
        try:
            assert proc.stdout is not None
            lines: list[str] = []
            async with asyncio.timeout(30):
                while not lines or not lines[-1].startswith("API token: "):
                    line = (await proc.stdout.readline()).decode()
                    assert line, f"the console exited: {lines}"
                    lines.append(line.strip())
            token = lines[-1].removeprefix("API token: ")
            assert f"console: http://127.0.0.1:{port}/ui/index.html#token={token}" in lines
            url = f"http://127.0.0.1:{port}/api/deployments"
            auth = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession() as s:
                async with asyncio.timeout(30):
                    while True:  # the URL is printed just before uvicorn listens
                        try:
                            async with s.get(url, headers=auth) as r:
                                assert r.status == 200 and await r.json() == []
                                break
                        except aiohttp.ClientConnectionError:
                            await asyncio.sleep(0.05)
                async with s.get(url, headers={"Authorization": "Bearer guess"}) as r:
                    assert r.status == 401
        finally:
            proc.terminate()
            await proc.wait()


async def test_a_bad_rule_file_stops_it_at_start(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("engines:\n  - {name: e, backend_type: vLLM, requires: [{rule: 'gpu.x >'}]}\n")
    proc = await _spawn("--server", "http://127.0.0.1:9", "--rules", str(rules))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "engines[0] (e).requires[0]: invalid CEL 'gpu.x >'" in err.decode()


async def test_local_token_file_gives_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("chosen-token\n")
    async with emulator() as api:
        port = free_port()
        proc = await _spawn("--server", api.url, "--namespace", "ns", "--port", str(port),
                            "--local-token-file", str(token_file))  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}/api/deployments"
            auth = {"Authorization": "Bearer chosen-token"}
            async with aiohttp.ClientSession() as s:
                async with asyncio.timeout(30):
                    while True:
                        assert proc.returncode is None, "the console exited"
                        try:
                            async with s.get(url, headers=auth) as r:
                                assert r.status == 200
                                break
                        except aiohttp.ClientConnectionError:
                            await asyncio.sleep(0.05)
                async with s.get(url, headers={"Authorization": "Bearer guess"}) as r:
                    assert r.status == 401
        finally:
            proc.terminate()
            out, _ = await proc.communicate()
        assert "#token=chosen-token" in out.decode()


async def test_an_empty_local_token_file_stops_it(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    proc = await _spawn("--server", "http://127.0.0.1:9", "--local-token-file", str(token_file))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert f"--local-token-file {token_file} is empty" in err.decode()
