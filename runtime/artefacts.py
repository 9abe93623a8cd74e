"""What a download needs beyond the URI: its errors, checksums and progress (pure: no network,
no files). The URIs and the cache layout are :mod:`fleet.artefacts` (the Model controller points
the engine at the same paths).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol

from fleet.artefacts import check_relative

__all__ = [
    "ArtefactError",
    "AuthError",
    "Checksum",
    "DiskFullError",
    "MissingError",
    "Progress",
    "RemoteFile",
    "VerifyError",
    "format_bytes",
]


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
        check_relative("listing", self.path)
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
