"""Artefact URIs and where they live inside a pod (pure: no network, no files).

A Model's ``modelURI`` and a LoRA adapter's ``uri`` name where the files are:

- ``hf://org/name[@revision]``: a Hugging Face repository (revision: branch, tag or commit;
  default ``main``);
- ``s3://bucket/prefix``: every object under ``prefix/`` (or the one object named ``prefix``);
- ``pvc://claim/path``: a path on a PersistentVolumeClaim mounted at ``<pvc root>/<claim>``;
- ``file:///path``: a path on the pod's file system.

Remote artefacts (hf, s3) are copied into ``<cache>/<layout>`` (:func:`cache_dir`); local ones
(pvc, file) are used where they are (:func:`local_path`). :func:`artefact_path` gives either.
The downloader and the runtime sidecar (``runtime/``) fetch into these paths; the Model
controller (``controllers/model``) points the engine at them, so both sides agree by calling the
same functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath
from typing import Literal, TypeVar

__all__ = [
    "Scheme",
    "Uri",
    "artefact_path",
    "cache_dir",
    "check_relative",
    "local_path",
    "parse_uri",
]

Scheme = Literal["hf", "s3", "pvc", "file"]

_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_REVISION = re.compile(r"^[\w.\-/]+$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")

P = TypeVar("P", bound=PurePath)


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
        check_relative(text, prefix, allow_empty=True)
        return Uri(text, "s3", bucket, prefix)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not claim:
            raise ValueError(f"{text!r}: expected pvc://claim/path")
        path = path.strip("/")
        check_relative(text, path, allow_empty=True)
        return Uri(text, "pvc", claim, path)
    if not rest.startswith("/"):
        raise ValueError(f"{text!r}: expected file:///absolute/path")
    return Uri(text, "file", "", rest)


def check_relative(uri: str, path: str, *, allow_empty: bool = False) -> None:
    """ValueError unless ``path`` is relative and stays below its root (no ``..`` or ``.``)."""
    if not path and allow_empty:
        return
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or ".." in parts or "." in parts:
        raise ValueError(f"{uri}: unsafe relative path {path!r}")


def cache_dir(cache: P, uri: Uri) -> P:
    """Where a remote artefact lives in the cache: ``hf/<org>/<name>/<revision>`` or
    ``s3/<bucket>/<prefix>`` (a revision's ``/`` becomes ``--``)."""
    if uri.scheme == "hf":
        return cache / "hf" / uri.location / uri.revision.replace("/", "--")
    if uri.scheme == "s3":
        return cache / "s3" / uri.location / uri.path if uri.path else cache / "s3" / uri.location
    raise ValueError(f"{uri.text}: {uri.scheme}:// artefacts are not cached (used in place)")


def local_path(uri: Uri, pvc_root: P) -> P:
    """The path of a pvc:// or file:// artefact inside the pod."""
    if uri.scheme == "pvc":
        return pvc_root / uri.location / uri.path
    if uri.scheme == "file":
        return type(pvc_root)(uri.path)
    raise ValueError(f"{uri.text}: {uri.scheme}:// artefacts are downloaded, not used in place")


def artefact_path(uri: Uri, cache: P, pvc_root: P) -> P:
    """Where the artefact is once the downloader is done: in the cache (hf, s3) or in place."""
    return cache_dir(cache, uri) if uri.remote else local_path(uri, pvc_root)
