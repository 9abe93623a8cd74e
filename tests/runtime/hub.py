"""A Hugging-Face-compatible endpoint for tests: the model info API and ``resolve``, served by
aiohttp in a background thread, recording every request."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field

from aiohttp import web

from matrixinfer.process import free_port


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths served as LFS files (sha256 listed)
    revisions: dict[str, str] = field(default_factory=lambda: {"main": "a" * 40})
    token: str | None = None  # private: this bearer token is required
    corrupt: set[str] = field(default_factory=set)  # paths whose bytes differ from the listing


@dataclass
class Seen:
    path: str
    range: str | None
    auth: str | None


class Hub:
    """``Hub().start()``; ``url`` is its HF_ENDPOINT; ``repos[repo_id]`` what it serves;
    ``chunk_delay`` slows each 64 KiB of a file (to interrupt a download mid-file); file bodies
    wait while ``gate`` is clear."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.seen: list[Seen] = []
        self.chunk_delay = 0.0
        self.gate = threading.Event()  # file bodies wait until it is set
        self.gate.set()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def resolves(self, name: str) -> list[Seen]:
        return [s for s in self.seen if "/resolve/" in s.path and s.path.endswith("/" + name)]

    def _repo(self, request: web.Request) -> tuple[Repo, str]:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        headers = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        if repo is None:
            raise web.HTTPNotFound(headers=headers, text="Repository not found")
        auth = request.headers.get("Authorization")
        if repo.token is not None and auth != f"Bearer {repo.token}":
            raise web.HTTPUnauthorized(headers=headers, text="Invalid credentials")
        rev = request.match_info.get("rev", "main")
        commit = repo.revisions.get(rev, rev if rev in repo.revisions.values() else None)
        if commit is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"}, text="no revision")
        return repo, commit

    def _record(self, request: web.Request) -> None:
        self.seen.append(
            Seen(request.path, request.headers.get("Range"), request.headers.get("Authorization"))
        )

    async def info(self, request: web.Request) -> web.Response:
        self._record(request)
        repo, commit = self._repo(request)
        siblings = []
        for path, data in repo.files.items():
            s: dict[str, object] = {"rfilename": path, "size": len(data)}
            s["blobId"] = git_blob_id(data)
            if path in repo.lfs:
                sha = hashlib.sha256(data).hexdigest()
                s["lfs"] = {"size": len(data), "sha256": sha, "pointerSize": 134}
            siblings.append(s)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        private = repo.token is not None
        return web.json_response(
            {"id": repo_id, "modelId": repo_id, "sha": commit, "private": private,
             "siblings": siblings}
        )  # fmt: skip

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        repo, commit = self._repo(request)
        path = request.match_info["path"]
        if path not in repo.files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text="no such file")
        data = repo.files[path]
        if path in repo.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        start = 0
        status = 200
        headers = {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": commit,
                   "Accept-Ranges": "bytes"}  # fmt: skip
        rng = request.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        await asyncio.to_thread(self.gate.wait, 60)
        for i in range(start, len(data), 65536):
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await resp.write(data[i : i + 65536])
        await resp.write_eof()
        return resp

    def start(self) -> Hub:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self.info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        self._runner = web.AppRunner(app)
        self._thread.start()

        async def up() -> None:
            assert self._runner is not None
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(up(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
