"""Watch throughput of ``fleet.kube.KubeSource`` against the emulated API server (kmock).

    PYTHONPATH=. python -m bench.kube_watch [--pods 2000] [--typed]

The emulator and the writer run in a child process (so the watcher's CPU is its own): after the
watcher's first list, the child creates N pods as fast as it can; the figure is N divided by the
time from the first create until the watcher holds all N pods. ``writer`` is the child's own time
for the N creates (the emulator's ceiling). ``--typed`` also measures kubernetes_asyncio's own
``Watch`` over ``CoreV1Api.list_namespaced_pod`` (objects deserialised into ``V1Pod``).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import textwrap
import time

_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    import aiohttp, kmock
    from matrixinfer.testing.kube import VERBS, Emulator, declare

    async def main(n):
        async with Emulator() as k, kmock.Server(k) as srv:
            k.history_limit = 50
            declare(k)
            for plural, kind in (("modelroutes", "ModelRoute"), ("modelservers", "ModelServer")):
                k.resources[f"networking.matrixinfer.ai/v1alpha1/{plural}"] = kmock.ResourceInfo(
                    kind=kind, namespaced=True, verbs=VERBS)
            url = str(srv.url).rstrip("/")
            print(url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            t0 = time.perf_counter()
            async with aiohttp.ClientSession() as s:
                for i in range(n):
                    body = {"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": f"p{i}", "namespace": "ns",
                                         "resourceVersion": str(10 + i),
                                         "labels": {"app": "sim"}},
                            "status": {"phase": "Running", "podIP": "10.0.0.1"}}
                    async with s.post(url + "/api/v1/namespaces/ns/pods", json=body) as r:
                        await r.read()
            print(f"{time.perf_counter() - t0:.3f}", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main(int(sys.argv[1])))
    """
)


_STREAM = textwrap.dedent(
    """
    import asyncio, sys, time
    import orjson
    from aiohttp import web

    def pod(i):
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"p{i}", "namespace": "ns", "uid": f"uid-{i}",
                             "resourceVersion": str(10 + i),
                             "labels": {"app": "sim", "role": "decode", "group": str(i % 50)},
                             "ownerReferences": [{"apiVersion": "workload.matrixinfer.ai/v1alpha1",
                                                  "kind": "ModelInfer", "name": "m", "uid": "u"}]},
                "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai:v0.9",
                                         "args": ["--model", "/models/m", "--port", "8000"] * 4,
                                         "env": [{"name": f"E{j}", "value": "x" * 20}
                                                 for j in range(12)],
                                         "ports": [{"containerPort": 8000}]}]},
                "status": {"phase": "Running", "podIP": f"10.0.{i // 250}.{i % 250}",
                           "conditions": [{"type": t, "status": "True",
                                           "lastTransitionTime": "2026-01-01T00:00:00Z"}
                                          for t in ("Initialized", "Ready", "ContainersReady",
                                                    "PodScheduled")]}}

    async def main(n):
        events = [orjson.dumps({"type": "ADDED", "object": pod(i)}) + b"\\n" for i in range(n)]
        go = asyncio.Event()

        async def handle(request):
            if request.query.get("watch", "").lower() != "true":
                return web.json_response({"kind": "List", "metadata": {"resourceVersion": "1"},
                                          "items": []})
            resp = web.StreamResponse()
            await resp.prepare(request)
            if request.path.endswith("/pods"):
                await go.wait()
                t0 = time.perf_counter()
                for e in events:
                    await resp.write(e)
                print(f"{time.perf_counter() - t0:.3f}", flush=True)
            await asyncio.sleep(3600)
            return resp

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        go.set()
        await loop.run_in_executor(None, sys.stdin.readline)

    asyncio.run(main(int(sys.argv[1])))
    """
)


class _Child:
    def __init__(self, n: int, feed: str = "emulator") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD if feed == "emulator" else _STREAM, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()

    def go(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return time.perf_counter()

    def writer_seconds(self) -> float:
        assert self.proc.stdout is not None
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("bye\n")
        self.proc.stdin.flush()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _until(check: object, deadline: float) -> None:
    while not check():  # type: ignore[operator]
        if time.perf_counter() > deadline:
            raise TimeoutError("the watcher did not catch up")
        await asyncio.sleep(0.002)


async def source_rate(n: int, feed: str) -> tuple[float, float]:
    from fleet.kube import KubeSource

    child = _Child(n, feed)
    source = KubeSource(child.url, lambda _: None, namespace="ns")
    source.start()
    try:
        await _until(lambda: source.status.synced, time.perf_counter() + 30)
        t0 = child.go()
        await _until(lambda: len(source.pods) >= n, t0 + 300)
        took = time.perf_counter() - t0
        return n / took, await asyncio.to_thread(child.writer_seconds)
    finally:
        await source.stop()
        child.close()


async def typed_rate(n: int, feed: str) -> tuple[float, float]:
    from kubernetes_asyncio import client, watch

    child = _Child(n, feed)
    cfg = client.Configuration(host=child.url)
    seen: set[str] = set()
    async with client.ApiClient(cfg) as api:
        v1 = client.CoreV1Api(api)
        listed = await v1.list_namespaced_pod("ns")
        rv = listed.metadata.resource_version

        async def consume() -> None:
            w = watch.Watch()
            async for event in w.stream(
                v1.list_namespaced_pod, "ns", resource_version=rv, timeout_seconds=300
            ):
                obj = event["object"]
                if isinstance(obj, dict):  # an ERROR's Status
                    raise RuntimeError(f"watch: {obj}")
                seen.add(obj.metadata.name)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)  # the watch is open
        t0 = child.go()
        try:
            await _until(lambda: len(seen) >= n or task.done(), t0 + 300)
            if task.done():
                task.result()
            took = time.perf_counter() - t0
        finally:
            task.cancel()
        writer = await asyncio.to_thread(child.writer_seconds)
    child.close()
    return n / took, writer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=2000)
    p.add_argument("--typed", action="store_true", help="also kubernetes_asyncio's typed Watch")
    p.add_argument(
        "--feed",
        choices=("emulator", "stream"),
        default="stream",
        help="emulator: kmock creates pods (its own speed bounds the figure); stream: a plain "
        "HTTP server writes N realistic pod events into the watch as fast as it can",
    )
    args = p.parse_args()
    runs = [("KubeSource", source_rate)] + ([("typed Watch", typed_rate)] if args.typed else [])
    for name, run in runs:
        rate, writer = asyncio.run(run(args.pods, args.feed))
        print(
            f"{name} ({args.feed}): {rate:,.0f} events/s ({args.pods} pods; writer {writer:.2f}s)"
        )


if __name__ == "__main__":
    main()
