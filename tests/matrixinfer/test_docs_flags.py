"""The docs and ``--help`` agree: every ``--flag`` that docs/*.md and README.md mention is known to
the program they mention it with (to some MatrixInfer program when none is named), no doc uses a
deprecated spelling, and every default the docs state (``[--flag VALUE]`` in a synopsis, "default
V" in a flag table) is the parser's default."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controllers.main import build_parser as controllers_parser
from controllers.xds.main import build_parser as xds_parser
from extproc.main import build_parser as extproc_parser
from fleet.service import DeprecatedAlias
from matrixinfer.cli import build_parser as cli_parser
from runtime.downloader import build_parser as downloader_parser
from runtime.pd_proxy import build_parser as pd_proxy_parser
from runtime.sidecar import build_parser as runtime_parser
from sim.cli import fleet_parser, serve_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])

# flags of other tools the docs show: the benchmark runners (python -m bench, bench/*.py), Envoy,
# kubectl, ruff and vllm-router
OTHER_TOOLS = {
    "--contenders", "--qps", "--duration", "--no-extra", "--name", "--out", "--suite",
    "--transports", "--modes", "--processes", "--pacing", "--blocks", "--skip-admission",
    "--skip-usage", "--mode", "--from-literal", "--from-json", "--check", "--fix", "--policy",
    "--worker-urls", "--transport-h2", "--kv-event-source", "--kv-event-replay-source",
    "--prefill-pods", "--long-share", "--rounds",
    # the engines' own flags (vllm serve, SGLang's launch_server), as a Model's pods run them
    "--disaggregation-bootstrap-port", "--dist-init-addr", "--enable-lora",
    "--gpu-memory-utilization", "--kv-transfer-config", "--load-format", "--lora-paths",
    "--model-path", "--nnodes", "--node-rank", "--key",
    # helm, kubectl
    "--create-namespace", "--server-side",
    # envoy
    "--file-flush-interval-msec",
    # python -m bench.fleetsim
    "--workload", "--trace", "--param", "--seeds", "--http-latency", "--metric", "--repeat",
    "--warm", "--kv-events",
    # python -m bench.autoscaler_local
    "--contender", "--compress", "--report", "--slo", "--max-replicas",
}  # fmt: skip


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise KeyError(name)


def parsers() -> dict[str, list[argparse.ArgumentParser]]:
    """Program name as the docs write it -> the parsers that read its flags."""
    cli = cli_parser()
    return {
        "matrixinfer-extproc": [extproc_parser()],
        "matrixinfer-xds": [xds_parser()],
        "matrixinfer-controllers": [controllers_parser()],
        "matrixinfer-pd-proxy": [pd_proxy_parser()],
        "matrixinfer-sim fleet": [fleet_parser(), serve_parser()],  # the rest go to each replica
        "matrixinfer-sim": [serve_parser()],
        "matrixinfer demo": [_subparser(cli, "demo")],
        "matrixinfer get": [_subparser(cli, "get")],
        "matrixinfer gateway": [_subparser(cli, "gateway")],
        "matrixinfer-downloader": [downloader_parser()],
        "matrixinfer-runtime": [runtime_parser()],
        "matrixinfer console": [_subparser(cli, "console")],
    }


PROGRAM = re.compile(
    r"matrixinfer(?:-extproc|-xds|-controllers|-sim fleet|-sim| demo| get| gateway| console"
    r"|-downloader|-runtime)(?![\w-])"
)
FLAG = re.compile(r"(?<![\w=-])--[a-z][a-z0-9-]*")
STATED = re.compile(r"\[(--[a-z][a-z0-9-]*)[ =]([^\]\s|]+)\]")
TABLE_ROW = re.compile(r"^\|\s*`(--[a-z][a-z0-9-]*)[^`]*`\s*\|(.*)\|\s*$")
TABLE_DEFAULT = re.compile(r"\bdefault:? `?([0-9][0-9.]*(?:ns|us|ms|s|m|h)?)\b")
CONTAINER = re.compile(r"(?m:^[ \t]*- name: [\w-]+$)")  # a container in a YAML manifest
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_=.…-]*$")


@dataclass(frozen=True)
class Mention:
    where: str
    flag: str
    program: str | None  # None: prose, no program named before it in the same code unit


def _units(text: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every fenced code block and inline code span (spans may wrap lines), then
    the prose lines."""
    fence = re.compile(r"^```.*?^```", re.M | re.S)
    for block in fence.finditer(text):
        yield text.count("\n", 0, block.start()) + 1, block.group(0)
    rest = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    offset = 0
    for paragraph in re.split(r"(\n\s*\n)", rest):  # a code span ends with its paragraph
        for span in re.finditer(r"(`+)(.+?)\1", paragraph, re.S):
            yield rest.count("\n", 0, offset + span.start()) + 1, span.group(2)
        offset += len(paragraph)


def mentions() -> list[Mention]:
    out: list[Mention] = []
    for doc in DOCS:
        text = doc.read_text()
        for line, unit in _units(text):
            program: str | None = None
            for token in re.finditer(f"{PROGRAM.pattern}|{FLAG.pattern}|{CONTAINER.pattern}", unit):
                if CONTAINER.fullmatch(token.group(0)):
                    program = None  # a manifest's next container runs another program
                elif token.group(0).startswith("--"):
                    out.append(Mention(f"{doc.name}:{line}", token.group(0), program))
                else:
                    program = token.group(0)
    return out


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return parser._option_string_actions.get(flag)


def _known(flag: str, program: str | None, table: dict[str, list[argparse.ArgumentParser]]) -> Any:
    candidates = table[program] if program else [p for ps in table.values() for p in ps]
    return [a for p in candidates if (a := _action(p, flag)) is not None]


def test_every_flag_in_the_docs_is_known_to_its_program() -> None:
    table = parsers()
    unknown, deprecated = [], []
    for m in mentions():
        if m.flag in ("--help", "--version") or (m.program is None and m.flag in OTHER_TOOLS):
            continue
        actions = _known(m.flag, m.program, table)
        if not actions:
            unknown.append(f"{m.where}: {m.flag} ({m.program or 'no MatrixInfer program'})")
        elif all(isinstance(a, DeprecatedAlias) for a in actions):
            deprecated.append(f"{m.where}: {m.flag} (use {actions[0].replacement})")
    assert not unknown, "flags the programs do not know:\n" + "\n".join(unknown)
    assert not deprecated, "deprecated spellings in the docs:\n" + "\n".join(deprecated)


def _value(action: argparse.Action, text: Any) -> Any:
    if isinstance(text, str) and callable(action.type):
        return action.type(text)
    return text


def stated_defaults() -> list[tuple[str, str, str | None, str]]:
    """(where, flag, program or None, value) for every default the docs state."""
    out: list[tuple[str, str, str | None, str]] = []
    for doc in DOCS:
        text = doc.read_text()
        for line, unit in _units(text):
            for start, match in ((m.start(), m) for m in STATED.finditer(unit)):
                flag, value = match.groups()
                if PLACEHOLDER.match(value):
                    continue
                named = PROGRAM.findall(unit[:start])
                out.append((f"{doc.name}:{line}", flag, named[-1] if named else None, value))
        for number, row in enumerate(text.splitlines(), 1):
            if (cells := TABLE_ROW.match(row)) and (said := TABLE_DEFAULT.search(cells.group(2))):
                out.append((f"{doc.name}:{number}", cells.group(1), None, said.group(1)))
    return out


def test_defaults_the_docs_state_are_the_parsers() -> None:
    table = parsers()
    wrong = []
    checked = 0
    for where, flag, program, value in stated_defaults():
        for action in _known(flag, program, table):
            if isinstance(action, DeprecatedAlias):
                continue
            checked += 1
            try:
                said = _value(action, value)
            except (argparse.ArgumentTypeError, ValueError):
                wrong.append(f"{where}: {flag} {value!r} is not a value the flag takes")
                continue
            if said != _value(action, action.default):
                wrong.append(f"{where}: {flag} documented default {value}, parser {action.default}")
    assert not wrong, "docs and --help disagree:\n" + "\n".join(wrong)
    assert checked > 10  # the docs do state defaults; the extraction found them


def test_the_checks_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A doc naming a flag its program lacks, a deprecated spelling, or a wrong default fails."""
    doc = tmp_path / "bad.md"
    doc.write_text(
        "`matrixinfer-xds --no-such-flag` and `matrixinfer gateway [--port 9999]`\n\n"
        "| `--message-timeout-ms MS` | the old name |\n| `--usage-grace D` | (default 7s) |\n"
    )
    monkeypatch.setitem(globals(), "DOCS", [doc])
    with pytest.raises(AssertionError, match="no-such-flag"):
        test_every_flag_in_the_docs_is_known_to_its_program()
    found = {(flag, value) for _, flag, _, value in stated_defaults()}
    assert found == {("--port", "9999"), ("--usage-grace", "7s")}
    monkeypatch.setitem(globals(), "DOCS", [ROOT / "README.md", doc])
    with pytest.raises(AssertionError, match="--port documented default 9999"):
        test_defaults_the_docs_state_are_the_parsers()
