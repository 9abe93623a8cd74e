"""Artefact URIs, the cache layout, checksums and progress (pure: no network, no files).

A Model's ``modelURI`` and a LoRA adapter's ``uri`` name where the files are:

- ``hf://org/name[@revision]``: a Hugging Face repository (revision: branch, tag or commit;
  default ``main``);
- ``s3://bucket/prefix``: every object under ``prefix/`` (or the one object named ``prefix``);
- ``pvc://claim/path``: a path on a PersistentVolumeClaim mounted at ``<pvc root>/<claim>``;
- ``file:///path``: a path on the pod's file system.

Remote artefacts (hf, s3) are copied into ``<cache>/<layout>`` (:func:`cache_dir`); local ones
(pvc, file) are used where they are.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

__all__ = [
    "ArtefactError",
    "AuthError",
    "Checksum",
    "DiskFullError",
    "MissingError",
    "Progress",
    "RemoteFile",
    "Uri",
    "VerifyError",
    "cache_dir",
    "format_bytes",
    "local_path",
    "parse_uri",
]

Scheme = Literal["hf", "s3", "pvc", "file"]

_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_REVISION = re.compile(r"^[\w.\-/]+$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class ArtefactError(Exception):
    """A download or lookup failed; the message names the URI and what went wrong."""

    kind = "error"

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(f"{uri}: {self.kind}: {detail}")
        self.uri = uri
        self.detail = detail


class AuthError(ArtefactError):
    kind = "authentication failed"


class MissingError(ArtefactError):
    kind = "not found"


class DiskFullError(ArtefactError):
    kind = "disk full"


class VerifyError(ArtefactError):
    kind = "verification failed"


@dataclass(frozen=True, slots=True)
class Uri:
    """A parsed artefact URI. ``location`` is the repo id (hf), the bucket (s3), the claim (pvc)
    or empty (file); ``path`` the prefix (s3), the path in the claim (pvc) or the absolute path
    (file); ``revision`` only for hf."""

    text: str
    scheme: Scheme
    location: str
    path: str = ""
    revision: str = "main"

    @property
    def remote(self) -> bool:
        return self.scheme in ("hf", "s3")


def parse_uri(text: str) -> Uri:
    """Parse and check an artefact URI; ValueError names what is wrong."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("hf", "s3", "pvc", "file"):
        raise ValueError(f"{text!r}: the scheme must be one of hf://, s3://, pvc://, file://")
    if scheme == "hf":
        repo, at, revision = rest.partition("@")
        if not _HF_REPO.match(repo):
            raise ValueError(f"{text!r}: expected hf://org/name[@revision]")
        if at and not (_REVISION.match(revision) and ".." not in revision):
            raise ValueError(f"{text!r}: bad revision {revision!r}")
        return Uri(text, "hf", repo, revision=revision if at else "main")
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not _S3_BUCKET.match(bucket):
            raise ValueError(f"{text!r}: bad bucket name {bucket!r} (expected s3://bucket/prefix)")
        prefix = prefix.strip("/")
        _check_relative(text, prefix, allow_empty=True)
        return Uri(text, "s3", bucket, prefix)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not claim:
            raise ValueError(f"{text!r}: expected pvc://claim/path")
        path = path.strip("/")
        _check_relative(text, path, allow_empty=True)
        return Uri(text, "pvc", claim, path)
    if not rest.startswith("/"):
        raise ValueError(f"{text!r}: expected file:///absolute/path")
    return Uri(text, "file", "", rest)


def _check_relative(uri: str, path: str, *, allow_empty: bool = False) -> None:
    if not path and allow_empty:
        return
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or ".." in parts or "." in parts:
        raise ValueError(f"{uri}: unsafe relative path {path!r}")


def cache_dir(cache: Path, uri: Uri) -> Path:
    """Where a remote artefact lives in the cache: ``hf/<org>/<name>/<revision>`` or
    ``s3/<bucket>/<prefix>`` (a revision's ``/`` becomes ``--``)."""
    if uri.scheme == "hf":
        return cache / "hf" / uri.location / uri.revision.replace("/", "--")
    if uri.scheme == "s3":
        return cache / "s3" / uri.location / uri.path if uri.path else cache / "s3" / uri.location
    raise ValueError(f"{uri.text}: {uri.scheme}:// artefacts are not cached (used in place)")


def local_path(uri: Uri, pvc_root: Path) -> Path:
    """The path of a pvc:// or file:// artefact inside the pod."""
    if uri.scheme == "pvc":
        return pvc_root / uri.location / uri.path
    if uri.scheme == "file":
        return Path(uri.path)
    raise ValueError(f"{uri.text}: {uri.scheme}:// artefacts are downloaded, not used in place")


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Checksum:
    """A digest the source publishes: ``sha256`` (Hugging Face LFS files), ``git-sha1`` (the git
    blob id of other Hugging Face files) or ``md5`` (an S3 ETag of a single-part upload)."""

    algorithm: Literal["sha256", "git-sha1", "md5"]
    hexdigest: str

    def hasher(self, size: int) -> _Hasher:
        if self.algorithm == "sha256":
            return hashlib.sha256()
        if self.algorithm == "md5":
            return hashlib.md5(usedforsecurity=False)
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % size)
        return h


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file of a remote artefact: its path relative to the artefact's root, its size and, when
    the source gives one, its checksum."""

    path: str
    size: int
    checksum: Checksum | None = None

    def __post_init__(self) -> None:
        _check_relative("listing", self.path)
        if self.size < 0:
            raise ValueError(f"{self.path}: negative size {self.size}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(slots=True)
class Progress:
    """Bytes done of a total, and a log line (rate since ``started``, ETA) at most every
    ``interval`` seconds of the injected clock."""

    total: int
    started: float
    done: int = 0
    resumed: int = 0  # bytes already on disk at the start (not counted in the rate)
    interval: float = 2.0
    last_report: float = 0.0

    def add(self, n: int, now: float) -> str | None:
        """Count ``n`` bytes; return a progress line when one is due."""
        self.done += n
        if now - self.last_report < self.interval and self.done < self.total:
            return None
        self.last_report = now
        return self.line(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.resumed) / elapsed
        left = self.total - self.done
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = f"{left / rate:.0f}s" if rate > 0 else "unknown"
        return (
            f"{format_bytes(self.done)} of {format_bytes(self.total)} ({pct:.0f}%),"
            f" {format_bytes(rate)}/s, ETA {eta}"
        )
