"""Reaching the Kubernetes API (fleet/kubeconfig.py): the flags, one-line errors with exit code 2,
and token refresh against the emulated API server behind a proxy that checks a rotating token."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from controllers.kube import KubeClient, connection_info
from fleet.kube import KubeSource
from fleet.kubeconfig import NO_CONFIGURATION, KubeAccess, KubeConfigError
from matrixinfer.testing.kube import Api
from tests.xds.kube import NS, TokenProxy, create_pod, kube, write_kubeconfig

pytestmark = pytest.mark.timeout(60)

PROGRAMS = {
    "matrixinfer-extproc": ["-m", "extproc.main", "--source", "kubernetes"],
    "matrixinfer-xds": ["-m", "controllers.xds.main", "--source", "kubernetes"],
    "matrixinfer-controllers": ["-m", "controllers.main"],
}

BROKEN = {
    # what the file holds -> what the one line must say
    "not yaml": ("clusters: [", "while parsing"),
    "no context": ("apiVersion: v1\nkind: Config\nclusters: []\n", "current-context"),
}


def clean_env(home: Path) -> dict[str, str]:
    """No kubeconfig anywhere, not in a cluster."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")
    }
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.getcwd()
    return env


def run(program: str, extra: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *PROGRAMS[program], *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )


def one_line(proc: subprocess.CompletedProcess[str], program: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{program}: "), lines
    return lines[0]


# ---- no or a broken configuration: one line, exit code 2 -------------------------------------
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_no_configuration_is_one_line_and_exit_2(program: str, tmp_path: Path) -> None:
    proc = run(program, [], clean_env(tmp_path))
    assert one_line(proc, program) == f"{program}: {NO_CONFIGURATION}"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_kubeconfig_is_one_line_and_exit_2(program: str, case: str, tmp_path: Path) -> None:
    text, said = BROKEN[case]
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    proc = run(program, ["--kubeconfig", str(path)], clean_env(tmp_path))
    line = one_line(proc, program)
    assert str(path) in line and said in line, line


def test_an_unknown_context_is_named(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:1", tmp_path / "token")
    proc = run(
        "matrixinfer-extproc", ["--kubeconfig", str(path), "--context", "prod"], clean_env(tmp_path)
    )
    line = one_line(proc, "matrixinfer-extproc")
    assert "context prod" in line and "Expected object with name prod" in line, line


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_names_the_defaults(program: str) -> None:
    proc = subprocess.run(
        [sys.executable, *PROGRAMS[program][:2], "--help"],
        capture_output=True,
        text=True,
        timeout=45,
        check=True,
    )
    text = " ".join(proc.stdout.split())
    assert "--kubeconfig PATH" in text and "--context NAME" in text and "--server URL" in text
    assert "$KUBECONFIG, else ~/.kube/config, else the in-cluster service account" in text


# ---- resolution --------------------------------------------------------------------------------
async def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("t0")
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    write_kubeconfig(home / ".kube" / "config", "http://home.example:1", token)
    listed = write_kubeconfig(tmp_path / "listed", "http://listed.example:2", token)
    flag = write_kubeconfig(tmp_path / "flag", "http://flag.example:3", token)
    monkeypatch.setenv("HOME", str(home))
    env = {"KUBECONFIG": f"{tmp_path / 'missing'}{os.pathsep}{listed}"}

    assert (await KubeAccess().load({})).base == "http://home.example:1"
    assert (await KubeAccess().load(env)).base == "http://listed.example:2"
    assert (await KubeAccess(kubeconfig=str(flag)).load(env)).base == "http://flag.example:3"
    creds = await KubeAccess(server="http://emulator:4").load(env)
    assert creds.base == "http://emulator:4" and await creds.headers() == {}
    assert await (await KubeAccess().load(env)).headers() == {"Authorization": "Bearer t0"}

    with pytest.raises(KubeConfigError, match=r"^\$KUBECONFIG=.*: no such file$"):
        await KubeAccess().load({"KUBECONFIG": str(tmp_path / "missing")})
    with pytest.raises(KubeConfigError, match="--server takes no --kubeconfig"):
        await KubeAccess(server="http://x:1", kubeconfig=str(flag)).load({})
    with pytest.raises(KubeConfigError, match="not an http:// or https:// URL"):
        await KubeAccess(server="localhost:8001").load({})


async def test_in_cluster_without_a_token_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(KubeConfigError, match=r"^in-cluster service account: .*token"):
        await KubeAccess().load(env)
    with pytest.raises(KubeConfigError, match="--context c: no kubeconfig"):
        await KubeAccess(context="c").load(env)


# ---- token refresh against the emulated API server ---------------------------------------------
async def until(check: Callable[[], object], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[tuple[Api, TokenProxy]]:
    """The emulator behind a proxy that admits only the token in ``tmp_path / "token"``."""
    token = tmp_path / "token"
    token.write_text("token-1\n")
    async with kube() as api:
        proxy = TokenProxy(api.url, token)
        await proxy.start()
        try:
            yield api, proxy
        finally:
            await proxy.stop()


@pytest.mark.parametrize("user", ["tokenFile", "exec"])
async def test_the_watch_rereads_a_rotated_token(
    guarded: tuple[Api, TokenProxy], tmp_path: Path, user: str
) -> None:
    api, proxy = guarded
    kubeconfig = write_kubeconfig(tmp_path / "kc", proxy.url, proxy.token_file, user)
    await create_pod(api, "sim-0", "127.0.0.2", {"app": "sim"})
    source = KubeSource(KubeAccess(kubeconfig=str(kubeconfig)), lambda _: None, namespace=NS)
    source.backoff = 0.05
    await source.connect()
    source.start()
    try:
        await until(lambda: (NS, "sim-0") in source.pods, "the first list")
        assert proxy.refused == 0 and proxy.admitted.get("token-1", 0) > 0

        # the token rotates; the API server restarts (every watch ends); a pod appears meanwhile
        proxy.token_file.write_text("token-2\n")
        proxy.cut()
        await create_pod(api, "sim-1", "127.0.0.3", {"app": "sim"})
        await until(lambda: (NS, "sim-1") in source.pods, "the pod, listed with the new token")
        assert proxy.refused > 0  # the old token was refused, then the file was read again
        assert proxy.admitted.get("token-2", 0) > 0
        assert source.credentials is not None and source.credentials.generation >= 1
    finally:
        await source.stop()


@pytest.mark.parametrize("user", ["tokenFile", "exec"])
async def test_the_controllers_client_rereads_a_rotated_token(
    guarded: tuple[Api, TokenProxy], tmp_path: Path, user: str
) -> None:
    api, proxy = guarded
    kubeconfig = write_kubeconfig(tmp_path / "kc", proxy.url, proxy.token_file, user)
    await create_pod(api, "sim-0", "127.0.0.2", {"app": "sim"})
    credentials = await KubeAccess(kubeconfig=str(kubeconfig)).load()
    # built the way the operator builds it: from the ConnectionInfo Kopf logged in with
    info = await connection_info(credentials)
    assert info.scheme == "Bearer" and info.token == "token-1"
    client = KubeClient(info)
    try:
        pod = await client.get(f"/api/v1/namespaces/{NS}/pods/sim-0")
        assert pod is not None and pod["metadata"]["name"] == "sim-0"
        proxy.token_file.write_text("token-2\n")
        pod = await client.get(f"/api/v1/namespaces/{NS}/pods/sim-0")  # 401, reload, retry
        assert pod is not None and pod["metadata"]["name"] == "sim-0"
        assert proxy.refused == 1 and proxy.admitted.get("token-2") == 1
        assert await client.get(f"/api/v1/namespaces/{NS}/pods/nope") is None  # 404: None
        assert (await connection_info(credentials)).token == "token-2"  # Kopf's next login
    finally:
        await client.close()


EXPIRING_PLUGIN = """
import datetime, json, sys
token = open(sys.argv[1]).read().strip()
soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=float(sys.argv[2]))
status = {"token": token, "expirationTimestamp": soon.strftime("%Y-%m-%dT%H:%M:%SZ")}
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                  "kind": "ExecCredential", "status": status}))
"""


@pytest.mark.parametrize(("lifetime", "renewed"), [(5.0, True), (3600.0, False)])
async def test_an_exec_token_is_fetched_again_before_it_expires(
    tmp_path: Path, lifetime: float, renewed: bool
) -> None:
    """No 401 needed: a token within 30 s of its expirationTimestamp is fetched again."""
    token = tmp_path / "token"
    token.write_text("token-1")
    path = write_kubeconfig(
        tmp_path / "kc", "http://127.0.0.1:1", token, "exec", EXPIRING_PLUGIN, (str(lifetime),)
    )
    credentials = await KubeAccess(kubeconfig=str(path)).load()
    assert credentials.expiry is not None
    assert await credentials.headers() == {"Authorization": "Bearer token-1"}
    token.write_text("token-2")
    expected = "token-2" if renewed else "token-1"
    assert await credentials.headers() == {"Authorization": f"Bearer {expected}"}
