"""Fixtures of the operator tests: the emulated API server and a kubelet that makes its pods run
and become ready."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from matrixinfer.testing.kube import Api, Kubelet, emulator


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with emulator() as a:
        yield a


@pytest.fixture
async def kubelet(api: Api) -> AsyncIterator[Kubelet]:
    k = Kubelet(api)
    task = asyncio.create_task(k.run())
    try:
        yield k
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
