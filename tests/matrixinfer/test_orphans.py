"""Children never outlive the command that started them, and a port in TIME-WAIT is not busy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from matrixinfer.process import port_is_free, wait_until

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


LAUNCHER = """
import sys, time
from pathlib import Path
from matrixinfer.process import Child
from sim.fleet import Fleet

run = Path(sys.argv[1])
fleet = Fleet(2, port=int(sys.argv[2]), first_host="127.0.0.76", log_dir=run).start()
Child("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"],
      log_path=run / "sleeper.log").start()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_launcher_leaves_no_child(tmp_path: Path) -> None:
    from matrixinfer.process import free_port

    port = free_port("127.0.0.76")
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(LAUNCHER))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        children = _children(proc.pid)
        assert len(children) == 3, children  # two simulators and the sleeper
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: not any(_alive(pid) for pid in children), 15, "children gone")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_port_with_time_wait_connections_is_free() -> None:
    host = "127.0.0.77"
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 0))
    port = server.getsockname()[1]
    server.listen()
    client = socket.create_connection((host, port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection is in TIME-WAIT
    time.sleep(0.05)
    client.close()
    server.close()
    # what the old probe did, without SO_REUSEADDR: "busy"
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind((host, port))
    assert port_is_free(host, port)
    with socket.socket() as listening:
        listening.bind((host, 0))
        listening.listen()
        assert not port_is_free(host, listening.getsockname()[1])
