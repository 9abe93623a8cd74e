"""The local kubelet: runs the pods of the local cluster's API as local processes.

For each new pod it takes a loopback address of its own (127.0.0.10, 127.0.0.11, ... by default,
one where every port of the pod is free) and runs the pod as written, as far as it can run here:

- **volumes** become local directories (:func:`volume_dirs`): an ``emptyDir`` one per pod, a
  ``configMap`` one per pod holding the ConfigMap's keys as files (rewritten when the ConfigMap
  changes in the API), a ``persistentVolumeClaim`` the claim's directory (``<claims>/<claim>``
  when the configuration directory provides it, else one under the state directory, shared by
  the pods that mount the claim), a ``hostPath`` the path itself when it exists on this machine
  (the node is this machine), else one under the state directory. Each container sees its mounts
  through a directory of its own where every ``mountPath`` is a link to its volume; absolute paths
  in its ``args``, ``command`` and ``env`` that fall on (or above) a mount are rewritten into it
  (:func:`remap`), and URLs to ``127.0.0.1`` / ``localhost`` on one of the pod's ports go to the
  pod's address (in a pod the loopback is the pod's own; other loopback URLs reach this machine);
- **init containers** that are MatrixInfer programs (:data:`PROGRAMS`) run one after the other;
  the pod is Pending until they succeed (a failing one is restarted, below);
- the **engine** container runs its own ``command`` + ``args`` as written when its program can
  run here (:func:`engine_command`: a program of this install such as ``matrixinfer-sim``, a
  ``python -m`` module importable here, or a program on ``PATH``), with ``$(VAR)`` expanded
  from its ``env`` and every ``--host`` value set to the pod's address; else (``vllm`` or
  SGLang not installed, no command) it runs as the engine simulator (:func:`sim_command`). The
  pod's log says which. The other MatrixInfer containers (the ``runtime`` sidecar, the PD
  proxy) run beside it with their own arguments, listening on the pod's address. Containers
  whose program cannot run here are named in the pod's log, with why.

It writes the pod's status through the API as the kubelet would: ``podIP`` at once, phase
Pending while init containers run, Running when the containers start, the Ready condition once
every container's ``readinessProbe`` (``httpGet``) answers 200, or, with no probe at all, the
engine's ``GET /health``. A container (or init container) that exits is restarted in place as
the pod's ``restartPolicy`` says (``Always``, the default: always; ``OnFailure``: on a non-zero
exit code), after an exponential back-off (:func:`restart_delay`: 10 s doubling to 5 min, back
to 10 s after a run of 10 min): meanwhile it is ``waiting`` with reason ``CrashLoopBackOff``, its
``restartCount`` and ``lastState`` (the exit code) in the status, the pod not ready (``kubectl``
shows ``CrashLoopBackOff`` or ``Init:CrashLoopBackOff``). The first failure is said with its
last output line; the same failure again is said once more with its count only. With
``restartPolicy: Never`` the pod turns Failed (reason ``InitContainerFailed`` or ``Error``, the
message naming the container and its last output line), and the ModelInfer controller replaces
it. A deleted pod's processes are stopped (SIGTERM, then SIGKILL) and its directories removed.
Deleted pods are stopped each by a task of its own, so a slow exit holds up no other
pod's start, readiness or stop. Every process gets SIGTERM when the kubelet's thread ends.
Output of all of a pod's containers goes to ``<log dir>/pod-<namespace>-<name>.log``, each
start announced by a ``local kubelet:`` line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import importlib.util
import ipaddress
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from controllers.modelinfer.types import LABEL_ROLE
from matrixinfer.process import die_with_parent, port_is_free

__all__ = [
    "ENGINE_SCRIPTS",
    "PROGRAMS",
    "ContainerConfigError",
    "KeyRefs",
    "LocalCommand",
    "LocalKubelet",
    "PodPlan",
    "Run",
    "engine_command",
    "expand",
    "local_program",
    "plan_pod",
    "remap",
    "restart_delay",
    "should_restart",
    "sim_command",
    "volume_dirs",
]

log = logging.getLogger("matrixinfer.kubelet")

ENGINE_CONTAINER = "engine"  # the Model controller's name for it; else the first container
DEFAULT_PORT = 8000
# engine flags the kubelet sets itself, or reads (never passed through as they are)
_OWN = {"--host", "--port", "--model", "--model-path", "--served-model-name", "--pod-name"}
_LORA = {"--lora-modules", "--lora-paths"}


@dataclass(frozen=True, slots=True)
class LocalCommand:
    """How one pod's engine runs here: its command line, the port it serves, the model it
    serves; ``simulated``: it runs as the simulator (``ignored``: the engine arguments the
    simulator does not know, left out), else the container's own command as written; ``why``:
    the line the pod's log gets about that choice."""

    argv: list[str]
    port: int
    model: str
    ignored: list[str] = field(default_factory=list)
    simulated: bool = True
    why: str = ""


def _sim_options() -> set[str]:
    from sim.cli import serve_parser

    return {o for o in serve_parser()._option_string_actions if o.startswith("--")}


def engine_container(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    containers = list((pod.get("spec") or {}).get("containers") or ())
    for c in containers:
        if c.get("name") == ENGINE_CONTAINER:
            return dict(c)
    return dict(containers[0]) if containers else None


def _options(tokens: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--flag v1 v2 --other=v`` → [("--flag", ["v1", "v2"]), ("--other", ["v"])]; tokens
    before the first flag (the program and its positionals) come under the name ""."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for t in tokens:
        if t.startswith("--"):
            name, eq, value = t.partition("=")
            out.append((name, [value] if eq else []))
        else:
            out[-1][1].append(t)
    return out


def sim_command(
    pod: Mapping[str, Any],
    host: str,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> LocalCommand:
    """The simulator command line for ``pod`` on ``host``. Reads the engine container's
    ``command`` + ``args`` (``vllm serve MODEL ...`` or ``python3 -m sglang.launch_server
    --model-path MODEL ...``): ``--served-model-name`` (else the model) is the model the
    simulator serves, ``--port`` (else the container port, else 8000) its port, LoRA adapters
    (``--lora-modules`` / ``--lora-paths NAME=PATH``) are loaded, every other flag the
    simulator knows is passed on, the rest listed in ``ignored``; a pod of role ``prefill`` or
    ``decode`` (the ModelInfer controller's role label) runs that role. ``extra``: simulator flags
    for every pod (e.g. ``--time-scale``), given last."""
    meta = pod.get("metadata") or {}
    name = str(meta.get("name") or "")
    c = engine_container(pod) or {}
    tokens = [str(t) for t in [*(c.get("command") or ()), *(c.get("args") or ())]]
    engine = "sglang" if any("sglang" in t for t in tokens) else "vllm"
    options = _options(tokens)
    head = options[0][1]
    model = head[2] if len(head) > 2 and head[1] == "serve" else ""  # vllm serve MODEL
    served: list[str] = []
    ports = [p.get("containerPort") for p in c.get("ports") or () if p.get("containerPort")]
    port = int(ports[0]) if ports else DEFAULT_PORT
    lora: list[str] = []
    passed: list[str] = []
    ignored: list[str] = []
    known = _sim_options()
    for flag, values in options[1:]:
        if flag == "--served-model-name":
            served = values
        elif flag in ("--model", "--model-path") and values:
            model = values[0]
        elif flag == "--port" and values and values[0].isdigit():
            port = int(values[0])
        elif flag in _LORA:
            lora += values
        elif flag in _OWN or flag == "--enable-lora":
            continue
        elif flag in known:
            passed += [flag, *values]
        else:
            ignored += [flag, *values]
    served_name = served[0] if served else model or name
    argv = [
        python, "-m", "sim", "--model", served_name, "--engine", engine,
        "--host", host, "--port", str(port), "--pod-name", name,
    ]  # fmt: skip
    if len(served) > 1:
        argv += ["--served-model-name", *served]
    if lora:
        argv += ["--lora-modules", *lora]
    role = str((meta.get("labels") or {}).get(LABEL_ROLE) or "")
    if role in ("prefill", "decode"):  # a disaggregated backend's role pods
        argv += ["--role", role]
    return LocalCommand([*argv, *passed, *extra], port, served_name, ignored)


ENGINE_SCRIPTS: dict[str, str] = {"matrixinfer-sim": "sim"}
"""Engine programs of this install (console scripts) the kubelet runs as ``python -m <module>``
(beside :data:`PROGRAMS`)."""

_PYTHON = re.compile(r"^python(3(\.\d+)*)?$")
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def has_module(name: str) -> bool:
    """``name`` (dotted) can be run with ``python -m`` by this install."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def local_program(
    command: Sequence[str],
    python: str = sys.executable,
    which: Callable[[str], str | None] = shutil.which,
    module: Callable[[str], bool] = has_module,
) -> list[str] | str:
    """The command line that runs ``command`` on this machine, or why it cannot run here: a
    program of this install (:data:`ENGINE_SCRIPTS`, :data:`PROGRAMS`) runs as ``python -m
    <module>``; ``python``/``python3`` ``-m MODULE`` with this interpreter when ``MODULE`` is
    importable here; any other program as found on ``PATH`` (or at its absolute path)."""
    if not command:
        return "the container has no command (the image's entrypoint)"
    program = command[0].rsplit("/", 1)[-1]
    ours = ENGINE_SCRIPTS.get(program) or (PROGRAMS[program][0] if program in PROGRAMS else None)
    if ours is not None:
        return [python, "-m", ours, *command[1:]]
    if _PYTHON.match(program) and len(command) > 2 and command[1] == "-m":
        if module(command[2]):
            return [python, *command[1:]]
        return f"the Python module {command[2]} is not installed here"
    found = which(command[0])
    if found is None:
        return f"{command[0]} is not installed here"
    return [found, *command[1:]]


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` in a command or argument: the container's variable ``VAR``
    (left as written when it has none); ``$$`` is a literal ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


def _at_host(argv: Sequence[str], host: str) -> tuple[list[str], bool]:
    """``argv`` with every ``--host`` value the pod's ``host``; and whether it had one."""
    out: list[str] = []
    seen = False
    it = iter(argv)
    for token in it:
        if token == "--host":
            out += [token, host]
            next(it, None)
            seen = True
        elif token.startswith("--host="):
            out.append(f"--host={host}")
            seen = True
        else:
            out.append(token)
    return out, seen


def _flag(tokens: Sequence[str], *names: str) -> str | None:
    """The value of the first of ``names`` (``--flag v`` or ``--flag=v``) in ``tokens``."""
    for flag, values in _options(tokens)[1:]:
        if flag in names and values:
            return values[0]
    return None


def engine_command(
    pod: Mapping[str, Any],
    host: str,
    extra: Sequence[str] = (),
    python: str = sys.executable,
    *,
    env: Mapping[str, str] | None = None,
    fix: Callable[[str], str] = lambda v: v,
    which: Callable[[str], str | None] = shutil.which,
    module: Callable[[str], bool] = has_module,
) -> LocalCommand:
    """How the engine container of ``pod`` runs on ``host`` (the one place that decides): its
    own ``command`` + ``args`` as written when the program can run here
    (:func:`local_program`), else the simulator (:func:`sim_command`; ``extra``: its flags).

    As written means: ``$(VAR)`` expanded from the container's ``env`` (:func:`expand`), paths
    and loopback URLs through ``fix`` (:func:`remap`), every ``--host`` value replaced by the
    pod's address (a program without ``--host`` binds where it chooses); the port is the
    ``--port`` value, else the container's first port, else 8000."""
    c = engine_container(pod) or {}
    written = [str(t) for t in [*(c.get("command") or ()), *(c.get("args") or ())]]
    command = [str(t) for t in c.get("command") or ()]
    program = local_program(command, python, which, module)
    if isinstance(program, str):
        sim = sim_command(pod, host, extra, python)
        what = command[0] if command else "the engine"
        why = f"engine: {program}; {what} runs as the simulator"
        return LocalCommand(sim.argv, sim.port, sim.model, sim.ignored, True, why)
    argv = [fix(expand(t, env or {})) for t in [*program, *written[len(command) :]]]
    argv, has_host = _at_host(argv, host)
    ports = [p.get("containerPort") for p in c.get("ports") or () if p.get("containerPort")]
    port_text = _flag(argv, "--port")
    if port_text and port_text.isdigit():
        port = int(port_text)
    else:
        port = int(ports[0]) if ports else DEFAULT_PORT
    name = str((pod.get("metadata") or {}).get("name") or "")
    model = _flag(argv, "--served-model-name", "--model", "--model-path") or name
    why = f"engine: {command[0]} runs as written"
    if not has_host:
        why += " (no --host: it binds the address it chooses)"
    return LocalCommand(argv, port, model, [], False, why)


class Addresses:
    """Loopback addresses for pods: the lowest from ``first`` up that is not taken and whose
    ``port`` is free (another program may hold it); released when the pod's process is gone."""

    def __init__(self, first: str = "127.0.0.10") -> None:
        self.first = ipaddress.IPv4Address(first)
        if not self.first.is_loopback:
            raise ValueError(f"pod addresses must be in 127.0.0.0/8, got {first}")
        self.taken: set[str] = set()

    def take(self, port: int | Iterable[int]) -> str:
        ports = [port] if isinstance(port, int) else sorted(set(port))
        ip = self.first
        while ip.is_loopback:
            host = str(ip)
            last = int(ip) & 0xFF
            if (
                last not in (0, 255)
                and host not in self.taken
                and all(port_is_free(host, p) for p in ports)
            ):
                self.taken.add(host)
                return host
            ip += 1
        raise RuntimeError(f"no free loopback address from {self.first} for ports {ports}")

    def release(self, host: str) -> None:
        self.taken.discard(host)


# ---- how a pod runs here (pure: paths and command lines, no files, no processes) --------------

PROGRAMS: dict[str, tuple[str, bool]] = {
    "matrixinfer-downloader": ("runtime.downloader", False),
    "matrixinfer-runtime": ("runtime.sidecar", True),
    "matrixinfer-pd-proxy": ("runtime.pd_proxy", True),
}
"""The MatrixInfer programs the kubelet runs as ``python -m <module>``: program -> (module, it
serves HTTP, so it gets ``--host <pod address>``)."""

_UNSAFE = re.compile(r"[^\w.-]")
_LOOPBACK = re.compile(r"(?<=//)(?:127\.0\.0\.1|localhost):(\d+)(?=[/?#]|$)")


def _to_pod(value: str, host: str, ports: Collection[int]) -> str:
    """``http://127.0.0.1:PORT`` (or ``localhost``) with one of the pod's ``ports`` -> the pod's
    ``host``: inside a pod the loopback is the pod itself. Other loopback URLs are left alone:
    they reach this machine (a local S3 or Hub the user runs)."""

    def sub(m: re.Match[str]) -> str:
        return f"{host}:{m.group(1)}" if int(m.group(1)) in ports else m.group(0)

    return _LOOPBACK.sub(sub, value)


@dataclass(frozen=True, slots=True)
class Run:
    """One container as a local process: its command line, the environment it adds to the
    kubelet's, the ports it serves, its readiness URL (None: no probe) and notes for the pod's
    log (what of it cannot be honoured here)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ports: list[int]
    probe: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PodPlan:
    """A pod as local processes: the init containers in order, then the containers (the engine
    first); ``skipped``: the containers that cannot run here, each with why."""

    init: list[Run]
    containers: list[Run]
    engine: LocalCommand
    skipped: list[str]

    @property
    def ports(self) -> list[int]:
        return sorted({p for r in self.containers for p in r.ports})

    @property
    def probes(self) -> list[str]:
        """The readiness URLs (:func:`plan_pod` gives the engine ``/health`` when no container
        has a probe)."""
        return [r.probe for r in self.containers if r.probe is not None]


def volume_dirs(
    pod: Mapping[str, Any], pod_dir: Path, state_dir: Path, claims: Path | None = None
) -> dict[str, Path]:
    """Volume name -> the local directory that stands for it (see the module's docstring);
    ValueError names a volume of a kind the kubelet cannot provide."""
    out: dict[str, Path] = {}
    for v in (pod.get("spec") or {}).get("volumes") or ():
        name = str(v.get("name"))
        if "emptyDir" in v or "configMap" in v:
            out[name] = pod_dir / "volumes" / name
        elif "persistentVolumeClaim" in v:
            claim = str(v["persistentVolumeClaim"].get("claimName") or "")
            provided = claims / claim if claims is not None else None
            out[name] = (
                provided
                if provided is not None and provided.is_dir()
                else state_dir / "pvc" / claim
            )
        elif "hostPath" in v:
            path = str(v["hostPath"].get("path") or "/")
            here = Path(path)
            out[name] = here if here.exists() else state_dir / "hostpath" / path.lstrip("/")
        else:
            kinds = sorted(k for k in v if k != "name")
            raise ValueError(f"volume {name}: {', '.join(kinds) or 'no source'} is not supported")
    return out


def container_mounts(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, Path]:
    """mountPath -> the local directory (or file, with ``subPath``) of one container's mounts;
    ValueError names a mount of a volume the pod does not have."""
    out: dict[str, Path] = {}
    for m in container.get("volumeMounts") or ():
        name = str(m.get("name"))
        if name not in volumes:
            raise ValueError(f"container {container.get('name')}: no volume {name!r}")
        sub = str(m.get("subPath") or "").strip("/")
        out[str(m["mountPath"]).rstrip("/") or "/"] = volumes[name] / sub if sub else volumes[name]
    return out


def remap(
    value: str, mounts: Iterable[str], root: Path, host: str, ports: Collection[int] = ()
) -> str:
    """``value`` as a local process must see it: an absolute path on or above one of ``mounts``
    (mount paths, ``/`` excepted) moves under ``root`` (where each mount path links to its
    volume), also as the value of ``--flag=PATH``; a URL to ``127.0.0.1`` or ``localhost`` on
    one of the pod's ``ports`` goes to ``host``, the pod's address."""
    value = _to_pod(value, host, ports)
    flag, eq, rest = value.partition("=")
    if eq and flag.startswith("-"):
        return f"{flag}={remap(rest, mounts, root, host, ports)}"
    if not value.startswith("/") or value == "/":
        return value
    path = value.rstrip("/")
    for m in mounts:
        if m != "/" and (path == m or path.startswith(m + "/") or m.startswith(path + "/")):
            return str(root) + value
    return value


@dataclass(frozen=True, slots=True)
class KeyRefs:
    """What ``env[].valueFrom`` may read from the API, by (namespace, name): the ConfigMaps'
    ``data`` and the Secrets' ``data`` (decoded)."""

    config_maps: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)


class ContainerConfigError(LookupError):
    """A container's env names a Secret or ConfigMap (or a key of one) that does not exist and
    is not ``optional``: the container cannot be created (Kubernetes'
    ``CreateContainerConfigError``); the pod waits for it."""

    def __init__(self, container: str, message: str) -> None:
        super().__init__(f"container {container}: {message}")
        self.container = container
        self.reason = message


_KEY_REFS = (("secretKeyRef", "secret", "Secret"), ("configMapKeyRef", "configmap", "ConfigMap"))


def _key_ref(
    value_from: Mapping[str, Any], namespace: str, refs: KeyRefs
) -> tuple[str | None, str, bool] | None:
    """None when ``value_from`` is no key reference; else its value (None: missing), why it is
    missing as Kubernetes words it, and whether it is ``optional``."""
    for field_name, lower, kind in _KEY_REFS:
        ref = value_from.get(field_name)
        if not isinstance(ref, Mapping):
            continue
        name, key = str(ref.get("name") or ""), str(ref.get("key") or "")
        optional = bool(ref.get("optional"))
        data = (refs.secrets if lower == "secret" else refs.config_maps).get((namespace, name))
        if data is None:
            return None, f'{lower} "{name}" not found', optional
        if key not in data:
            return None, f"couldn't find key {key} in {kind} {namespace}/{name}", optional
        return data[key], "", optional
    return None


def _env(
    container: Mapping[str, Any],
    meta: Mapping[str, Any],
    host: str,
    fix: Callable[[str], str],
    refs: KeyRefs | None = None,
) -> tuple[dict[str, str], list[str]]:
    """The container's ``env`` (values remapped, the downward API's pod name, namespace and IP
    filled in, ``secretKeyRef`` / ``configMapKeyRef`` read from ``refs``) and notes for what
    cannot be resolved here. A key reference to a missing Secret, ConfigMap or key raises
    :class:`ContainerConfigError`, unless it is ``optional`` (then the variable is not set)."""
    namespace = str(meta.get("namespace") or "default")
    fields = {
        "metadata.name": str(meta.get("name") or ""),
        "metadata.namespace": str(meta.get("namespace") or ""),
        "status.podIP": host,
    }
    env: dict[str, str] = {}
    notes: list[str] = []
    for e in container.get("env") or ():
        name = str(e.get("name"))
        if "value" in e:
            env[name] = fix(str(e["value"]))
            continue
        value_from = e.get("valueFrom") or {}
        key_ref = _key_ref(value_from, namespace, refs or KeyRefs())
        if key_ref is not None:
            value, missing, optional = key_ref
            if value is not None:
                env[name] = value
            elif not optional:  # optional and missing: the variable is not set
                raise ContainerConfigError(str(container.get("name")), missing)
            continue
        ref = (value_from.get("fieldRef") or {}).get("fieldPath")
        if ref in fields:
            env[name] = fields[str(ref)]
        else:
            notes.append(f"env {name}: valueFrom {e.get('valueFrom')} is not available here")
    return env, notes


def _probe_url(container: Mapping[str, Any], host: str) -> str | None:
    get = (container.get("readinessProbe") or {}).get("httpGet")
    if not get:
        return None
    port = get.get("port")
    if isinstance(port, str) and not port.isdigit():
        named = [p.get("containerPort") for p in container.get("ports") or ()
                 if p.get("name") == port]  # fmt: skip
        port = named[0] if named else None
    if port is None:
        return None
    return f"http://{host}:{int(port)}{get.get('path') or '/'}"


def _program(
    container: Mapping[str, Any],
    meta: Mapping[str, Any],
    host: str,
    fs_root: Path,
    volumes: Mapping[str, Path],
    python: str,
    ports: Collection[int],
    refs: KeyRefs | None = None,
) -> Run | str:
    """A MatrixInfer container as a local process, or why it cannot run here
    (:class:`ContainerConfigError` for an env reference that cannot be resolved)."""
    name = str(container.get("name"))
    command = [str(t) for t in container.get("command") or ()]
    args = [str(t) for t in container.get("args") or ()]
    program = PROGRAMS.get(command[0].rsplit("/", 1)[-1]) if command else None
    if program is None:
        what = " ".join(command) or f"the image's entrypoint ({container.get('image')})"
        return f"container {name}: {what} is not a MatrixInfer program; it does not run locally"
    module, serves = program
    root = fs_root / name
    try:
        mounts = list(container_mounts(container, volumes))
    except ValueError as exc:
        return str(exc)

    def fix(value: str) -> str:
        return remap(value, mounts, root, host, ports)

    argv = [python, "-m", module, *(fix(t) for t in [*command[1:], *args])]
    if serves:
        argv += ["--host", host]
    env, notes = _env(container, meta, host, fix, refs)
    own = [int(p["containerPort"]) for p in container.get("ports") or () if p.get("containerPort")]
    return Run(name, argv, env, own, _probe_url(container, host), notes)


def plan_pod(
    pod: Mapping[str, Any],
    host: str,
    fs_root: Path,
    volumes: Mapping[str, Path],
    extra: Sequence[str] = (),
    python: str = sys.executable,
    hub: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
    refs: KeyRefs | None = None,
) -> PodPlan:
    """How ``pod`` runs here on ``host``: each container's mounts under ``fs_root/<container>``
    (``volumes``: :func:`volume_dirs`); the engine container as :func:`engine_command` decides
    (its own command where it can run here, else the simulator with ``extra``, its flags for
    every pod; ``which`` finds programs); the init containers and the other containers that
    are MatrixInfer programs with their own arguments (remapped, :func:`remap`). A downloader of an ``hf://``
    model is not run when no hub is set (``hub``; None: ``$HF_ENDPOINT``): nothing may download
    from the internet here, and the simulator needs no weights. Env key references read
    ``refs``; one that cannot be resolved raises :class:`ContainerConfigError`."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    engine_spec = engine_container(pod) or {}
    name = str(engine_spec.get("name") or ENGINE_CONTAINER)
    declared = {
        int(p["containerPort"])
        for c in spec.get("containers") or ()
        for p in c.get("ports") or ()
        if p.get("containerPort")
    }
    ports = declared | {sim_command(pod, host, extra, python).port}
    try:
        mounts = list(container_mounts(engine_spec, volumes))
    except ValueError:
        mounts = []

    def fix(value: str) -> str:
        return remap(value, mounts, fs_root / name, host, ports)

    env, notes = _env(engine_spec, meta, host, fix, refs)
    engine = engine_command(pod, host, extra, python, env=env, fix=fix, which=which)
    notes.insert(0, engine.why)
    if engine.ignored:
        notes.insert(1, f"engine flags the simulator ignores: {' '.join(engine.ignored)}")
    runs = [Run(name, engine.argv, env, [engine.port], _probe_url(engine_spec, host), notes)]
    skipped: list[str] = []
    init: list[Run] = []
    hub = os.environ.get("HF_ENDPOINT") if hub is None else hub
    for c in spec.get("initContainers") or ():
        if not hub and _fetches_from_the_hub(c):
            skipped.append(
                f"init container {c.get('name')}: not run: it fetches {c['args'][0]} and no hub "
                "is set (HF_ENDPOINT); the simulator needs no weights"
            )
            continue
        got = _program(c, meta, host, fs_root, volumes, python, ports, refs)
        (init.append(got) if isinstance(got, Run) else skipped.append(got))
    for c in spec.get("containers") or ():
        if c.get("name") == runs[0].name:
            continue
        got = _program(c, meta, host, fs_root, volumes, python, ports, refs)
        (runs.append(got) if isinstance(got, Run) else skipped.append(got))
    if not any(r.probe for r in runs):  # no readiness probe at all: the engine's /health
        health = f"http://{host}:{engine.port}/health"
        runs[0] = Run(name, engine.argv, env, [engine.port], health, notes)
    return PodPlan(init, runs, engine, skipped)


def _fetches_from_the_hub(container: Mapping[str, Any]) -> bool:
    """The Model's downloader init container for an ``hf://`` model."""
    command = [str(a) for a in container.get("command") or ()]
    args = [str(a) for a in container.get("args") or ()]
    return (
        bool(command)
        and command[-1].endswith("matrixinfer-downloader")
        and bool(args)
        and args[0].startswith("hf://")
    )


# ---- restarts ----------------------------------------------------------------------------------

RESTART_BACKOFF = 10.0  # seconds before the first restart of a failed container (Kubernetes')
MAX_RESTART_BACKOFF = 300.0  # the cap of the doubling
STOP_GRACE = 5.0  # seconds from SIGTERM to SIGKILL when a pod is deleted
_EXIT_POLL = 0.05  # seconds between two looks at a stopping process


def restart_delay(failures: int, base: float = RESTART_BACKOFF, cap: float = MAX_RESTART_BACKOFF
                  ) -> float:  # fmt: skip
    """Seconds to wait before restarting a container that has failed ``failures`` times in a
    row (1: the first failure): ``base`` doubling each time, at most ``cap``."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    return min(cap, base * float(2 ** min(failures - 1, 62)))


def should_restart(policy: str, exit_code: int) -> bool:
    """Whether a container that exited with ``exit_code`` is restarted under the pod's
    ``restartPolicy`` (``Always``, the default; ``OnFailure``; ``Never``)."""
    if policy == "Never":
        return False
    return policy != "OnFailure" or exit_code != 0


@dataclass
class Crash:
    """A container waiting to be restarted, and what the kubelet knows of its failures."""

    exit_code: int
    message: str  # what the failure said (the last output line)
    failures: int  # in a row (the back-off's exponent; reset after a long enough run)
    delay: float
    until: float  # when it restarts (kubelet clock)


# ---- the kubelet: files and processes ---------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def config_map_files(volume: Mapping[str, Any], data: Mapping[str, str]) -> dict[str, str]:
    """The files of a ``configMap`` volume: every key of ``data``, or its ``items`` (key ->
    path); KeyError names an item's key the ConfigMap does not have."""
    items = (volume.get("configMap") or {}).get("items")
    if not items:
        return {str(k): str(v) for k, v in data.items()}
    out: dict[str, str] = {}
    for item in items:
        key = str(item.get("key"))
        if key not in data:
            raise KeyError(f"key {key!r}")
        out[str(item.get("path") or key)] = str(data[key])
    return out


def _write_files(directory: Path, files: Mapping[str, str]) -> None:
    """``directory`` holds exactly ``files`` (each replaced atomically, so a reader never sees
    half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    for old in directory.iterdir():
        if old.is_file() and old.name not in files and not old.name.startswith("."):
            old.unlink()


def _link_mounts(root: Path, mounts: Mapping[str, Path]) -> None:
    """Under ``root``, each mount path a link to its local directory."""
    for mount_path, target in mounts.items():
        target.mkdir(parents=True, exist_ok=True)
        link = root / mount_path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)


@dataclass
class LocalPod:
    """One pod's processes: the init container running (one at a time), then the containers."""

    namespace: str
    name: str
    uid: str
    host: str
    port: int  # the engine's
    plan: PodPlan
    directory: Path  # its emptyDir and configMap volumes, its containers' mount links
    volumes: dict[str, Path]  # volume -> its local directory
    config_maps: dict[str, tuple[str, Mapping[str, Any]]]  # volume -> (ConfigMap name, volume)
    log_path: Path
    started: float  # time.monotonic() the pod's first process started
    running_since: float = 0.0  # ... and its containers (after the init containers)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)  # container -> its output's start
    init_done: int = 0  # init containers that succeeded
    init_proc: subprocess.Popen[bytes] | None = None
    init_offset: int = 0  # where the running init container's output starts in the log
    written: dict[str, dict[str, str]] = field(default_factory=dict)  # volume -> files
    exit_codes: dict[str, int] = field(default_factory=dict)
    message: str = ""
    ready: bool = False
    failed: bool = False
    restart_policy: str = "Always"
    crashed: dict[str, Crash] = field(default_factory=dict)  # container -> waiting to restart
    failures: dict[str, int] = field(default_factory=dict)  # container -> failures in a row
    restarts: dict[str, int] = field(default_factory=dict)  # container -> restartCount
    last_failure: dict[str, str] = field(default_factory=dict)  # container -> what it last said
    since: dict[str, float] = field(default_factory=dict)  # container -> its process's start

    def all_procs(self) -> list[subprocess.Popen[bytes]]:
        return [*([self.init_proc] if self.init_proc else []), *self.procs.values()]


Event = Callable[[str], None]


def _spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str], header: Sequence[str]
) -> tuple[subprocess.Popen[bytes], int]:
    """Start one container's process (own session, output appended to ``log_path`` after the
    ``header`` lines); it gets SIGTERM when the thread that started it ends. Returns it and where
    its output starts in the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write("".join(f"local kubelet: {line}\n" for line in header).encode())
        out.flush()
        offset = out.tell()
        return subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
            preexec_fn=die_with_parent(os.getpid(), any_thread=True),
        ), offset  # fmt: skip


def _config_error_status(spec: Mapping[str, Any], exc: ContainerConfigError) -> dict[str, Any]:
    """A pod's status while a container's env cannot be resolved: Pending, that container
    waiting with ``CreateContainerConfigError`` and the message naming what is missing."""

    def state(name: str) -> dict[str, Any]:
        if name == exc.container:
            return {"waiting": {"reason": "CreateContainerConfigError", "message": exc.reason}}
        return {"waiting": {"reason": "PodInitializing"}}

    out: dict[str, Any] = {"phase": "Pending"}
    for field_name, containers in (("initContainerStatuses", spec.get("initContainers")),
                                   ("containerStatuses", spec.get("containers"))):  # fmt: skip
        if containers:
            out[field_name] = [
                {"name": str(c.get("name")), "ready": False, "restartCount": 0,
                 "state": state(str(c.get("name")))}
                for c in containers
            ]  # fmt: skip
    return out


def _same_failure(before: str, now: str) -> bool:
    """Whether two failure messages say the same but for numbers (times, pids, ports)."""
    return _DIGITS.sub("#", before) == _DIGITS.sub("#", now)


_DIGITS = re.compile(r"\d+")


def _exit_code(proc: subprocess.Popen[bytes]) -> int | None:
    """The process's exit code as a container's (killed by signal N: 128 + N), None while it
    runs."""
    code = proc.poll()
    return None if code is None else (128 - code if code < 0 else code)


def _last_line(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class LocalKubelet:
    """Runs the pods of the API at ``url`` (read from ``objects``: the emulator's store, in this
    process) as local processes. ``config_maps`` and ``secrets`` list the API's ConfigMaps (for
    ``configMap`` volumes and ``configMapKeyRef`` env) and Secrets (``secretKeyRef`` env);
    ``state_dir`` holds the pods' volumes (default ``<log_dir>/state``); ``claims``:
    a directory whose subdirectories provide PersistentVolumeClaims of their name. Runs in the
    local cluster's event loop; ``say`` receives a line per pod transition (started, ready,
    exited, stopped). A failed container restarts after :func:`restart_delay` with
    ``restart_backoff`` / ``max_restart_backoff`` on ``clock``."""

    def __init__(
        self,
        url: str,
        objects: Callable[[], list[dict[str, Any]]],
        log_dir: Path,
        *,
        config_maps: Callable[[], list[dict[str, Any]]] = list,
        secrets: Callable[[], list[dict[str, Any]]] = list,
        state_dir: Path | None = None,
        claims: Path | None = None,
        first_host: str = "127.0.0.10",
        sim_args: Sequence[str] = (),
        interval: float = 0.1,
        say: Event | None = None,
        restart_backoff: float = RESTART_BACKOFF,
        max_restart_backoff: float = MAX_RESTART_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self.url = url.rstrip("/")
        self.objects = objects
        self.config_maps = config_maps
        self.secrets = secrets
        self.log_dir = log_dir
        self.state_dir = (state_dir if state_dir is not None else log_dir / "state").resolve()
        self.claims = claims.resolve() if claims is not None else None
        self.addresses = Addresses(first_host)
        self.sim_args = list(sim_args)
        self.interval = interval
        self.say = say or (lambda line: log.info("%s", line))
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.clock = clock
        self.stop_grace = stop_grace
        self.pods: dict[tuple[str, str, str], LocalPod] = {}
        # deleted pods whose processes are being stopped (each by a task of its own)
        self.stopping: dict[tuple[str, str, str], LocalPod] = {}
        self._stop_tasks: set[asyncio.Task[None]] = set()
        self.waiting: dict[tuple[str, str, str], str] = {}  # pod -> why it cannot start yet
        self.startup: dict[str, float] = {}  # pod -> seconds from its containers' start to Ready
        self.started: dict[str, float] = {}  # pod -> time.monotonic() its first process started
        self.ready_at: dict[str, float] = {}  # pod -> time.monotonic() it turned Ready
        self.session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            while True:
                try:
                    await self.sync()
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    log.warning("local kubelet: %s; trying again", exc)
                await asyncio.sleep(self.interval)
        finally:
            for task in self._stop_tasks:
                task.cancel()
            self.stop_all()
            await self.session.close()

    def _config_map_index(self) -> dict[tuple[str, str], Mapping[str, str]]:
        out: dict[tuple[str, str], Mapping[str, str]] = {}
        for cm in self.config_maps():
            meta = cm.get("metadata") or {}
            if not meta.get("deletionTimestamp"):
                out[(str(meta.get("namespace")), str(meta.get("name")))] = cm.get("data") or {}
        return out

    def _secret_index(self) -> dict[tuple[str, str], Mapping[str, str]]:
        """The Secrets' ``data``, decoded (a value that is not base64 is left out, so a
        reference to it says the key is missing), plus ``stringData`` as written."""
        out: dict[tuple[str, str], Mapping[str, str]] = {}
        for secret in self.secrets():
            meta = secret.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                continue
            data: dict[str, str] = {}
            for k, v in (secret.get("data") or {}).items():
                with contextlib.suppress(ValueError, TypeError):
                    data[str(k)] = base64.b64decode(str(v), validate=True).decode()
            data.update({str(k): str(v) for k, v in (secret.get("stringData") or {}).items()})
            out[(str(meta.get("namespace")), str(meta.get("name")))] = data
        return out

    async def sync(self) -> None:
        """One pass: start new pods, advance init containers, refresh configMap volumes, report
        readiness and exits, stop deleted pods."""
        live: set[tuple[str, str, str]] = set()
        maps = self._config_map_index()
        for pod in self.objects():
            meta = pod.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid")))
            if meta.get("deletionTimestamp"):
                continue
            live.add(key)
            if key not in self.pods:
                if key in self.waiting or not (pod.get("status") or {}).get("phase"):
                    await self._start(key, pod, maps)
                continue
            local = self.pods[key]
            self._refresh(local, maps)
            await self._check(local)
        for key in [k for k in self.waiting if k not in live]:
            del self.waiting[key]
        for key in [k for k in self.pods if k not in live]:  # stopped beside the next passes
            self.stopping[key] = local = self.pods.pop(key)
            task = asyncio.create_task(self._remove(key, local), name=f"stop pod {local.name}")
            self._stop_tasks.add(task)
            task.add_done_callback(self._stop_tasks.discard)

    async def _remove(self, key: tuple[str, str, str], local: LocalPod) -> None:
        """Stop a deleted pod's processes and remove its directories. Runs as a task of its
        own, so that a pod slow to exit (up to :attr:`stop_grace`) holds up neither the other
        pods' stops nor the passes that start pods and report readiness."""
        try:
            await self._stop(local, self.stop_grace)
            shutil.rmtree(local.directory, ignore_errors=True)
            self.say(f"pod {local.name}: deleted, process stopped")
        finally:
            self.stopping.pop(key, None)

    @staticmethod
    def _files(
        namespace: str,
        maps: Mapping[tuple[str, str], Mapping[str, str]],
        cm: tuple[str, Mapping[str, Any]],
    ) -> dict[str, str]:
        """A configMap volume's files; LookupError says what is missing."""
        name, volume = cm
        data = maps.get((namespace, name))
        if data is None:
            raise LookupError(f"ConfigMap {namespace}/{name} not found")
        try:
            return config_map_files(volume, data)
        except KeyError as exc:
            raise LookupError(f"ConfigMap {namespace}/{name}: no {exc.args[0]}") from exc

    async def _start(
        self,
        key: tuple[str, str, str],
        pod: Mapping[str, Any],
        maps: Mapping[tuple[str, str], Mapping[str, str]],
    ) -> None:
        ns, name, uid = key
        spec = pod.get("spec") or {}
        directory = self.state_dir / "pods" / _UNSAFE.sub("_", uid)  # the kubelet's layout
        log_path = self.log_dir / f"pod-{ns}-{name}.log"
        config_maps = {
            str(v.get("name")): (str(v["configMap"].get("name")), v)
            for v in spec.get("volumes") or ()
            if "configMap" in v
        }
        try:
            volumes = volume_dirs(pod, directory, self.state_dir, self.claims)
            files = {v: self._files(ns, maps, cm) for v, cm in config_maps.items()}
        except ValueError as exc:
            await self._patch(ns, name, {"phase": "Failed", "reason": "VolumeError",
                                         "message": str(exc)})  # fmt: skip
            self.say(f"pod {name}: cannot run here: {exc}; pod Failed")
            return
        except LookupError as exc:  # as the kubelet does: the pod waits for its volumes
            if self.waiting.get(key) != str(exc):
                self.waiting[key] = str(exc)
                self.say(f"pod {name}: waiting: {exc}")
            return
        fs_root = directory / "fs"
        refs = KeyRefs(maps, self._secret_index())
        try:
            ports = plan_pod(pod, "127.0.0.1", fs_root, volumes, refs=refs).ports
        except ContainerConfigError as exc:  # the pod waits for the Secret or ConfigMap
            if self.waiting.get(key) != str(exc):
                self.waiting[key] = str(exc)
                await self._patch(ns, name, _config_error_status(spec, exc))
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with log_path.open("a") as out:
                    out.write(f"local kubelet: Error: CreateContainerConfigError: {exc}\n")
                self.say(f"pod {name}: CreateContainerConfigError: {exc}")
            return
        self.waiting.pop(key, None)
        host = self.addresses.take(ports)
        plan = plan_pod(pod, host, fs_root, volumes, self.sim_args, refs=refs)
        for c in [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]:
            with contextlib.suppress(ValueError):
                _link_mounts(fs_root / str(c.get("name")), container_mounts(c, volumes))
        for volume, text in files.items():
            _write_files(volumes[volume], text)
        local = LocalPod(
            ns, name, uid, host, plan.engine.port, plan, directory, volumes, config_maps,
            log_path, time.monotonic(), written=files,
            restart_policy=str(spec.get("restartPolicy") or "Always"),
        )  # fmt: skip
        self.pods[key] = local
        self.started.setdefault(name, local.started)
        if plan.skipped:
            with log_path.open("a") as out:
                out.write("".join(f"local kubelet: {s}\n" for s in plan.skipped))
        if plan.init:
            self._start_init(local)
            await self._status(local)
            self.say(f"pod {name}: init container {plan.init[0].name} started at {host}")
        else:
            await self._start_containers(local)

    def _env(self, local: LocalPod, run: Run) -> dict[str, str]:
        base = {"POD_NAME": local.name, "POD_NAMESPACE": local.namespace, "PYTHONUNBUFFERED": "1"}
        return {**os.environ, **base, **run.env}

    def _header(self, local: LocalPod, run: Run, what: str) -> list[str]:
        count = local.restarts.get(run.name, 0)
        again = f" (restart {count})" if count else ""
        return [*run.notes, f"{what} {run.name}{again}: {' '.join(run.argv)}"]

    def _start_init(self, local: LocalPod) -> None:
        run = local.plan.init[local.init_done]
        local.init_proc, local.init_offset = _spawn(
            run.argv, local.log_path, self._env(local, run),
            self._header(local, run, "init container"),
        )  # fmt: skip
        local.since[run.name] = self.clock()

    def _start_container(self, local: LocalPod, run: Run) -> None:
        local.procs[run.name], local.offsets[run.name] = _spawn(
            run.argv, local.log_path, self._env(local, run), self._header(local, run, "container")
        )
        local.since[run.name] = self.clock()

    async def _start_containers(self, local: LocalPod) -> None:
        local.running_since = time.monotonic()
        for run in local.plan.containers:
            self._start_container(local, run)
        await self._status(local)
        self.say(
            f"pod {local.name}: started {local.plan.engine.model} at {local.host}:{local.port}"
        )

    def _refresh(self, local: LocalPod, maps: Mapping[tuple[str, str], Mapping[str, str]]) -> None:
        """Rewrite the configMap volumes whose ConfigMap changed (a deleted one keeps its last
        files, as the kubelet keeps them)."""
        if local.failed:
            return
        for volume, cm in local.config_maps.items():
            try:
                files = self._files(local.namespace, maps, cm)
            except LookupError:
                continue
            if files != local.written.get(volume):
                _write_files(local.volumes[volume], files)
                local.written[volume] = files
                log.info("pod %s: volume %s updated from ConfigMap %s", local.name, volume, cm[0])

    async def _check(self, local: LocalPod) -> None:
        if local.failed:
            return
        if local.crashed:
            await self._restart_due(local)
        if local.init_proc is not None:
            code = _exit_code(local.init_proc)
            if code is None:
                return
            run = local.plan.init[local.init_done]
            local.init_proc = None
            if code != 0:
                local.exit_codes[run.name] = code
                why = _last_line(local.log_path, local.init_offset) or "no output"
                message = f"init container {run.name} exited with code {code}: {why}"
                await self._exited(local, run.name, code, message, "InitContainerFailed")
                return
            local.exit_codes.pop(run.name, None)
            local.failures.pop(run.name, None)
            local.init_done += 1
            if local.init_done < len(local.plan.init):
                self._start_init(local)
                await self._status(local)
            else:
                await self._start_containers(local)
            return
        for cname, proc in list(local.procs.items()):
            code = _exit_code(proc)
            if code is not None:
                del local.procs[cname]
                local.exit_codes[cname] = code
                why = _last_line(local.log_path, local.offsets.get(cname, 0)) or "no output"
                message = f"container {cname} exited with code {code}: {why}"
                await self._exited(local, cname, code, message, "Error")
                if local.failed:
                    return
        if local.crashed or local.init_done < len(local.plan.init):
            return
        if not local.ready and await self._ready(local):
            local.ready = True
            await self._status(local)
            took = time.monotonic() - local.running_since
            self.startup[local.name] = took
            self.ready_at.setdefault(local.name, time.monotonic())
            self.say(f"pod {local.name}: ready ({took:.1f}s)")

    async def _exited(
        self, local: LocalPod, container: str, code: int, message: str, reason: str
    ) -> None:
        """A container (or init container) exited: restart it after the back-off as the pod's
        ``restartPolicy`` says (saying a repeated failure once, with its count), else fail the
        pod."""
        if not should_restart(local.restart_policy, code):
            local.message = message
            await self._fail(local, reason)
            self.say(f"pod {local.name}: {message}; pod Failed")
            return
        now = self.clock()
        ran = now - local.since.get(container, now)
        # a run of twice the cap without failing starts the back-off over (as the kubelet's)
        long_run = ran >= 2 * self.max_restart_backoff
        failures = 1 if long_run else local.failures.get(container, 0) + 1
        local.failures[container] = failures
        delay = restart_delay(failures, self.restart_backoff, self.max_restart_backoff)
        local.crashed[container] = Crash(code, message, failures, delay, now + delay)
        local.message = message
        last = local.last_failure.get(container)
        repeated = last is not None and _same_failure(last, message)
        local.last_failure[container] = message
        was_ready, local.ready = local.ready, False
        await self._status(local)
        count = local.restarts.get(container, 0) + 1
        wait = f"restarting in {delay:g}s (CrashLoopBackOff, restart {count})"
        if repeated:
            self.say(f"pod {local.name}: {container} failed again the same way "
                     f"({failures} times in a row); {wait}")  # fmt: skip
        else:
            self.say(f"pod {local.name}: {message}; {wait}")
        if was_ready:
            self.say(f"pod {local.name}: not ready")

    async def _restart_due(self, local: LocalPod) -> None:
        """Restart the crashed containers whose back-off is over."""
        now = self.clock()
        for container, crash in list(local.crashed.items()):
            if now < crash.until:
                continue
            del local.crashed[container]
            local.restarts[container] = local.restarts.get(container, 0) + 1
            if local.init_done < len(local.plan.init):
                self._start_init(local)
            else:
                run = next(r for r in local.plan.containers if r.name == container)
                self._start_container(local, run)
            await self._status(local)

    async def _fail(self, local: LocalPod, reason: str) -> None:
        local.failed = True
        local.ready = False
        await self._stop(local)
        await self._status(local, reason)

    async def _ready(self, local: LocalPod) -> bool:
        assert self.session is not None
        for url in local.plan.probes:
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                    if r.status != 200:
                        return False
            except (aiohttp.ClientError, TimeoutError, OSError):
                return False
        return True

    def _container_state(
        self, local: LocalPod, name: str, init: bool, index: int
    ) -> dict[str, Any]:
        crash = local.crashed.get(name)
        if crash is not None:
            message = (f"back-off {crash.delay:g}s restarting failed container={name} "
                       f"pod={local.name}_{local.namespace}({local.uid})")  # fmt: skip
            return {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        if init and index < local.init_done:
            return {"terminated": {"exitCode": 0, "reason": "Completed"}}
        code = local.exit_codes.get(name)
        if code is not None and local.failed:
            reason = "Completed" if code == 0 else "Error"
            return {"terminated": {"exitCode": code, "reason": reason, "finishedAt": _now()}}
        running = (
            (local.init_proc is not None and index == local.init_done)
            if init
            else (name in local.procs)
        )
        if running and not local.failed:
            return {"running": {"startedAt": _now()}}
        return {"waiting": {"reason": "PodInitializing"}}

    def _container_status(
        self, local: LocalPod, run: Run, init: bool, index: int
    ) -> dict[str, Any]:
        ready = index < local.init_done if init else local.ready and run.name not in local.crashed
        out: dict[str, Any] = {
            "name": run.name,
            "ready": ready,
            "restartCount": local.restarts.get(run.name, 0),
            "state": self._container_state(local, run.name, init, index),
        }
        code = local.exit_codes.get(run.name)
        if code is not None and not local.failed:  # the run before this one
            reason = "Completed" if code == 0 else "Error"
            last = {"exitCode": code, "reason": reason}
            if run.name in local.last_failure:  # its last output line, as a termination message
                last["message"] = local.last_failure[run.name]
            out["lastState"] = {"terminated": last}
        return out

    def _pod_status(self, local: LocalPod, reason: str | None = None) -> dict[str, Any]:
        plan = local.plan
        if local.failed:
            phase = "Failed"
        elif local.running_since:
            phase = "Running"
        else:
            phase = "Pending"
        initialized = local.init_done >= len(plan.init)
        status: dict[str, Any] = {
            "phase": phase,
            "podIP": local.host,
            "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "Initialized", "status": "True" if initialized else "False"},
                {"type": "Ready", "status": "True" if local.ready else "False",
                 "lastTransitionTime": _now()},
            ],
            "containerStatuses": [
                self._container_status(local, r, False, i) for i, r in enumerate(plan.containers)
            ],
        }  # fmt: skip
        if plan.init:
            status["initContainerStatuses"] = [
                self._container_status(local, r, True, i) for i, r in enumerate(plan.init)
            ]
        if reason is not None:
            status["reason"] = reason
            status["message"] = local.message
        return status

    async def _status(self, local: LocalPod, reason: str | None = None) -> None:
        await self._patch(local.namespace, local.name, self._pod_status(local, reason))

    async def _patch(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        assert self.session is not None
        path = f"{self.url}/api/v1/namespaces/{namespace}/pods/{name}/status"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(path, json={"status": status}, headers=headers) as r:
            if r.status >= 400 and r.status != 404:  # 404: deleted meanwhile
                raise aiohttp.ClientError(f"PATCH pod {name} status: HTTP {r.status}")

    async def _stop(self, local: LocalPod, grace: float = STOP_GRACE) -> None:
        """SIGTERM to every process of the pod, then SIGKILL after ``grace`` seconds; waits
        without blocking the loop (the API server shares it) and without a thread per
        process (many pods stop at once on a scale-down)."""
        procs = local.all_procs()
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            if not await _exited(proc, deadline):
                _signal(proc, signal.SIGKILL)
                await _exited(proc, math.inf)
        self.addresses.release(local.host)

    def stop_all(self, grace: float = STOP_GRACE) -> None:
        """Every process (of the pods being stopped too): SIGTERM to all, then SIGKILL to those
        still running after ``grace``."""
        locals_ = [*self.pods.values(), *self.stopping.values()]
        procs = [p for local in locals_ for p in local.all_procs()]
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        self.pods.clear()
        self.stopping.clear()


async def _exited(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether ``proc`` exits by ``deadline`` (time.monotonic()), looking every
    :data:`_EXIT_POLL` seconds (no thread per process)."""
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_EXIT_POLL)
    return True


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """``sig`` to the process's group (its own session), if it still runs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
