"""The gateway's generic tokenizer: a model's tokenizer.json + chat template, wherever they are."""

from __future__ import annotations

import json
import random
from pathlib import Path
from unittest import mock

from huggingface_hub import constants
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from extproc.kvindex import KVBlockIndex, PromptHasher
from extproc.scheduling import tokenizers
from extproc.scheduling.plugins import (
    PRECISE,
    Context,
    PrecisePrefixArgs,
    PrecisePrefixScorer,
)
from extproc.scheduling.tokenizers import load_tokenizer, resolve_tokenizer_dir
from extproc.scheduling.types import SchedulingRequest
from fleet.pods import Pod, PodMetrics
from sim.tokenizer import TOKENIZER_DIR

CHAT = {":path": "/v1/chat/completions"}
COMPLETIONS = {":path": "/v1/completions"}
WORDS = ["<s>", "</s>", "[UNK]", "hello", "world", "be", "brief", "[U]", "[A]", ",", "."]


def write_model(directory: Path, *, bos: bool, template: str | None) -> Path:
    """A model directory: a word-level tokenizer.json (BOS added to completions when ``bos``)
    and a tokenizer_config.json with ``template`` as its chat template."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "[U]", "[A]"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, object] = {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[U] {% else %}[A] "
    "{% endif %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
)


def test_the_simulator_files_are_found_without_importing_the_simulator() -> None:
    assert resolve_tokenizer_dir("simulator") == TOKENIZER_DIR
    tok = load_tokenizer("simulator")
    assert tok is not None and tok.concatenates_at_whitespace


def test_a_model_directory_with_bos_and_chat_template(tmp_path: Path) -> None:
    tok = load_tokenizer(str(write_model(tmp_path / "m", bos=True, template=TEMPLATE)))
    assert tok is not None
    # completions: the tokenizer's BOS first; chat: the template writes it (no second BOS)
    assert tok.prompt_ids("hello world", COMPLETIONS) == [0, 3, 4]
    assert tok.prompt_ids("user: hello\nassistant: world\n", CHAT) == [0, 7, 3, 8, 4, 8]
    # a path to the tokenizer.json itself works too
    same = load_tokenizer(str(tmp_path / "m" / "tokenizer.json"))
    assert same is not None and same.prompt_ids("hello", COMPLETIONS) == [0, 3]


def test_without_a_chat_template_the_flattened_text_is_tokenized(tmp_path: Path) -> None:
    tok = load_tokenizer(str(write_model(tmp_path / "m", bos=False, template=None)))
    assert tok is not None
    assert tok.prompt_ids("user: hello", CHAT) == tok.encode("user: hello")


def test_a_chat_template_jinja_file_beside_the_tokenizer(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", bos=False, template=None)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    tok = load_tokenizer(str(model))
    assert tok is not None and tok.prompt_ids("user: hello\n", CHAT) == [0, 7, 3, 8]


def test_a_repo_id_is_found_in_the_local_hugging_face_cache_only(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny"
    write_model(repo / "snapshots" / "abc123", bos=False, template=TEMPLATE)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    with mock.patch.object(constants, "HF_HUB_CACHE", str(tmp_path / "hub")):
        assert resolve_tokenizer_dir("acme/tiny") == repo / "snapshots" / "abc123"
        assert resolve_tokenizer_dir("acme/absent") is None  # never downloaded


def test_a_tokenizer_that_joins_across_whitespace_is_not_segment_cached(tmp_path: Path) -> None:
    """BPE without a pre-tokenizer merges "a b" into one token: cutting the prompt at whitespace
    would change its tokens, so the scorer hashes the prompt whole."""
    vocab = {"a": 0, " ": 1, "b": 2, "a ": 3, "a b": 4}
    tok = Tokenizer(models.BPE(vocab, [("a", " "), ("a ", "b")]))
    (tmp_path / "j").mkdir()
    tok.save(str(tmp_path / "j" / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path / "j"))
    assert loaded is not None and not loaded.concatenates_at_whitespace
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(tokenizer=str(tmp_path / "j")), KVBlockIndex())
    prompt = " ".join(random.Random(0).choice("ab") for _ in range(400))
    ids = loaded.encode(prompt)
    request = SchedulingRequest("r", "m", prompt=prompt, headers=COMPLETIONS)
    want = (len(ids), PromptHasher("sha256", "0", 4).hashes(ids, None, 512))
    assert scorer.hashes(request, ("sha256", "0", 4)) == want


def test_no_local_tokenizer_means_the_precise_scorer_abstains(tmp_path: Path) -> None:
    index = KVBlockIndex()
    index.register("a", "sha256", "0")
    index.block_sizes["a"] = 16
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(tokenizer=str(tmp_path / "none")), index)
    assert scorer.tokenizer is None
    request = SchedulingRequest("r", "m", prompt="hello", headers=COMPLETIONS)
    ctx = Context(request, 0.0, random.Random(0), "s", {})
    pod = Pod("a", "10.0.0.1:8000", metrics=PodMetrics(waiting=0, running=0, stale=False))
    assert scorer.score(ctx, [pod]) is None and PRECISE not in ctx.state  # prefix-cache decides


STRICT = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }} {% endfor %}"
)


def index_with(*pods: str) -> KVBlockIndex:
    index = KVBlockIndex()
    for name in pods:
        index.register(name, "sha256", "0")
        index.block_sizes[name] = 16
    return index


def test_a_conversation_the_template_rejects_makes_the_scorer_abstain(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", bos=False, template=STRICT)
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(tokenizer=str(model)), index_with("a"))
    pod = Pod("a", "10.0.0.1:8000", metrics=PodMetrics(waiting=0, running=0, stale=False))
    ok = SchedulingRequest("r", "m", prompt="user: hello\n", headers=CHAT)
    assert scorer.score(Context(ok, 0.0, random.Random(0), "s", {}), [pod]) == [1.0]
    rejected = SchedulingRequest("r", "m", prompt="system: be\nuser: hello\n", headers=CHAT)
    ctx = Context(rejected, 0.0, random.Random(0), "s", {})
    assert scorer.score(ctx, [pod]) is None and PRECISE not in ctx.state


def test_tokenizer_files_that_appear_later_are_found(tmp_path: Path) -> None:
    where = tmp_path / "later"
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(tokenizer=str(where)), index_with("a"))
    pod = Pod("a", "10.0.0.1:8000", metrics=PodMetrics(waiting=0, running=0, stale=False))
    request = SchedulingRequest("r", "m", prompt="hello", headers=COMPLETIONS)
    assert scorer.score(Context(request, 0.0, random.Random(0), "s", {}), [pod]) is None
    write_model(where, bos=False, template=None)  # e.g. the downloader finished
    # within the minute the miss is remembered; after it the files are looked for again
    assert scorer.score(Context(request, 0.0, random.Random(0), "s", {}), [pod]) is None
    tokenizers._loaded[str(where)] = (None, 0.0)  # the minute has passed
    assert scorer.score(Context(request, 0.0, random.Random(0), "s", {}), [pod]) == [1.0]
