"""``matrixinfer-downloader``: a model's weights (or a LoRA adapter) where the engine reads them.

matrixinfer-downloader URI --cache DIR [--hf-token-file FILE] [--s3-endpoint-url URL]

Prints the local directory of the artefact as the last line of stdout; progress and errors go to
stderr. Exit codes: 0 done (or already done), 2 bad arguments or URI, 3 authentication failed,
4 not found, 5 disk full, 1 any other failure (verification, network).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fleet.artefacts import parse_uri
from fleet.service import HelpFormatter, add_service_args, configure_logging, duration
from runtime.artefacts import (
    ArtefactError,
    AuthError,
    DiskFullError,
    MissingError,
)
from runtime.fetch import Settings, fetch

__all__ = ["EXIT_CODES", "add_source_flags", "build_parser", "main", "settings_from"]

EXIT_CODES: dict[type[ArtefactError], int] = {AuthError: 3, MissingError: 4, DiskFullError: 5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matrixinfer-downloader",
        formatter_class=HelpFormatter,
        description="Download a model or LoRA adapter (hf://, s3://) into a cache directory, or"
        " check that a pvc:// or file:// one is present. Resumable, verified, one downloader per"
        " cache directory at a time.",
    )
    p.add_argument(
        "uri", help="hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path, file:///path"
    )
    add_source_flags(p)
    p.add_argument(
        "--progress-interval",
        type=duration,
        default="2s",
        metavar="DURATION",
        help="time between progress lines (default 2s)",
    )
    add_service_args(p)
    return p


def add_source_flags(p: argparse.ArgumentParser) -> None:
    """The cache and the sources' flags, shared with ``matrixinfer-runtime``."""
    p.add_argument(
        "--cache",
        metavar="DIR",
        type=Path,
        default=Path(os.environ.get("MATRIXINFER_CACHE", "/cache")),
        help="cache directory (env MATRIXINFER_CACHE)",
    )
    p.add_argument(
        "--pvc-root",
        metavar="DIR",
        type=Path,
        default=Path("/mnt/pvc"),
        help="where pvc://CLAIM is mounted: PVC_ROOT/CLAIM (default /mnt/pvc)",
    )
    p.add_argument(
        "--hf-token-file",
        metavar="FILE",
        type=Path,
        default=os.environ.get("HF_TOKEN_FILE"),
        help="file holding the Hugging Face token (env HF_TOKEN_FILE); else env HF_TOKEN",
    )
    p.add_argument(
        "--hf-endpoint",
        metavar="URL",
        default=os.environ.get("HF_ENDPOINT"),
        help="Hub or mirror URL (env HF_ENDPOINT; default https://huggingface.co)",
    )
    p.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        default=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        help="S3-compatible store URL (env AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL);"
        " credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    )


def settings_from(ns: argparse.Namespace) -> Settings:
    """Settings from parsed flags; ValueError names an unreadable token file."""
    token = os.environ.get("HF_TOKEN") or None
    if ns.hf_token_file is not None:
        try:
            token = Path(ns.hf_token_file).read_text().strip() or None
        except OSError as exc:
            raise ValueError(f"--hf-token-file {ns.hf_token_file}: {exc.strerror}") from exc
    return Settings(
        cache=ns.cache,
        pvc_root=ns.pvc_root,
        hf_token=token,
        hf_endpoint=ns.hf_endpoint,
        s3_endpoint_url=ns.s3_endpoint_url,
        progress_interval=getattr(ns, "progress_interval", 2.0),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    configure_logging(ns.log_level, ns.log_format)
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        uri = parse_uri(ns.uri)
        settings = settings_from(ns)
    except ValueError as exc:
        print(f"matrixinfer-downloader: {exc}", file=sys.stderr)
        return 2
    try:
        path = fetch(uri, settings)
    except ArtefactError as exc:
        print(f"matrixinfer-downloader: {exc}", file=sys.stderr)
        return EXIT_CODES.get(type(exc), 1)
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
