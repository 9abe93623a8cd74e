"""Copy a remote artefact into its cache directory: locked, resumable, verified.

One downloader per cache directory at a time: ``.matrixinfer.lock`` in the directory is held with
``fcntl.flock`` for the whole download; a second downloader (another pod on the same volume)
waits for it and then finds the completion marker ``.matrixinfer-complete.json`` (URI, source
identity, files) and skips the work. A file is written to ``<file>.part`` and renamed into place
only after its size and checksum (where the source gives one) are checked; a restart resumes each
``.part`` file from its length with a ranged read.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from fleet.artefacts import Uri, cache_dir, local_path
from runtime.artefacts import (
    ArtefactError,
    AuthError,
    Checksum,
    DiskFullError,
    MissingError,
    Progress,
    RemoteFile,
    VerifyError,
    format_bytes,
)

__all__ = [
    "LOCK_FILE",
    "MARKER_FILE",
    "HfSource",
    "S3Source",
    "Settings",
    "Source",
    "download",
    "fetch",
]

log = logging.getLogger("matrixinfer.downloader")

LOCK_FILE = ".matrixinfer.lock"
MARKER_FILE = ".matrixinfer-complete.json"
CHUNK = 1 << 20


class Source(Protocol):
    """A remote artefact: what files it has, and their bytes from an offset on."""

    uri: Uri

    def identity(self) -> str:
        """What pins this content (a commit, or the listing's ETags)."""
        ...

    def list_files(self) -> list[RemoteFile]: ...

    def read(self, f: RemoteFile, offset: int) -> Iterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """Where artefacts go and how to reach their sources (from flags and environment)."""

    cache: Path
    pvc_root: Path = Path("/mnt/pvc")
    hf_token: str | None = None
    hf_endpoint: str | None = None
    s3_endpoint_url: str | None = None
    progress_interval: float = 2.0
    clock: Callable[[], float] = field(default=time.monotonic)


# ----------------------------------------------------------------------------- Hugging Face


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, dropping the Authorization header when the host changes (a CDN's signed
    URL must not receive the Hub token)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlparse(newurl).netloc != req.host:
            new.remove_header("Authorization")
        return new


class HfSource:
    """A Hugging Face repository: the file list (sizes, sha256 of LFS files, git blob ids of the
    others) from the Hub API through ``huggingface_hub``; the bytes from ``resolve/<commit>/<file>``
    with a Range header."""

    def __init__(self, uri: Uri, token: str | None, endpoint: str | None) -> None:
        from huggingface_hub import HfApi

        self.uri = uri
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        self.endpoint = self.endpoint.rstrip("/")
        self.token = token
        self._api = HfApi(endpoint=self.endpoint, token=token if token else False)
        self._commit: str | None = None
        self._opener = urllib.request.build_opener(_SameHostRedirects)

    def _errors(self, exc: Exception) -> ArtefactError:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else 0
            return _http_error(self.uri.text, status, str(exc).splitlines()[0])
        return ArtefactError(self.uri.text, f"{type(exc).__name__}: {exc}")

    def list_files(self) -> list[RemoteFile]:
        try:
            info = self._api.model_info(
                self.uri.location, revision=self.uri.revision, files_metadata=True
            )
        except Exception as exc:
            raise self._errors(exc) from exc
        self._commit = info.sha
        files = []
        for s in info.siblings or []:
            if s.lfs is not None:
                files.append(RemoteFile(s.rfilename, s.lfs.size, Checksum("sha256", s.lfs.sha256)))
            elif s.size is not None:
                checksum = Checksum("git-sha1", s.blob_id) if s.blob_id else None
                files.append(RemoteFile(s.rfilename, s.size, checksum))
            else:
                raise ArtefactError(self.uri.text, f"the Hub gave no size for {s.rfilename}")
        return files

    def identity(self) -> str:
        return self._commit or self.uri.revision

    def read(self, f: RemoteFile, offset: int) -> Iterator[bytes]:
        from urllib.parse import quote

        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        revision = quote(self._commit or self.uri.revision, safe="")
        url = f"{self.endpoint}/{self.uri.location}/resolve/{revision}/{quote(f.path)}"
        headers = build_hf_headers(token=self.token if self.token else False)
        headers["Accept-Encoding"] = "identity"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        req = urllib.request.Request(url, headers=headers)
        try:
            resp = self._opener.open(req, timeout=60)
        except urllib.error.HTTPError as exc:
            raise _http_error(self.uri.text, exc.code, f"{f.path}: HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            raise ArtefactError(self.uri.text, f"{f.path}: {exc.reason}") from exc
        with resp:
            if offset and resp.status != 206:
                raise ArtefactError(self.uri.text, f"{f.path}: the server ignored the Range header")
            while chunk := resp.read(CHUNK):
                yield chunk


def _http_error(uri: str, status: int, detail: str) -> ArtefactError:
    if status in (401, 403):
        return AuthError(uri, f"{detail} (check the token)")
    if status == 404:
        return MissingError(uri, detail)
    return ArtefactError(uri, detail)


# ----------------------------------------------------------------------------- S3


_S3_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
            "InvalidToken", "403"}  # fmt: skip
_S3_MISSING = {"NoSuchBucket", "NoSuchKey", "404"}


def s3_error(uri: str, exc: Exception) -> ArtefactError:
    """Map a botocore error to an ArtefactError naming the URI."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        message = str(response.get("Error", {}).get("Message", "")) or code
        if code in _S3_AUTH:
            return AuthError(uri, f"{code}: {message} (check the S3 credentials)")
        if code in _S3_MISSING:
            return MissingError(uri, f"{code}: {message}")
        return ArtefactError(uri, f"{code}: {message}")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return AuthError(uri, f"{exc} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    return ArtefactError(uri, f"{type(exc).__name__}: {exc}")


class S3Source:
    """Every object under ``s3://bucket/prefix/`` (or the single object ``prefix``) with boto3;
    an ETag without ``-`` (a single-part upload) is the object's MD5 and is checked."""

    def __init__(self, uri: Uri, endpoint_url: str | None) -> None:
        import boto3

        self.uri = uri
        self._client: Any = boto3.client("s3", endpoint_url=endpoint_url)
        self._etags: list[str] = []
        self._keys: dict[str, str] = {}  # relative path -> object key

    def list_files(self) -> list[RemoteFile]:
        prefix = self.uri.path
        files: list[RemoteFile] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.uri.location, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = cast(str, obj["Key"])
                    if prefix and key == prefix:
                        rel = key.rsplit("/", 1)[-1]
                    elif not prefix or key.startswith(prefix + "/"):
                        rel = key[len(prefix) + 1 :] if prefix else key
                    else:
                        continue  # s3://b/model also lists model-v2/...; not ours
                    if not rel or key.endswith("/"):
                        continue  # a "directory" placeholder
                    etag = cast(str, obj.get("ETag", "")).strip('"')
                    self._etags.append(f"{rel}={etag}")
                    self._keys[rel] = key
                    checksum = Checksum("md5", etag) if etag and "-" not in etag else None
                    files.append(RemoteFile(rel, int(obj["Size"]), checksum))
        except ArtefactError:
            raise
        except Exception as exc:
            raise s3_error(self.uri.text, exc) from exc
        return files

    def identity(self) -> str:
        return ",".join(sorted(self._etags))

    def read(self, f: RemoteFile, offset: int) -> Iterator[bytes]:
        kw: dict[str, Any] = {"Bucket": self.uri.location, "Key": self._keys[f.path]}
        if offset:
            kw["Range"] = f"bytes={offset}-"
        try:
            body = self._client.get_object(**kw)["Body"]
            while chunk := body.read(CHUNK):
                yield cast(bytes, chunk)
        except Exception as exc:
            raise s3_error(self.uri.text, exc) from exc


# ----------------------------------------------------------------------------- the copy


def _source(uri: Uri, settings: Settings) -> Source:
    if uri.scheme == "hf":
        return HfSource(uri, settings.hf_token, settings.hf_endpoint)
    return S3Source(uri, settings.s3_endpoint_url)


def fetch(uri: Uri, settings: Settings) -> Path:
    """Make the artefact available locally and return its directory (or file): pvc:// and file://
    are checked for presence; hf:// and s3:// are downloaded into the cache."""
    if not uri.remote:
        path = local_path(uri, settings.pvc_root)
        if not path.exists():
            raise MissingError(uri.text, f"{path} does not exist")
        if path.is_dir() and not any(path.iterdir()):
            raise MissingError(uri.text, f"{path} is an empty directory")
        log.info("%s: present at %s (used in place)", uri.text, path)
        return path
    return download(_source(uri, settings), cache_dir(settings.cache, uri), settings)


def _read_marker(dest: Path, uri: Uri) -> dict[str, Any] | None:
    try:
        marker = json.loads((dest / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return cast(dict[str, Any], marker) if marker.get("uri") == uri.text else None


def download(source: Source, dest: Path, settings: Settings) -> Path:
    """Copy ``source`` into ``dest`` under the directory's lock; skip it if the marker says done."""
    uri = source.uri
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with open(dest / LOCK_FILE, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: another downloader holds %s; waiting", uri.text, dest / LOCK_FILE)
                fcntl.flock(lock, fcntl.LOCK_EX)
            if _read_marker(dest, uri) is not None:
                log.info("%s: already complete in %s", uri.text, dest)
                return dest
            _copy(source, dest, settings)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(uri.text, f"writing into {dest}: {exc.strerror}") from exc
        raise ArtefactError(uri.text, f"{dest}: {exc}") from exc
    return dest


def _copy(source: Source, dest: Path, settings: Settings) -> None:
    uri = source.uri
    files = source.list_files()
    if not files:
        raise MissingError(uri.text, "no files there")
    present = {f.path: _present(dest, f) for f in files}
    total = sum(f.size for f in files)
    already = sum(present.values())
    free = shutil.disk_usage(dest).free
    if total - already > free:
        raise DiskFullError(
            uri.text,
            f"needs {format_bytes(total - already)} more in {dest}, {format_bytes(free)} free",
        )
    now = settings.clock()
    progress = Progress(total, now, done=already, resumed=already,
                        interval=settings.progress_interval, last_report=now)  # fmt: skip
    log.info("%s: %d files, %s into %s%s", uri.text, len(files), format_bytes(total), dest,
             f" ({format_bytes(already)} already there)" if already else "")  # fmt: skip
    for f in files:
        _copy_file(source, dest, f, present[f.path], progress, settings)
    log.info("%s: done, %s", uri.text, progress.line(settings.clock()))
    marker = {
        "uri": uri.text,
        "identity": source.identity(),
        "files": [{"path": f.path, "size": f.size} for f in files],
        "bytes": total,
        "completed_at": time.time(),
    }
    tmp = dest / (MARKER_FILE + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, dest / MARKER_FILE)


def _present(dest: Path, f: RemoteFile) -> int:
    """Bytes of ``f`` already on disk: all of it when the (verified) file is in place, else the
    length of its ``.part`` file."""
    target = dest / f.path
    if target.is_file() and target.stat().st_size == f.size:
        return f.size
    part = target.with_name(target.name + ".part")
    return min(part.stat().st_size, f.size) if part.is_file() else 0


def _copy_file(
    source: Source, dest: Path, f: RemoteFile, offset: int, progress: Progress, settings: Settings
) -> None:
    uri = source.uri
    target = dest / f.path
    if target.is_file() and target.stat().st_size == f.size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    hasher = f.checksum.hasher(f.size) if f.checksum else None
    if offset:
        log.info("%s: resuming %s at byte %d of %d", uri.text, f.path, offset, f.size)
        with open(part, "r+b") as existing:
            existing.truncate(offset)
            while hasher is not None and (chunk := existing.read(CHUNK)):
                hasher.update(chunk)
    written = offset
    with open(part, "ab" if offset else "wb") as out:
        if written < f.size:
            for chunk in source.read(f, offset):
                out.write(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                written += len(chunk)
                if written > f.size:
                    break
                line = progress.add(len(chunk), settings.clock())
                if line:
                    log.info("%s: %s", uri.text, line)
    if written != f.size:
        if written > f.size:
            part.unlink()
        raise VerifyError(uri.text, f"{f.path}: expected {f.size} bytes, got {written}")
    if hasher is not None and f.checksum is not None and hasher.hexdigest() != f.checksum.hexdigest:
        part.unlink()
        raise VerifyError(
            uri.text,
            f"{f.path}: {f.checksum.algorithm} {hasher.hexdigest()} does not match the source's"
            f" {f.checksum.hexdigest}",
        )
    os.replace(part, target)
