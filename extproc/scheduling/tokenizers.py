"""Prompt -> token ids as the engine computes them, for the precise-prefix scorer.

One generic implementation for every model: a Hugging Face ``tokenizer.json`` (run by the
``tokenizers`` library) and, for chat completions, the ``chat_template`` of the model's
``tokenizer_config.json`` (or ``chat_template.jinja`` beside it; Jinja, rendered as
``transformers`` renders it: ``messages``, ``add_generation_prompt=True``, ``bos_token``,
``eos_token``; the rendered text is tokenized without adding special tokens, as vLLM does).
Completions are tokenized with the tokenizer's own special tokens (e.g. a BOS token).

Where the files come from (:func:`load_tokenizer`, the scorer's ``tokenizer`` argument):

- ``simulator``: the files matrixinfer-sim ships (``sim/tokenizer_files``, located without
  importing the simulator);
- a local directory holding ``tokenizer.json`` (and usually ``tokenizer_config.json``), or the
  path of a ``tokenizer.json``;
- a Hugging Face repo id (``org/name`` or ``name``) whose files are already in the local Hugging
  Face cache (``HF_HOME`` / ``HF_HUB_CACHE`` layout); nothing is downloaded.

When none of these is there, :func:`load_tokenizer` returns None and the precise-prefix scorer
abstains: the approximate ``prefix-cache`` scorer decides (docs/scheduling.md).

``auto`` (the scorer's default) looks for the files by the request's model name instead
(:func:`find_model_tokenizer`: a local path, then the local Hugging Face cache); what the scorer
does when they are not there is in ``PrecisePrefixScorer``.

The gateway hands the scheduler the chat messages flattened as ``role: content\\n`` lines
(extproc.parsing); they are split back at lines that start with a known role and ``": "``, so a
message whose content has such a line is split wrongly — the prefix then simply matches less.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "AUTO",
    "SIMULATOR",
    "ChatTemplateError",
    "ModelTokenizer",
    "find_model_tokenizer",
    "load_tokenizer",
    "resolve_tokenizer_dir",
]

AUTO = "auto"
"""The scorer's ``tokenizer`` default: the files of the request's model, looked up by name."""
SIMULATOR = "simulator"
"""The files matrixinfer-sim ships."""

log = logging.getLogger(__name__)

_ROLE_LINE = re.compile(r"^(system|user|assistant|tool|developer|function): ", re.MULTILINE)
# text that exercises whitespace, punctuation and newlines: the segment-cache probe
_PROBES = (
    "Hello world, this is a test.\n\nSecond line  with  two spaces\tand a tab; ok?",
    "You are assistant 3. abcd efgh ijkl\nQuestion 12: what is it?",
)


class ChatTemplateError(ValueError):
    """The model's chat template could not render the request's messages."""


class ModelTokenizer:
    """A model's tokenizer and chat template, from its files. Thread-safe to share."""

    __slots__ = (
        "_bos",
        "_env_template",
        "_eos",
        "_lead",
        "_tok",
        "concatenates_at_whitespace",
        "source",
    )

    def __init__(self, tokenizer_json: Path, config: Mapping[str, Any], source: str) -> None:
        self._tok = HFTokenizer.from_file(str(tokenizer_json))
        self.source = source
        self._bos = _token_text(config.get("bos_token"))
        self._eos = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self._env_template = _compile(template) if isinstance(template, str) else None
        self._lead = self._completion_lead()
        self.concatenates_at_whitespace = self._check_concatenation()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added (without character offsets: faster)."""
        return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def _check_concatenation(self) -> bool:
        """Whether encode(a + b) == encode(a) + encode(b) when b starts at whitespace: then the
        scorer caches tokens per prompt segment. Probed on sample text at every whitespace."""
        try:
            chat = self.chat_text("system: Be brief.\nuser: Hi there, you.\n")
        except Exception:  # a template that rejects this conversation: probe plain text only
            chat = ""
        for text in (*_PROBES, chat):
            whole = self.encode(text)
            for m in re.finditer(r"\s+", text):
                if self.encode(text[: m.start()]) + self.encode(text[m.start() :]) != whole:
                    return False
        return True

    def leading_ids(self, headers: Mapping[str, str]) -> tuple[int, ...]:
        """Special tokens the engine puts before the prompt's own (completions: e.g. BOS; chat
        templates write theirs as text)."""
        return () if _is_chat(headers) else self._lead

    def _completion_lead(self) -> tuple[int, ...]:
        with_special = self._tok.encode("x", add_special_tokens=True).ids
        plain = self._tok.encode("x", add_special_tokens=False).ids
        for i in range(len(with_special) - len(plain) + 1):
            if with_special[i : i + len(plain)] == plain:
                return tuple(with_special[:i])
        return ()

    def engine_text(self, prompt: str, headers: Mapping[str, str]) -> str:
        """The text the engine tokenizes (the chat template applied for chat completions)."""
        return self.chat_text(prompt) if _is_chat(headers) else prompt

    def chat_text(self, flattened: str) -> str:
        """The model's chat template over the gateway's flattened ``role: content`` lines."""
        starts = [(m.start(), m.end(), m.group(1)) for m in _ROLE_LINE.finditer(flattened)]
        if not starts or starts[0][0] != 0 or self._env_template is None:
            return flattened
        messages = []
        for i, (_, end, role) in enumerate(starts):
            stop = starts[i + 1][0] if i + 1 < len(starts) else len(flattened)
            messages.append({"role": role, "content": flattened[end:stop].removesuffix("\n")})
        from jinja2 import TemplateError

        try:
            return str(
                self._env_template.render(
                    messages=messages,
                    add_generation_prompt=True,
                    bos_token=self._bos,
                    eos_token=self._eos,
                )
            )
        except (TemplateError, TypeError, ValueError) as exc:
            raise ChatTemplateError(f"chat template of {self.source!r}: {exc}") from exc

    def prompt_ids(self, prompt: str, headers: Mapping[str, str]) -> list[int]:
        """Token ids of the request's prompt as the engine sees them."""
        return [*self.leading_ids(headers), *self.encode(self.engine_text(prompt, headers))]


def _is_chat(headers: Mapping[str, str]) -> bool:
    return headers.get(":path", "").split("?", 1)[0].endswith("/chat/completions")


def _token_text(value: object) -> str:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _compile(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def resolve_tokenizer_dir(spec: str) -> Path | None:
    """The directory (or tokenizer.json) ``spec`` names, if it is here (see the module doc)."""
    if spec == SIMULATOR:
        found = importlib.util.find_spec("sim")  # locates the package; does not import it
        if found is None or not found.submodule_search_locations:
            return None
        path = Path(next(iter(found.submodule_search_locations))) / "tokenizer_files"
        return path if (path / "tokenizer.json").is_file() else None
    path = Path(spec).expanduser()
    if path.is_file() or (path / "tokenizer.json").is_file():
        return path
    if spec.count("/") <= 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - a runtime dependency
            return None
        try:
            cached = try_to_load_from_cache(spec, "tokenizer.json")
        except ValueError:  # not a valid repo id (e.g. a served name with spaces or ':')
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


_RETRY_AFTER = 60.0  # seconds before looking again for files that were not there
_loaded: dict[str, tuple[ModelTokenizer | None, float]] = {}
_lock = threading.Lock()


def find_model_tokenizer(model: str) -> ModelTokenizer | None:
    """The tokenizer of the model served as ``model`` when its files are here: ``model`` is a
    local directory or ``tokenizer.json`` path (as vLLM serves ``--model /path`` under that
    name), or a Hugging Face repo id in the local cache. None, quietly, otherwise (looked for
    again a minute later)."""
    if model in (AUTO, SIMULATOR):
        return None  # names of sources, not of a model's files
    return load_tokenizer(model, quiet=True)


def load_tokenizer(spec: str, *, quiet: bool = False) -> ModelTokenizer | None:
    """The tokenizer ``spec`` names, loaded once per process and shared; None (logged unless
    ``quiet``) when its files are not here or cannot be read - looked for again on a call a
    minute later."""
    with _lock:
        known = _loaded.get(spec)
        if known is not None and (known[0] is not None or time.monotonic() < known[1]):
            return known[0]
        tok: ModelTokenizer | None = None
        where = resolve_tokenizer_dir(spec)
        if where is None and quiet:
            pass
        elif where is None:
            log.warning(
                "tokenizer %r: no tokenizer.json found locally (a directory, a tokenizer.json, "
                "'simulator' or a Hugging Face repo id in the local cache); the precise-prefix "
                "scorer abstains and prefix-cache decides",
                spec,
            )
        else:
            file = where if where.is_file() else where / "tokenizer.json"
            config_file = file.with_name("tokenizer_config.json")
            try:
                config = json.loads(config_file.read_text()) if config_file.is_file() else {}
                config = config if isinstance(config, dict) else {}
                jinja = file.with_name("chat_template.jinja")  # newer models ship it apart
                if "chat_template" not in config and jinja.is_file():
                    config["chat_template"] = jinja.read_text()
                tok = ModelTokenizer(file, config, spec)
            except Exception as exc:  # a broken file must not take the gateway down
                log.warning(
                    "tokenizer %r: cannot load %s (%s); the precise-prefix scorer abstains",
                    spec,
                    file,
                    exc,
                )
        _loaded[spec] = (tok, time.monotonic() + _RETRY_AFTER)
        return tok
