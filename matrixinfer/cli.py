"""``matrixinfer``: the command line.

- ``matrixinfer demo``: a simulator fleet, the extproc and Envoy with ``examples/demo/``; prints how
  to call it and sends N real OpenAI requests through Envoy (default 8), printing the answers and
  the per-pod split. In a terminal (or with ``--requests 0``) it then shows live per-pod counts
  until Ctrl-C / SIGTERM; without one (or with an explicit ``--requests N``) it stops everything and
  exits 0.
- ``matrixinfer gateway --config DIR``: the extproc and Envoy in front of existing
  OpenAI-compatible endpoints (an ``Endpoints`` document in DIR lists them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from controllers.autoscaling.planner import (
    DEFAULT_INTERVAL,
    DEFAULT_PANIC_WINDOW,
    DEFAULT_STABLE_WINDOW,
)
from controllers.xds.generate import GatewaySettings
from fleet.service import (
    DeprecatedAlias,
    HelpFormatter,
    duration,
    format_duration,
    fraction,
    milliseconds,
    version,
)
from matrixinfer.get import state_path
from matrixinfer.process import (
    Child,
    ReadinessTimeout,
    free_port,
    http_ok,
    port_is_free,
    wait_until,
)
from matrixinfer.resources import project_file
from matrixinfer.stack import GatewayStack, StackOptions

if TYPE_CHECKING:
    from matrixinfer.localcluster import LocalCluster

__all__ = ["main"]

DEMO_MODEL = "demo-model"
_DEFAULT_MESSAGE_TIMEOUT = GatewaySettings().message_timeout_ms / 1000  # the gateway's, seconds


class Stopped(Exception):
    """SIGTERM / SIGINT arrived: unwind and stop every child."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def _say(text: str = "") -> None:
    with contextlib.suppress(OSError):  # the terminal may be gone while we clean up
        print(text, flush=True)


def _port_or_free(host: str, wanted: int) -> int:
    if port_is_free(host, wanted):
        return wanted
    port = free_port(host)
    _say(f"port {wanted} is busy on {host}; using {port}")
    return port


def _wait_gateway(stack: GatewayStack, addresses: set[str], timeout: float = 30.0) -> None:
    """Until the extproc applied the config and Envoy knows every pod (override_host needs it)."""

    def check() -> bool:
        return stack.extproc_ready() and addresses <= stack.envoy_hosts()

    try:
        wait_until(check, timeout, "gateway (extproc configuration and Envoy endpoints)", 0.1)
    except ReadinessTimeout:
        tail = stack.extproc.log_tail(15)
        raise ReadinessTimeout(
            f"the gateway did not become ready in {timeout:.0f}s; extproc log:\n{tail}"
        ) from None


def _pod_counts(stack: GatewayStack) -> dict[str, tuple[int, int]]:
    """pod -> (requests routed there so far, in flight now), from the extproc."""
    from prometheus_client.parser import text_string_to_metric_families

    picks: dict[str, int] = {}
    try:
        with urllib.request.urlopen(f"{stack.extproc_url}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "matrixinfer_gateway_pod_picks":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        pod = sample.labels["pod"]
                        picks[pod] = picks.get(pod, 0) + int(sample.value)
        state = stack.state()
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    out: dict[str, tuple[int, int]] = {}
    for pod in state.get("pods", []):
        out[pod["name"]] = (picks.get(pod["name"], 0), int(pod["inFlight"]))
    return out


def _format_counts(counts: dict[str, tuple[int, int]]) -> str:
    return "  ".join(f"{name}: {n} ({live} live)" for name, (n, live) in sorted(counts.items()))


def _print_howto(url: str, model: str = DEMO_MODEL) -> None:
    base = url.rsplit("/v1", 1)[0]
    _say("Try it:")
    _say(
        f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
    )
    _say("")
    _say("  from openai import OpenAI")
    _say(f'  client = OpenAI(base_url="{url}", api_key="unused")')
    _say(
        f'  r = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello!"}])'
    )
    _say("  print(r.choices[0].message.content)")
    _say("")


def _chat(url: str, content: str, stream: bool = False, model: str = DEMO_MODEL) -> tuple[str, str]:
    """One chat completion through the gateway: (answer text, pod that served it)."""
    try:
        from openai import OpenAI
    except ImportError:
        return _chat_urllib(url, content, model)
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    messages: Any = [{"role": "user", "content": content}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, max_tokens=24, stream=True
        ) as resp:
            pod = resp.headers.get("x-inference-pod", "?")
            text = "".join(
                chunk.choices[0].delta.content or "" for chunk in resp.parse() if chunk.choices
            )
        return text, pod
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=24
    )
    completion = raw.parse()
    return completion.choices[0].message.content or "", raw.headers.get("x-inference-pod", "?")


def _chat_urllib(url: str, content: str, model: str = DEMO_MODEL) -> tuple[str, str]:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24}
    ).encode()
    req = urllib.request.Request(
        f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        data = json.loads(resp.read())
        return data["choices"][0]["message"]["content"], resp.headers.get("x-inference-pod", "?")


_PROMPTS = [
    "Say hello to MatrixInfer.",
    "What is continuous batching?",
    "Name three prime numbers.",
    "Why route by prefix cache?",
]


def _run_requests(
    stack: GatewayStack,
    n: int,
    on_answer: Callable[[], None] | None = None,
    model: str = DEMO_MODEL,
) -> int:
    """``n`` requests for ``model`` (the second one streamed); ``on_answer`` after each answered
    one."""
    failures = 0
    for i in range(n):
        prompt = _PROMPTS[i % len(_PROMPTS)]
        stream = i == 1
        try:
            text, pod = _chat(stack.url, prompt, stream=stream, model=model)
        except Exception as exc:  # report, keep going, fail the run at the end
            failures += 1
            _say(f"request {i + 1}/{n} failed: {type(exc).__name__}: {exc}")
            continue
        if on_answer is not None:
            on_answer()
        kind = "stream" if stream else "chat"
        _say(f"request {i + 1}/{n} ({kind}) -> {pod}: {text.strip()[:70]!r}")
    _say("")
    _say("requests per pod: " + _format_counts(_pod_counts(stack)))
    return failures


def _live(
    stack: GatewayStack,
    children_alive: Callable[[], str | None],
    cluster: LocalCluster | None = None,
) -> None:
    tty = sys.stdout.isatty()
    last = ""
    while True:
        dead = children_alive()
        if dead:
            raise RuntimeError(f"{dead} exited unexpectedly; see the logs in {stack.run_dir}")
        if cluster is not None and not cluster.lines.empty():
            if tty:
                print("\r\033[K", end="")
            _print_lines(cluster)
            last = ""
        line = "requests per pod: " + _format_counts(_pod_counts(stack))
        if tty:
            print("\r\033[K" + line, end="", flush=True)
        elif line != last:
            _say(line)
        last = line
        time.sleep(1.0)


def _api_objects(server: str, kind: str) -> list[dict[str, Any]]:
    from matrixinfer.get import list_objects

    try:
        return list_objects(server, kind, timeout=2)
    except OSError:
        return []


def _model_up(model: dict[str, Any]) -> bool:
    """Every backend of the Model has all its replicas ready (its status, by the controller)."""
    status = model.get("status") or {}
    rows = status.get("backends") or []
    backends = (model.get("spec") or {}).get("backends") or []
    active = any(
        c.get("type") == "Active" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    return (
        active
        and len(rows) == len(backends)
        and all(int(r.get("readyReplicas") or 0) >= int(r.get("replicas") or 0) for r in rows)
    )


def _print_lines(cluster: LocalCluster) -> None:
    """What the local cluster did since the last call (applied objects, pods), as it happened."""
    while True:
        try:
            line = cluster.lines.get_nowait()
        except queue.Empty:
            return
        _say(f"  {line}")


def _wait_model(cluster: LocalCluster, stack: GatewayStack, timeout: float) -> None:
    """Until every Model in the API is up (:func:`_model_up`), every pod is Ready, and the
    gateway routes to them all (the extproc lists them and Envoy knows their addresses); prints
    the cluster's lines meanwhile, so the pods come up one by one on the terminal."""
    deadline = time.monotonic() + timeout
    while True:
        _print_lines(cluster)
        dead = cluster.alive()
        if dead:
            raise ReadinessTimeout(f"{dead} stopped: {cluster.errors!r}")
        models = _api_objects(cluster.url, "models")
        pods = _api_objects(cluster.url, "pods")
        ready = {
            f"{p['status']['podIP']}:8000"
            for p in pods
            if p.get("status", {}).get("podIP")
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in p["status"].get("conditions") or ()
            )
        }
        models_up = all(_model_up(m) for m in models)
        # a Model whose backends are all at zero (minReplicas 0) is up with no pod
        if (pods or models) and models_up and len(ready) == len(pods) and stack.extproc_ready():
            state = _read_state(stack) or {}
            routed = {str(p["address"]) for p in state.get("pods") or ()}
            if ready <= routed and routed <= stack.envoy_hosts():
                return
        if time.monotonic() > deadline:
            tail = stack.extproc.log_tail(15)
            raise ReadinessTimeout(
                f"the model did not come up in {timeout:.0f}s ({len(ready)} of {len(pods)} pods "
                f"ready); extproc log:\n{tail}"
            )
        time.sleep(0.1)


def _console_child(
    port: int, cluster: LocalCluster, stack: GatewayStack, run_dir: Path
) -> tuple[Child, str]:
    """``matrixinfer console`` for the local stack, as a child process: against the local API
    server, chatting through Envoy, the figures from the extproc's /metrics, with one token made
    here (written to a file only this user reads) so that the URL with it can be printed; the
    child and that URL."""
    import secrets

    token_file = run_dir / "console.token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token = secrets.token_urlsafe(24)
    token_file.write_text(token + "\n")
    base = f"http://127.0.0.1:{port}"
    child = Child(
        "console",
        [
            sys.executable, "-m", "matrixinfer.cli", "console", "--host", "127.0.0.1",
            "--port", str(port), "--server", cluster.url, "--namespace", "default",
            "--gateway", stack.url.rsplit("/v1", 1)[0],
            "--gateway-metrics", f"{stack.extproc_url}/metrics",
            "--local-token-file", str(token_file),
        ],
        log_path=run_dir / "console.log",
    )  # fmt: skip
    return child, f"{base}/ui/index.html#token={token}"


def _wait_console(child: Child, url: str, timeout: float = 60.0) -> None:
    """Until the console started beside the pods answers /api/health (it exited: an error)."""
    base = url.split("/ui/", 1)[0]

    def check() -> bool:
        if not child.running():
            raise ReadinessTimeout(f"the console exited; its log:\n{child.log_tail(15)}")
        return http_ok(f"{base}/api/health")

    wait_until(check, timeout, "the console", 0.1)


def cmd_demo(args: argparse.Namespace) -> int:
    # default: 8 requests, then (in a terminal) the live view until Ctrl-C, else exit;
    # --requests N: N requests and exit; --requests 0: straight to the live view
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    requests = args.requests if args.requests is not None else 8
    live = args.requests == 0 or (args.requests is None and terminal)
    run_dir = (
        Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="matrixinfer-demo-"))
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    examples = Path(args.examples) if args.examples else project_file("examples/demo")
    listen_port = _port_or_free(args.host, args.port)
    console_port = None if args.no_console else _port_or_free("127.0.0.1", args.console_port)
    from matrixinfer.localcluster import LocalCluster, LocalOptions

    _say(
        "MatrixInfer demo: a local cluster (API server, the controllers, a kubelet running pods "
        f"as simulators), extproc and Envoy (logs: {run_dir})"
    )
    # the extproc's /metrics port is chosen now: the operator's autoscaler reads the gateway's
    # demand there (the gateway starts after the cluster)
    extproc_http = free_port()
    sim_args = ["--time-scale", str(args.time_scale)]
    if args.pod_start_delay > 0:  # the simulator's /health answers 503 this long
        sim_args += ["--slow-start", format_duration(args.pod_start_delay)]
    cluster = LocalCluster(
        LocalOptions(
            config_dir=examples,
            run_dir=run_dir,
            first_host=args.first_host,
            sim_args=sim_args,
            state_file=state_path(),
            gateway_metrics_urls=[f"http://127.0.0.1:{extproc_http}/metrics"],
            autoscale_interval=args.autoscale_interval,
            autoscale_stable_window=args.autoscale_stable_window,
            autoscale_panic_window=args.autoscale_panic_window,
        )
    )
    stack: GatewayStack | None = None
    console: Child | None = None
    console_url = ""
    with contextlib.suppress(ImportError):  # loaded now, not inside the first request's timing
        import openai  # noqa: F401
    try:
        started = time.monotonic()
        cluster.start()
        _say(f"local API server at {cluster.url}; applying {examples} (watched for changes)")
        stack = GatewayStack(
            examples,
            run_dir,
            StackOptions(
                listen_host=args.host,
                listen_port=listen_port,
                access_log=True,
                kube_server=cluster.url,
                http_ports=(extproc_http,),
            ),
        )
        stack.start()
        if console_port is not None:  # starts while the pods do; awaited once they are up
            console, console_url = _console_child(console_port, cluster, stack, run_dir)
            console.start()
        _wait_model(cluster, stack, args.ready_timeout)
        _say(
            f"gateway ready after {time.monotonic() - started:.1f}s: OpenAI API at {stack.url} "
            f"(extproc metrics: {stack.extproc_url}/metrics)"
        )
        if console is not None:
            _wait_console(console, console_url)
            _say(f"  console (deploy, watch and chat in a browser): {console_url}")
        _say("  see what the controllers made: matrixinfer get models|modelinfers|pods")
        _say("")
        # the requests go to the first Model applied (examples/demo: demo-model)
        names = sorted(str(m["metadata"]["name"]) for m in _api_objects(cluster.url, "models"))
        model = names[0] if names else DEMO_MODEL
        _print_howto(stack.url, model)
        if requests > 0:
            answered: list[float] = []
            failures = _run_requests(
                stack, requests, lambda: answered.append(time.monotonic()), model
            )
            if answered:
                _say(_timing(cluster, answered[0]))
            if failures:
                _say(f"{failures} of {requests} requests failed; logs in {run_dir}")
                return 1
            _say("every request went through Envoy and the extproc to a pod.")
        if not live:
            _say("demo finished.")
            return 0
        _say(
            f"Still running: try the curl line or the openai snippet above; edit {examples} "
            "(e.g. minReplicas) to change the pods. Press Ctrl-C to stop."
        )

        def alive() -> str | None:
            assert stack is not None
            for child in (stack.extproc, stack.envoy):
                if not child.running():
                    return child.name
            return cluster.alive()

        _live(stack, alive, cluster)
        return 0
    except Stopped as exc:
        _say(f"\nstopping ({exc})")
        if stack is not None:
            _drain(stack, args.drain_timeout)
        return 0
    except (ReadinessTimeout, RuntimeError) as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        # a second signal (the terminal closing sends SIGHUP after the Ctrl-C) must not cut the
        # clean-up short: the pods, the operator and the state file go in order
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if console is not None:
            console.stop()
        if stack is not None:
            stack.stop()
        cluster.stop()
        _say("stopped: pods, controllers, local API server, extproc and Envoy")


def _timing(cluster: LocalCluster, first_answer: float) -> str:
    """How long the first answer took from the Model's creation, when the controllers' first
    pod started and the last one turned ready, and how much the pods' simulators spent starting
    (process start to ``/health`` 200, per pod)."""
    applied = cluster.applier.first_applied if cluster.applier is not None else None
    kubelet = cluster.kubelet
    if applied is None or kubelet is None:
        return "first answer: the configuration was never applied"
    startup = sorted(kubelet.startup.values())
    sims = f"{startup[0]:.2f}-{startup[-1]:.2f}s" if startup else "n/a"
    first_pod = min(kubelet.started.values(), default=applied) - applied
    all_ready = max(kubelet.ready_at.values(), default=applied) - applied
    return (
        f"first answer {first_answer - applied:.2f}s after the Model was applied (first pod "
        f"started +{first_pod:.2f}s, all {len(startup)} ready +{all_ready:.2f}s; simulator "
        f"start-up, process to /health: {sims} per pod)"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def cmd_get(args: argparse.Namespace) -> int:
    import datetime

    from matrixinfer.get import kind_of, list_objects, table

    try:
        kind = kind_of(args.kind)
    except ValueError as exc:
        _say(f"error: {exc}")
        return 2
    server = args.server
    if server is None:
        path = Path(args.state) if args.state else state_path()
        try:
            state = json.loads(path.read_text())
            server, pid = str(state["server"]), int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            _say(
                f"error: no running local cluster recorded in {path}; start `matrixinfer demo` "
                "or pass --server URL"
            )
            return 1
        if not _alive(pid):
            _say(
                f"error: no running local cluster: the one recorded in {path} (pid {pid}) has "
                "exited; start `matrixinfer demo` or pass --server URL"
            )
            return 1
    try:
        items = list_objects(server, kind)
    except OSError as exc:
        _say(f"error: {exc} (is the local cluster still running?)")
        return 1
    if args.namespace:
        items = [i for i in items if (i.get("metadata") or {}).get("namespace") == args.namespace]
    _say(table(kind, items, datetime.datetime.now(tz=datetime.UTC)))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    config = Path(args.config)
    if not config.is_dir():
        _say(f"error: --config {config} is not a directory")
        return 2
    from fleet.files import ConfigError, load_directory

    try:
        load_directory(config)
    except ConfigError as exc:
        _say(f"error: the configuration in {config} is not valid:\n{exc}")
        return 2
    _hint_local_mode(config)
    run_dir = (
        Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="matrixinfer-gw-"))
    )
    stack = GatewayStack(
        config,
        run_dir,
        StackOptions(
            listen_host=args.host,
            listen_port=args.port,
            body_mode=args.body_mode,
            body_limit=args.body_limit,
            fail_open=args.fail_open,
            message_timeout_ms=round(args.message_timeout * 1000),
            scrape_interval=args.scrape_interval,
            access_log=args.access_log != "off",
            access_log_format="text" if args.access_log == "off" else args.access_log,
            transport=args.transport,
            extproc_processes=args.extproc_processes,
            request_headers_timeout=args.request_headers_timeout,
            request_body_idle_timeout=args.request_body_idle_timeout,
            stream_idle_timeout=args.stream_idle_timeout,
            policies=args.policies,
            auth_config=args.auth_config,
            policy_config=args.policy_config,
            ratelimit_fail=args.ratelimit_fail,
            redis_password_file=args.redis_password_file,
            redis_headroom=args.redis_headroom,
            tracing_collector=args.tracing_collector,
        ),
    )
    try:
        stack.start()
        wait_until(stack.extproc_ready, 30, "extproc configuration")
        # the pods as the extproc resolved them (host-only endpoints take the workloadPort)
        state = stack.state()
        _wait_gateway(stack, {str(p["address"]) for p in state["pods"]})
        _say(f"MatrixInfer gateway: OpenAI API at {stack.url}")
        _say(f"  models: {', '.join(_models(stack)) or '(none)'}")
        _say(f"  extproc: {stack.extproc_url}/metrics, /debug/state; Envoy admin {stack.admin_url}")
        _say(f"  logs: {run_dir}; configuration in {config} is watched. Ctrl-C stops.")
        for line in config_news(None, state):
            _say(line)
        while all(c.running() for c in (*stack.extprocs, stack.envoy)):
            time.sleep(0.5)
            now = _read_state(stack)
            if now is not None:
                for line in config_news(state, now):
                    _say(line)
                state = now
        _say("error: a gateway process exited; see the logs")
        return 1
    except Stopped:
        _drain(stack, args.drain_timeout)
        return 0
    except ReadinessTimeout as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        stack.stop()


def _hint_local_mode(config: Path) -> None:
    """Models, ModelInfers and AutoscalingPolicies need controllers: point to the local mode."""
    from matrixinfer.applier import DirectoryError, read_directory

    try:
        docs, _ = read_directory(config)
    except DirectoryError:
        return
    kinds = sorted({d.kind for d in docs} & {"Model", "ModelInfer", "AutoscalingPolicy"})
    if kinds:
        _say(
            f"note: the {', '.join(kinds)} objects in {config} need the controllers; "
            f"`matrixinfer demo --examples {config}` runs them (the local mode, docs/model.md)"
        )


def _drain(stack: GatewayStack, timeout: float) -> None:
    """Before the stack stops: Envoy takes no new requests and those in flight finish (bounded)."""
    _say(f"draining: no new requests; up to {format_duration(timeout)} for those in flight")
    if not stack.drain(timeout):
        left = stack.active_requests()
        _say(f"drain timeout: {left if left is not None else 'some'} requests cut")


def config_news(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """Terminal lines for what changed between two extproc ``/debug/state`` reads: a rejected
    reload (its error names file and line), a configuration applied again after a rejection, a
    reload, and warnings not shown before (all of them on the first read)."""
    out: list[str] = []
    old = (before or {}).get("config") or {}
    new = after.get("config") or {}
    if before is not None:
        if new.get("rejected", 0) > old.get("rejected", 0) and new.get("lastError"):
            error = "\n".join(f"    {line}" for line in str(new["lastError"]).splitlines())
            out.append(
                f"configuration rejected; the last good one stays in force:\n{error}\n"
                f"  fix the file and save it: {new.get('directory', '')} is watched"
            )
        if new.get("applied", 0) > old.get("applied", 0):
            sizes = (
                f"{len(after.get('modelRoutes') or [])} ModelRoutes, "
                f"{len(after.get('modelServers') or [])} ModelServers, "
                f"{len(after.get('pods') or [])} pods"
            )
            if old.get("lastError"):
                out.append(f"configuration accepted again (the error is fixed): {sizes}")
            else:
                out.append(f"configuration reloaded: {sizes}")
    seen = set((before or {}).get("warnings") or ())
    out.extend(f"warning: {w}" for w in after.get("warnings") or () if w not in seen)
    return out


def _read_state(stack: GatewayStack) -> dict[str, Any] | None:
    try:
        return stack.state()
    except (urllib.error.URLError, OSError, ValueError):
        return None  # a busy or restarting extproc: ask again on the next turn


def _models(stack: GatewayStack) -> list[str]:
    try:
        with urllib.request.urlopen(f"{stack.url}/models", timeout=2) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return []


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_drain_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drain-timeout",
        type=duration,
        default="10s",
        help="on Ctrl-C / SIGTERM: Envoy stops accepting and requests in flight (streams "
        "included) get this long to finish before everything stops",
    )


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """matrixinfer-extproc's policy flags, passed through to every extproc process."""
    group = parser.add_argument_group("policies (docs/policies.md); none given: no policies")
    group.add_argument(
        "--policies",
        action="store_true",
        help="apply ModelRoute rateLimit/access/queue and account usage",
    )
    group.add_argument(
        "--auth-config",
        type=_existing_file,
        default=None,
        help="YAML: apiKeysFile, jwt, anonymousRoutes (implies --policies)",
    )
    group.add_argument(
        "--policy-config",
        type=_existing_file,
        default=None,
        help="YAML: gateway-wide policy options (implies --policies)",
    )
    group.add_argument(
        "--ratelimit-fail",
        choices=("open", "closed"),
        default="open",
        help="Redis unreachable: open = local buckets, closed = 503",
    )
    group.add_argument(
        "--redis-password-file",
        type=_existing_file,
        default=None,
        help="file holding the Redis password",
    )
    group.add_argument(
        "--redis-headroom",
        type=fraction,
        default=0.25,
        metavar="FRACTION",
        help="admit without waiting for Redis while more than this fraction of every limited "
        "bucket is left (matrixinfer-extproc --help)",
    )


def _existing_file(text: str) -> Path:
    path = Path(text).resolve()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matrixinfer",
        description="MatrixInfer command line. Durations: 500ms, 2s, 1m30s (a bare number is "
        "seconds).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the local stack: a local cluster (API server, "
                          "controllers, pods as simulators), extproc and Envoy",
                          formatter_class=HelpFormatter)  # fmt: skip
    demo.add_argument("--host", default="127.0.0.1", help="Envoy listen address")
    demo.add_argument("--port", type=int, default=8080, help="Envoy listen port")
    demo.add_argument("--first-host", default="127.0.0.10", help="first pod IP (one per pod)")
    demo.add_argument(
        "--requests",
        type=int,
        default=None,
        help="send N requests, print the answers and exit; 0: only the live view "
        "(default: 8 requests, then the live view in a terminal, else exit)",
    )
    demo.add_argument(
        "--once", action="store_const", const=1, dest="requests", help="= --requests 1"
    )
    demo.add_argument(
        "--time-scale", type=float, default=0.05, help="simulator wall seconds per simulated second"
    )
    demo.add_argument(
        "--pod-start-delay",
        type=duration,
        default="0s",
        help="each pod's simulator answers /health 503 this long after it starts (a model "
        "loading), so pods turn Ready that much later",
    )
    demo.add_argument("--run-dir", default=None, help="folder for logs and generated config")
    demo.add_argument(
        "--examples",
        default=None,
        help="folder of Models and other objects applied to the local cluster, watched "
        "(default examples/demo)",
    )
    demo.add_argument(
        "--ready-timeout",
        type=duration,
        default="90s",
        help="how long the Model's pods and the gateway get to come up",
    )
    demo.add_argument(
        "--autoscale-interval",
        type=duration,
        default=format_duration(DEFAULT_INTERVAL),
        help="time between two autoscaler syncs of an AutoscalingPolicy",
    )
    demo.add_argument(
        "--autoscale-stable-window",
        type=duration,
        default=format_duration(DEFAULT_STABLE_WINDOW),
        help="the autoscaler's stable window (demand averaged for scaling)",
    )
    demo.add_argument(
        "--autoscale-panic-window",
        type=duration,
        default=format_duration(DEFAULT_PANIC_WINDOW),
        help="the autoscaler's panic window (demand averaged for panic mode)",
    )
    demo.add_argument(
        "--console-port",
        type=int,
        default=8090,
        help="the console's port on 127.0.0.1 (a free one when busy)",
    )
    demo.add_argument(
        "--no-console", action="store_true", help="do not start the console (docs/console.md)"
    )
    _add_drain_timeout(demo)
    demo.set_defaults(func=cmd_demo)

    gw = sub.add_parser("gateway", help="run extproc + Envoy in front of existing endpoints",
                        formatter_class=HelpFormatter)  # fmt: skip
    gw.add_argument("--config", required=True, help="directory of YAML configuration")
    gw.add_argument("--host", default="127.0.0.1", help="Envoy listen address")
    gw.add_argument("--port", type=int, default=8080, help="Envoy listen port")
    gw.add_argument("--fail-open", action="store_true", help="route round-robin when extproc fails")
    gw.add_argument("--body-mode", default="BUFFERED", choices=("BUFFERED", "FULL_DUPLEX_STREAMED"),
                    help="ext_proc request body mode")  # fmt: skip
    gw.add_argument("--body-limit", type=int, default=10 * 1024 * 1024, help="bytes")
    gw.add_argument(
        "--message-timeout",
        type=duration,
        default=format_duration(_DEFAULT_MESSAGE_TIMEOUT),
        help="ext_proc wait per reply outside the queue (queued requests extend it)",
    )
    gw.add_argument("--message-timeout-ms", type=milliseconds, dest="message_timeout",
                    action=DeprecatedAlias, replacement="--message-timeout")  # fmt: skip
    gw.add_argument("--scrape-interval", type=duration, default="200ms", help="pod /metrics period")
    gw.add_argument(
        "--access-log",
        nargs="?",
        const="json",
        default="json",
        choices=("json", "text", "off"),
        help="Envoy's access line per request in the log folder's envoy.log: json (one object "
        "per request, docs/gateway.md), text, or off",
    )
    gw.add_argument(
        "--transport",
        default="h2",
        choices=("h2", "grpc"),
        help="extproc's ext_proc server: h2 (hand-written HTTP/2) or grpc (grpc.aio) (default: h2)",
    )
    gw.add_argument(
        "--extproc-processes",
        type=_positive_int,
        default=1,
        help="extproc processes behind Envoy (each keeps its own scheduler state)",
    )
    gw.add_argument(
        "--request-headers-timeout",
        type=duration,
        default=format_duration(GatewaySettings().request_headers_timeout_s),
        help="a request's headers must arrive within this, else the connection is closed",
    )
    gw.add_argument(
        "--request-body-idle-timeout",
        type=duration,
        default=format_duration(GatewaySettings().request_body_idle_timeout_s),
        help="longest stall of a request body before it is routed (408)",
    )
    gw.add_argument(
        "--stream-idle-timeout",
        type=duration,
        default=format_duration(GatewaySettings().stream_idle_timeout_s),
        help="longest silence on a routed request's answer (a ModelServer's streamIdleTimeout "
        "instead when it sets one)",
    )
    gw.add_argument(
        "--tracing-collector",
        default=None,
        metavar="HOST:PORT",
        help="OTLP/gRPC collector: Envoy and the extproc send OpenTelemetry spans there "
        "(docs/gateway.md 'Tracing'; the extproc also reads the OTEL_* variables) "
        "(default empty: no tracing)",
    )
    gw.add_argument("--run-dir", default=None, help="folder for logs and the rendered bootstrap")
    _add_drain_timeout(gw)
    _add_policy_flags(gw)
    gw.set_defaults(func=cmd_gateway)

    get = sub.add_parser("get", help="list what the controllers made in the local cluster, "
                         "like kubectl get", formatter_class=HelpFormatter)  # fmt: skip
    get.add_argument("kind", help="models | modelinfers | pods | modelservers | modelroutes | "
                     "autoscalingpolicies")  # fmt: skip
    get.add_argument("--server", default=None,
                     help="API server URL (default: the local cluster's, see --state)")  # fmt: skip
    get.add_argument("--state", default=None,
                     help="state file of the running local cluster (default: $MATRIXINFER_STATE "
                     "or ~/.matrixinfer/local.json)")  # fmt: skip
    get.add_argument("--namespace", "-n", default=None, help="only this namespace (default: all)")
    get.set_defaults(func=cmd_get)

    con = sub.add_parser("console", help="serve the console: REST API (OpenAPI) and web UI",
                         formatter_class=HelpFormatter)  # fmt: skip
    from console.main import add_arguments, run

    add_arguments(con)
    con.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(sig, _on_signal)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return int(args.func(args))
    except Stopped:
        return 0


if __name__ == "__main__":
    sys.exit(main())
