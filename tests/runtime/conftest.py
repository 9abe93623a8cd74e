"""Fixtures for the runtime tests: a Hugging-Face-compatible hub and an S3 server (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from matrixinfer.process import free_port
from tests.runtime.hub import Hub

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def hub() -> Iterator[Hub]:
    h = Hub().start()
    yield h
    h.stop()


@dataclass
class S3:
    url: str
    client: Any  # boto3 S3 client


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A moto S3 server on 127.0.0.1 (credentials in the environment, as a pod gets them)."""
    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    yield S3(url, boto3.client("s3", endpoint_url=url))
    server.stop()
