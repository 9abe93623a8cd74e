"""``matrixinfer demo`` as a child process, for the tests and benchmarks that drive the local
stack as a user does: started with ``--requests 0 --no-console`` on a configuration directory,
its output collected line by line (with the monotonic time each line was read), up once it
prints its OpenAI address, stopped with SIGTERM (its process group killed after ``grace``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from matrixinfer.process import free_port

__all__ = ["DemoProcess"]

UP = "Press Ctrl-C to stop."
_URL = re.compile(r"OpenAI API at (http://\S+/v1)")


class DemoProcess:
    """One ``matrixinfer demo`` on ``examples`` (a directory of resources), its pods on
    ``first_host`` onwards, its state file at ``state`` (``MATRIXINFER_STATE``, which
    ``matrixinfer get`` reads through :attr:`env`); ``flags`` are more demo flags."""

    def __init__(
        self,
        run_dir: Path,
        examples: Path,
        *flags: str,
        state: Path,
        first_host: str | None = None,
        up_within: float = 150.0,
        grace: float = 60.0,
    ) -> None:
        self.run_dir = run_dir
        self.grace = grace
        self.env = {**os.environ, "MATRIXINFER_STATE": str(state)}
        host = ["--first-host", first_host] if first_host else []
        self.timed_lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "matrixinfer.cli", "demo", "--requests", "0",
                "--no-console", "--port", str(free_port()), *host, "--run-dir", str(run_dir),
                "--examples", str(examples), *flags,
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, env=self.env,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            text = self.wait_for(UP, up_within)
            url = _URL.search(text)
            if url is None:
                raise RuntimeError(f"no OpenAI API address in the demo's output:\n{text}")
            self.url = url.group(1)
            self.server: str = json.loads(state.read_text())["server"]
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.timed_lines.append((time.monotonic(), line))

    @property
    def lines(self) -> list[str]:
        return [line for _, line in self.timed_lines]

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.timed_lines)

    def wait_for(self, needle: str, within: float = 60, after: int = 0) -> str:
        """The whole output once the lines from index ``after`` on hold ``needle``; an
        AssertionError with the output when they do not within ``within`` seconds or the demo
        ended."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if needle in "".join(line for _, line in self.timed_lines[after:]):
                return self.text
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the demo's output:\n{self.text[-5000:]}")

    def api(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` from the demo's local API server (JSON)."""
        with urllib.request.urlopen(self.server + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
