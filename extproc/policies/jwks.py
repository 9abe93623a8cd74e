"""JWT signing keys fetched from a JWKS URL (the auth core's only network I/O)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt
import orjson

__all__ = ["JwksCache"]

log = logging.getLogger("matrixinfer.extproc.auth")


class JwksCache:
    """Signing keys by ``kid``; refreshed periodically, on an unknown kid (rate-limited), with
    exponential backoff after failures."""

    def __init__(
        self,
        url: str,
        *,
        refresh: float = 300.0,
        min_refetch: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.refresh_every = refresh
        self.min_refetch = min_refetch
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = float("-inf")
        self.failures = 0
        self.next_attempt = float("-inf")
        self._task: asyncio.Task[bool] | None = None

    def load(self, jwks: Mapping[str, Any]) -> None:
        keys: dict[str, jwt.PyJWK] = {}
        for item in jwks.get("keys", []):
            try:
                key = jwt.PyJWK(dict(item))
            except jwt.PyJWTError as exc:
                log.warning("JWKS %s: skipping key %s: %s", self.url, item.get("kid"), exc)
                continue
            keys[str(item.get("kid", ""))] = key
        self.keys = keys

    async def refresh(self) -> bool:
        import aiohttp

        now = self.clock()
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.url) as resp,
            ):
                resp.raise_for_status()
                self.load(orjson.loads(await resp.read()))
        except Exception as exc:  # network, HTTP or JSON: keep the old keys, back off
            self.failures += 1
            backoff = min(self.refresh_every, self.min_refetch * 2 ** min(self.failures, 10))
            self.next_attempt = now + backoff
            log.warning("JWKS %s: fetch failed (%s); retry in %.1fs", self.url, exc, backoff)
            return False
        self.failures = 0
        self.fetched_at = now
        self.next_attempt = now + self.min_refetch
        return True

    def want_refresh(self) -> None:
        """An unknown kid: fetch again soon (not more often than ``min_refetch``/backoff)."""
        if self.clock() < self.next_attempt or (self._task and not self._task.done()):
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule on
            self._task = asyncio.get_running_loop().create_task(self.refresh())

    async def run(self) -> None:
        """Background refresh loop (cancel to stop)."""
        while True:
            now = self.clock()
            if now - self.fetched_at >= self.refresh_every and now >= self.next_attempt:
                await self.refresh()
            await asyncio.sleep(1.0)

    def key_for(self, kid: str) -> jwt.PyJWK | None:
        return self.keys.get(kid)
