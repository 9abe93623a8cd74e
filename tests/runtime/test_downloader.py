"""matrixinfer-downloader against a local Hugging-Face-compatible hub and a moto S3 server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from fleet.artefacts import artefact_path, cache_dir, parse_uri
from runtime.artefacts import AuthError, MissingError, Progress
from runtime.downloader import main
from runtime.fetch import LOCK_FILE, MARKER_FILE, s3_error
from tests.runtime.conftest import S3, S3_ENV
from tests.runtime.hub import Hub, Repo

WEIGHTS = os.urandom(3 * 65536 + 123)
CONFIG = b'{"architectures": ["Demo"]}'


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Run:
    """main(argv) in process -> (exit code, stdout, stderr and log lines); pytest keeps the
    logging set-up (the program's would replace caplog's handler)."""
    monkeypatch.setattr("runtime.downloader.configure_logging", lambda *a: None)

    def call(*argv: str) -> tuple[int, str, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="matrixinfer.downloader"):
            code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, caplog.text + err

    return call


def demo_repo(**kw: object) -> Repo:
    return Repo(
        {"config.json": CONFIG, "model.safetensors": WEIGHTS, "sub/tokenizer.json": b"{}"},
        lfs={"model.safetensors"},
        **kw,  # type: ignore[arg-type]
    )


def poll(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- pure parts


def test_parse_uri_and_cache_layout() -> None:
    u = parse_uri("hf://org/name@refs/pr/1")
    assert (u.scheme, u.location, u.revision) == ("hf", "org/name", "refs/pr/1")
    assert cache_dir(Path("/c"), u) == Path("/c/hf/org/name/refs--pr--1")
    assert parse_uri("hf://org/name").revision == "main"
    s = parse_uri("s3://my-bucket/models/llama/")
    assert cache_dir(Path("/c"), s) == Path("/c/s3/my-bucket/models/llama")
    assert parse_uri("pvc://weights/llama").path == "llama"
    # artefact_path: where the engine finds it once the downloader is done (in a pod's terms)
    root, pvc = PurePosixPath("/cache"), PurePosixPath("/mnt/pvc")
    assert artefact_path(s, root, pvc) == PurePosixPath("/cache/s3/my-bucket/models/llama")
    got = artefact_path(parse_uri("pvc://weights/llama/v1"), root, pvc)
    assert got == PurePosixPath("/mnt/pvc/weights/llama/v1")
    assert artefact_path(parse_uri("file:///models/x"), root, pvc) == PurePosixPath("/models/x")
    for bad, words in [
        ("gs://b/x", "scheme"),
        ("hf://", "hf://org/name"),
        ("hf://org/name@../x", "revision"),
        ("s3://B/x", "bucket"),
        ("s3://bucket/../etc", "unsafe"),
        ("file://relative", "absolute"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_uri(bad)


def test_progress_line_has_bytes_rate_and_eta() -> None:
    p = Progress(total=4 << 20, started=0.0, interval=1.0)
    assert p.add(1 << 20, 0.5) is None  # not due yet
    line = p.add(1 << 20, 2.0)
    assert line == "2.0 MiB of 4.0 MiB (50%), 1.0 MiB/s, ETA 2s"


def test_s3_error_codes_map_to_kinds() -> None:
    from botocore.exceptions import ClientError

    def err(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")

    assert isinstance(s3_error("s3://b/x", err("InvalidAccessKeyId")), AuthError)
    assert isinstance(s3_error("s3://b/x", err("NoSuchBucket")), MissingError)
    assert str(s3_error("s3://b/x", err("NoSuchKey"))).startswith("s3://b/x: not found:")


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_download_verifies_marks_and_skips_on_restart(
    hub: Hub, tmp_path: Path, run: Run
) -> None:
    hub.repos["org/demo"] = demo_repo(revisions={"main": "c" * 40, "v1": "d" * 40})
    code, out, err = run("hf://org/demo@v1", "--cache", str(tmp_path),
                         "--hf-endpoint", hub.url)  # fmt: skip
    assert code == 0, err
    dest = tmp_path / "hf/org/demo/v1"
    assert out.strip().splitlines()[-1] == str(dest)
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert (dest / "config.json").read_bytes() == CONFIG
    assert (dest / "sub/tokenizer.json").read_bytes() == b"{}"
    assert not list(dest.rglob("*.part"))
    marker = json.loads((dest / MARKER_FILE).read_text())
    assert marker["uri"] == "hf://org/demo@v1"
    assert marker["identity"] == "d" * 40  # the commit the revision resolved to
    assert "/api/models/org/demo/revision/v1" in [s.path for s in hub.seen]
    # files come from the resolved commit, so a moving branch cannot mix two commits
    assert all(f"/resolve/{'d' * 40}/" in s.path for s in hub.seen if "/resolve/" in s.path)
    assert "of 192.1 KiB (100%)" in err  # progress line: bytes, rate, ETA

    hub.seen.clear()
    code, out, err = run("hf://org/demo@v1", "--cache", str(tmp_path),
                         "--hf-endpoint", hub.url)  # fmt: skip
    assert code == 0
    assert "already complete" in err
    assert hub.seen == []  # the marker skips even the listing


def test_hf_checksum_mismatch_is_an_error(hub: Hub, tmp_path: Path, run: Run) -> None:
    hub.repos["org/demo"] = demo_repo(corrupt={"model.safetensors"})
    code, _, err = run("hf://org/demo", "--cache", str(tmp_path), "--hf-endpoint", hub.url)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("matrixinfer-downloader: hf://org/demo: verification failed:")
    assert "model.safetensors: sha256" in last
    dest = tmp_path / "hf/org/demo/main"
    assert not (dest / "model.safetensors").exists()
    assert not (dest / MARKER_FILE).exists()


def test_hf_token_from_file_and_auth_failure(
    hub: Hub, tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.repos["org/private"] = demo_repo(token="hf_right")
    token = tmp_path / "token"
    token.write_text("hf_wrong\n")
    cache = tmp_path / "cache"
    argv = ["hf://org/private", "--cache", str(cache), "--hf-endpoint", hub.url]
    code, _, err = run(*argv, "--hf-token-file", str(token))
    assert code == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("matrixinfer-downloader: hf://org/private: authentication failed:")
    assert "401" in last

    token.write_text("hf_right\n")
    code, _, err = run(*argv, "--hf-token-file", str(token))
    assert code == 0, err
    assert {s.auth for s in hub.seen if "/resolve/" in s.path} == {"Bearer hf_right"}

    monkeypatch.setenv("HF_TOKEN", "hf_right")  # the environment works as well
    code, _, err = run("hf://org/private", "--cache", str(tmp_path / "c2"),
                       "--hf-endpoint", hub.url)  # fmt: skip
    assert code == 0, err


def test_hf_missing_repo_and_revision(hub: Hub, tmp_path: Path, run: Run) -> None:
    hub.repos["org/demo"] = demo_repo()
    for uri in ("hf://org/nothing", "hf://org/demo@nope"):
        code, _, err = run(uri, "--cache", str(tmp_path), "--hf-endpoint", hub.url)
        assert code == 4
        assert err.strip().splitlines()[-1].startswith(f"matrixinfer-downloader: {uri}: not found:")


def _downloader(tmp_path: Path, uri: str, *args: str, env: dict[str, str] | None = None,
                log: str = "dl.log") -> tuple[subprocess.Popen[bytes], Path]:  # fmt: skip
    log_path = tmp_path / log
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.downloader", uri, *args, "--progress-interval", "0"],
        stdout=subprocess.PIPE, stderr=log_path.open("wb"),
        env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
    )  # fmt: skip
    return proc, log_path


def test_interrupted_download_resumes_with_a_range_request(hub: Hub, tmp_path: Path) -> None:
    big = os.urandom(40 * 65536)
    hub.repos["org/big"] = Repo({"model.safetensors": big}, lfs={"model.safetensors"})
    hub.chunk_delay = 0.05
    cache = tmp_path / "cache"
    part = cache / "hf/org/big/main/model.safetensors.part"
    args = ("--cache", str(cache), "--hf-endpoint", hub.url)
    proc, _ = _downloader(tmp_path, "hf://org/big", *args, log="first.log")
    poll(lambda: part.exists() and part.stat().st_size >= 4 * 65536)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = part.stat().st_size
    assert 0 < cut < len(big)

    hub.chunk_delay = 0.0
    proc, log = _downloader(tmp_path, "hf://org/big", *args, log="second.log")
    proc.communicate(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert f"resuming model.safetensors at byte {cut} of {len(big)}" in text
    assert [s.range for s in hub.resolves("model.safetensors")] == [None, f"bytes={cut}-"]
    assert (cache / "hf/org/big/main/model.safetensors").read_bytes() == big  # sha256 checked
    assert "MiB/s, ETA" in text


def test_two_downloaders_on_one_cache_fetch_once(hub: Hub, tmp_path: Path) -> None:
    hub.repos["org/demo"] = demo_repo()
    hub.gate.clear()  # the first downloader stalls on its first file, holding the lock
    cache = tmp_path / "cache"
    args = ("--cache", str(cache), "--hf-endpoint", hub.url)
    first, log1 = _downloader(tmp_path, "hf://org/demo", *args, log="a.log")
    poll(lambda: any("/resolve/" in s.path for s in hub.seen))
    second, log2 = _downloader(tmp_path, "hf://org/demo", *args, log="b.log")
    poll(lambda: "waiting" in log2.read_text())
    hub.gate.set()
    out1, _ = first.communicate(timeout=60)
    out2, _ = second.communicate(timeout=60)
    assert first.returncode == 0, log1.read_text()
    assert second.returncode == 0, log2.read_text()
    dest = str(cache / "hf/org/demo/main")
    assert out1.decode().strip() == out2.decode().strip() == dest
    assert len(hub.resolves("model.safetensors")) == 1
    assert len([s for s in hub.seen if s.path.startswith("/api/")]) == 1
    second_log = log2.read_text()
    assert f"another downloader holds {dest}/{LOCK_FILE}; waiting" in second_log
    assert "already complete" in second_log


# ----------------------------------------------------------------------------- S3


def test_s3_prefix_download_with_md5_check(s3: S3, tmp_path: Path, run: Run) -> None:
    s3.client.create_bucket(Bucket="models")
    s3.client.put_object(Bucket="models", Key="llama/config.json", Body=CONFIG)
    s3.client.put_object(Bucket="models", Key="llama/weights/model.safetensors", Body=WEIGHTS)
    s3.client.put_object(Bucket="models", Key="llama-v2/other.bin", Body=b"not ours")
    code, out, err = run("s3://models/llama", "--cache", str(tmp_path),
                         "--s3-endpoint-url", s3.url)  # fmt: skip
    assert code == 0, err
    dest = tmp_path / "s3/models/llama"
    assert out.strip() == str(dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        ".matrixinfer-complete.json",
        ".matrixinfer.lock",
        "config.json",
        "weights/model.safetensors",
    ]
    assert (dest / "weights/model.safetensors").read_bytes() == WEIGHTS

    # one object named by the URI
    code, out, err = run("s3://models/llama/config.json", "--cache", str(tmp_path / "one"),
                         "--s3-endpoint-url", s3.url)  # fmt: skip
    assert code == 0, err
    assert (Path(out.strip()) / "config.json").read_bytes() == CONFIG

    # a prefix holding one file named like the prefix's last part
    s3.client.put_object(Bucket="models", Key="solo/solo", Body=b"inside")
    code, out, err = run("s3://models/solo", "--cache", str(tmp_path), "--s3-endpoint-url", s3.url)
    assert code == 0, err
    assert (Path(out.strip()) / "solo").read_bytes() == b"inside"


def test_s3_resumes_a_partial_file(s3: S3, tmp_path: Path, run: Run) -> None:
    s3.client.create_bucket(Bucket="models")
    s3.client.put_object(Bucket="models", Key="llama/model.bin", Body=WEIGHTS)
    dest = tmp_path / "s3/models/llama"
    dest.mkdir(parents=True)
    (dest / "model.bin.part").write_bytes(WEIGHTS[:70000])  # what an interrupted run left
    code, _, err = run("s3://models/llama", "--cache", str(tmp_path), "--s3-endpoint-url", s3.url)
    assert code == 0, err
    assert f"resuming model.bin at byte 70000 of {len(WEIGHTS)}" in err
    assert (dest / "model.bin").read_bytes() == WEIGHTS  # and the MD5 ETag matched

    (dest / MARKER_FILE).unlink()  # a bad partial file fails the check and is removed
    (dest / "model.bin").unlink()
    (dest / "model.bin.part").write_bytes(b"x" * 70000)
    code, _, err = run("s3://models/llama", "--cache", str(tmp_path), "--s3-endpoint-url", s3.url)
    assert code == 1
    assert "s3://models/llama: verification failed: model.bin: md5" in err
    assert not (dest / "model.bin.part").exists()


def test_s3_missing_bucket_and_prefix(s3: S3, tmp_path: Path, run: Run) -> None:
    s3.client.create_bucket(Bucket="models")
    for uri, words in [("s3://nobucket/x", "NoSuchBucket"), ("s3://models/absent", "no files")]:
        code, _, err = run(uri, "--cache", str(tmp_path), "--s3-endpoint-url", s3.url)
        assert code == 4
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"matrixinfer-downloader: {uri}: not found:")
        assert words in last


def test_s3_auth_failure(s3: S3, tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto import settings

    s3.client.create_bucket(Bucket="models")
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys from now
    code, _, err = run("s3://models/llama", "--cache", str(tmp_path),
                       "--s3-endpoint-url", s3.url)  # fmt: skip
    assert code == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("matrixinfer-downloader: s3://models/llama: authentication failed:")
    assert "InvalidAccessKeyId" in last


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a small tmpfs")
def test_disk_full_names_the_uri(s3: S3, tmp_path: Path) -> None:
    s3.client.create_bucket(Bucket="models")
    s3.client.put_object(Bucket="models", Key="big/model.bin", Body=os.urandom(1 << 20))
    cache = tmp_path / "small"
    cache.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                            str(cache)], capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace: {probe.stderr.decode().strip()}")
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {cache} && exec {sys.executable} -m runtime.downloader"
        f" s3://models/big --cache {cache} --s3-endpoint-url {s3.url}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          env={**os.environ, **S3_ENV, "PYTHONPATH": os.getcwd()},
                          timeout=60)  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 5, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("matrixinfer-downloader: s3://models/big: disk full: needs 1.0 MiB")


# ----------------------------------------------------------------------------- in place


def test_pvc_and_file_uris_are_checked_not_copied(tmp_path: Path, run: Run) -> None:
    model = tmp_path / "pvcs/weights/llama"
    model.mkdir(parents=True)
    (model / "config.json").write_bytes(CONFIG)
    cache = tmp_path / "cache"
    code, out, _ = run("pvc://weights/llama", "--cache", str(cache),
                       "--pvc-root", str(tmp_path / "pvcs"))  # fmt: skip
    assert (code, out.strip()) == (0, str(model))
    code, out, _ = run(f"file://{model}", "--cache", str(cache))
    assert (code, out.strip()) == (0, str(model))
    assert not cache.exists()
    code, _, err = run(f"file://{tmp_path}/absent", "--cache", str(cache))
    assert code == 4
    assert err.strip() == (
        f"matrixinfer-downloader: file://{tmp_path}/absent: not found: {tmp_path}/absent does not"
        " exist"
    )
    code, _, err = run("gs://bucket/x", "--cache", str(cache))
    assert code == 2
    assert "scheme must be one of" in err
