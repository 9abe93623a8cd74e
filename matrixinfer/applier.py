"""Apply a configuration directory to the local cluster's API, as ``kubectl apply`` would.

Every ``*.yaml`` / ``*.yml`` file is read (again whenever a file's name, size or mtime changes);
ConfigMaps and Secrets (what pods' volumes and env references read) are applied as they are (a
Secret's ``stringData`` written into its base64 ``data``, as the API server does); each document
of the five MatrixInfer kinds goes through the admission rules the webhooks run
(``controllers.webhooks.rules``: the ModelServer defaulting, then the same pydantic validation
and the cross-object checks against what the API holds), so a bad file gets the message the
webhook would give. The directory is applied as a whole: one denied document and nothing of that
read is applied, the last good state stays, and the next change of the files is tried again.
Applied, an object is created, patched (spec, or a ConfigMap's or Secret's data, labels,
annotations; ``generation`` bumped when the spec changed) or deleted when its document left the
directory. Objects the controllers made are never touched.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from controllers.model.planner import merge_diff
from controllers.webhooks import rules
from controllers.webhooks.handlers import KINDS, VERSION
from crds import ModelInfer

__all__ = [
    "CORE_KINDS",
    "Applier",
    "ApplyResult",
    "Document",
    "admit",
    "core_object",
    "read_directory",
]

log = logging.getLogger("matrixinfer.applier")

DEFAULT_NAMESPACE = "default"
CORE_KINDS: dict[str, str] = {"ConfigMap": "configmaps", "Secret": "secrets"}  # kind -> plural
"""Built-in kinds the directory may hold (no admission rules of ours; API group ``v1``)."""
_CONTENT: dict[str, tuple[str, ...]] = {"ConfigMap": ("data", "binaryData"),
                                        "Secret": ("data", "type")}  # fmt: skip
Key = tuple[str, str, str]  # kind, namespace, name


class DirectoryError(ValueError):
    """A file that cannot be read as YAML documents of known kinds."""


@dataclass(frozen=True, slots=True)
class Document:
    """One object from the directory, where it came from, and its key."""

    raw: dict[str, Any]
    source: str  # file name and document index

    @property
    def kind(self) -> str:
        return str(self.raw.get("kind"))

    @property
    def key(self) -> Key:
        meta = self.raw.get("metadata") or {}
        return (self.kind, str(meta.get("namespace") or DEFAULT_NAMESPACE), str(meta.get("name")))


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        with _suppress_missing():
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, FileNotFoundError)


def read_directory(directory: Path) -> tuple[list[Document], list[str]]:
    """The MatrixInfer documents of every YAML file, and notes on documents of other kinds
    (skipped). Raises :class:`DirectoryError` naming the file for YAML that does not parse or a
    document without kind/metadata.name."""
    docs: list[Document] = []
    notes: list[str] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except (yaml.YAMLError, OSError) as exc:
            raise DirectoryError(f"{path.name}: not valid YAML: {exc}") from None
        for i, raw in enumerate(loaded):
            if raw is None:
                continue
            where = f"{path.name} (document {i + 1})"
            if not isinstance(raw, dict) or not isinstance(raw.get("metadata"), dict):
                raise DirectoryError(f"{where}: not a Kubernetes object (no metadata)")
            if not raw["metadata"].get("name"):
                raise DirectoryError(f"{where}: metadata.name is missing")
            if raw.get("kind") not in KINDS and raw.get("kind") not in CORE_KINDS:
                notes.append(f"{where}: kind {raw.get('kind')!r} is not a kind of the cluster")
                continue
            docs.append(Document(raw, where))
    return docs, notes


# --------------------------------------------------------------------------------------------
# admission: the webhooks' rules over the objects the API would hold


def _ns(raw: Mapping[str, Any]) -> str:
    return str((raw.get("metadata") or {}).get("namespace") or DEFAULT_NAMESPACE)


def _name(raw: Mapping[str, Any]) -> str:
    return str((raw.get("metadata") or {}).get("name"))


def admit(
    raw: dict[str, Any], stored: Mapping[Key, Mapping[str, Any]]
) -> tuple[rules.Review, dict[str, Any]]:
    """The webhooks' verdict on ``raw`` (create or update) given the ``stored`` objects (the
    API's, with the directory's other documents in place), and the object as defaulted. A
    ConfigMap or Secret is allowed as it is (:func:`core_object`)."""
    if raw.get("kind") in CORE_KINDS:
        return rules.Review(), core_object(raw)
    doc = dict(raw)
    for path, value in rules.defaults(doc):  # the mutating webhook runs first
        target: dict[str, Any] = doc
        for part in path[:-1]:
            target[part] = dict(target.get(part) or {})
            target = target[part]
        target[path[-1]] = value
    obj = rules.parse(doc)
    if isinstance(obj, rules.Review):
        return obj, doc
    kind, ns = str(doc["kind"]), _ns(doc)

    def of(k: str, namespace: str | None = None) -> Iterable[Mapping[str, Any]]:
        return (
            o
            for (kk, n, _), o in stored.items()
            if kk == k and (namespace is None or n == namespace)
        )

    if kind == "ModelRoute":
        held = rules.held_names((), of("ModelRoute"))
        servers = [_name(o) for o in of("ModelServer", ns)]
        return rules.check_model_route(obj, held.claims, servers), doc  # type: ignore[arg-type]
    if kind == "Model":
        held = rules.held_names(of("Model"), of("ModelRoute"))
        return rules.check_model(obj, held.adapters, held.claims), doc  # type: ignore[arg-type]
    if kind == "ModelServer":
        return rules.check_model_server(obj), doc  # type: ignore[arg-type]
    if kind == "ModelInfer":
        old_raw = stored.get((kind, ns, _name(doc)))
        before = rules.parse(old_raw) if old_raw is not None else None
        live = int(((old_raw or {}).get("status") or {}).get("replicas") or 0)
        old = before if isinstance(before, ModelInfer) else None
        return rules.check_model_infer(obj, old, live), doc  # type: ignore[arg-type]
    infers = [_name(o) for o in of("ModelInfer", ns)]
    return rules.check_autoscaling_policy(obj, infers), doc  # type: ignore[arg-type]


def core_object(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A ConfigMap or Secret as the API server stores it: a Secret's ``stringData`` moves into
    its ``data``, base64-encoded (over a ``data`` key of the same name)."""
    doc = dict(raw)
    if doc.get("kind") == "Secret" and doc.get("stringData"):
        data = {str(k): str(v) for k, v in (doc.get("data") or {}).items()}
        for k, v in dict(doc.pop("stringData")).items():
            data[str(k)] = base64.b64encode(str(v).encode()).decode()
        doc["data"] = data
    return doc


# --------------------------------------------------------------------------------------------
# applying


@dataclass
class ApplyResult:
    """What one read of the directory did."""

    created: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the denial or read error; nothing was applied

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"configuration rejected, the last good one stays in force:\n{self.error}"]
        out = [f"skipped: {n}" for n in self.notes]
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"created {x}" for x in self.created]
        out += [f"configured {x}" for x in self.patched]
        out += [f"deleted {x}" for x in self.deleted]
        return out


def path_of(kind: str, namespace: str, name: str | None = None) -> str:
    if kind in CORE_KINDS:
        base = f"/api/v1/namespaces/{namespace}/{CORE_KINDS[kind]}"
    else:
        group, plural = KINDS[kind]
        base = f"/apis/{group}/{VERSION}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


def describe(key: Key) -> str:
    kind, ns, name = key
    return f"{kind} {ns}/{name}"


class Applier:
    """Keeps the API at ``url`` in step with ``directory`` (see the module's text).

    ``stored()``: the API's objects of the five kinds by key (read in process); ``next_version()``:
    a new resourceVersion, as the API server would set (the emulator leaves that to writers)."""

    def __init__(
        self,
        directory: Path,
        url: str,
        stored: Callable[[], dict[Key, dict[str, Any]]],
        next_version: Callable[[], str],
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.url = url.rstrip("/")
        self.stored = stored
        self.next_version = next_version
        self.say = say or (lambda line: log.info("%s", line))
        self.applied: dict[Key, dict[str, Any]] = {}  # what the directory said, last applied
        self.fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self.rejected = 0
        self.last: ApplyResult | None = None
        self.first_applied: float | None = None  # time.monotonic() of the first creation

    def changed(self) -> bool:
        return _fingerprint(self.directory) != self.fingerprint

    async def apply(self, session: aiohttp.ClientSession) -> ApplyResult:
        """Read the directory and apply it (or reject it whole); the lines go to ``say``."""
        self.fingerprint = _fingerprint(self.directory)
        result = ApplyResult()
        try:
            docs, result.notes = read_directory(self.directory)
            wanted = self._admit(docs, result)
        except DirectoryError as exc:
            result.error = f"  {exc}"
        if result.error is not None:
            self.rejected += 1
        else:
            try:
                await self._write(session, wanted, result)
            except BaseException:
                self.fingerprint = None  # not all applied: the next look tries again
                raise
        self.last = result
        for line in result.lines():
            self.say(line)
        return result

    def _admit(self, docs: list[Document], result: ApplyResult) -> dict[Key, dict[str, Any]]:
        seen: dict[Key, str] = {}
        for d in docs:
            if d.key in seen:
                raise DirectoryError(f"{d.source}: {describe(d.key)} is also in {seen[d.key]}")
            seen[d.key] = d.source
        view: dict[Key, Mapping[str, Any]] = {
            k: v for k, v in self.stored().items() if k not in self.applied or k in seen
        }
        view.update({d.key: d.raw for d in docs})
        wanted: dict[Key, dict[str, Any]] = {}
        denials: list[str] = []
        for d in docs:
            others = {k: v for k, v in view.items() if k != d.key}
            if d.key in self.stored():
                others[d.key] = self.stored()[d.key]  # the ModelInfer rule compares with it
            review, defaulted = admit(d.raw, others)
            if not review.allowed:
                denials.append(
                    f"  {d.source}: {describe(d.key)}: admission webhook "
                    f'"validate-{d.kind.lower()}" denied the request: {review.message()}'
                )
                continue
            result.warnings += [f"{describe(d.key)}: {w}" for w in review.warnings]
            wanted[d.key] = defaulted
        if denials:
            result.error = "\n".join(denials)
        return wanted

    async def _write(
        self, session: aiohttp.ClientSession, wanted: dict[Key, dict[str, Any]], result: ApplyResult
    ) -> None:
        stored = self.stored()
        for key, raw in wanted.items():
            if self.applied.get(key) == raw and key in stored:
                continue
            current = stored.get(key)
            if current is None:
                await self._create(session, key, raw)
                result.created.append(describe(key))
                if self.first_applied is None:
                    self.first_applied = time.monotonic()
            else:
                if await self._patch(session, key, current, raw):
                    result.patched.append(describe(key))
            self.applied[key] = raw
        for key in [k for k in self.applied if k not in wanted]:
            del self.applied[key]
            if key in stored:
                await self._request(session, "DELETE", path_of(*key))
                result.deleted.append(describe(key))

    async def _create(self, session: aiohttp.ClientSession, key: Key, raw: dict[str, Any]) -> None:
        kind, ns, name = key
        body = {k: v for k, v in raw.items() if k != "status"}
        meta = dict(body["metadata"])
        meta.update(namespace=ns, resourceVersion=self.next_version())
        meta.setdefault("uid", f"uid-{kind.lower()}-{ns}-{name}-{meta['resourceVersion']}")
        if kind in CORE_KINDS:
            body.update(apiVersion="v1", metadata=meta)
        else:
            meta["generation"] = 1
            body.update(apiVersion=f"{KINDS[kind][0]}/{VERSION}", metadata=meta)
        await self._request(session, "POST", path_of(kind, ns), body)

    async def _patch(
        self,
        session: aiohttp.ClientSession,
        key: Key,
        current: Mapping[str, Any],
        raw: Mapping[str, Any],
    ) -> bool:
        old_meta, new_meta = current.get("metadata") or {}, raw.get("metadata") or {}
        meta: dict[str, Any] = {}
        for part in ("labels", "annotations"):
            new = dict(new_meta.get(part) or {})
            old = {k: v for k, v in (old_meta.get(part) or {}).items() if k in new}
            if part == "annotations":  # the controllers' own annotations stay
                new = {k: v for k, v in new.items() if old.get(k) != v}
            diff = merge_diff(old, new) if part == "labels" else new
            if diff:
                meta[part] = diff
        body: dict[str, Any] = {"metadata": meta}
        for part in _CONTENT.get(key[0], ("spec",)):
            before, after = current.get(part), raw.get(part)
            if isinstance(before, Mapping) or isinstance(after, Mapping):
                changed = merge_diff(dict(before or {}), dict(after or {}))
                if changed:
                    body[part] = changed
            elif before != after and after is not None:
                body[part] = after
        if len(body) == 1 and not meta:
            return False
        meta["resourceVersion"] = self.next_version()
        if "spec" in body:
            meta["generation"] = int(old_meta.get("generation") or 1) + 1
        await self._request(session, "PATCH", path_of(*key), body)
        return True

    async def _request(
        self, session: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> None:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with session.request(method, self.url + path, json=body, headers=headers) as r:
            if r.status >= 400:
                text = await r.text()
                raise RuntimeError(f"{method} {path}: HTTP {r.status} {text[:300]}")
