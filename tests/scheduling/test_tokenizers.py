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


# ----------------------------------------------------------------- tokenizer: auto


def hf_cache_model(hub: Path, repo_id: str) -> Path:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = write_model(repo / "snapshots" / "abc123", bos=False, template=None)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return snapshot


def score(scorer: PrecisePrefixScorer, model: str, prompt: str, pods: list[Pod]) -> Context:
    request = SchedulingRequest("r", model, prompt=prompt, headers=COMPLETIONS)
    ctx = Context(request, 0.0, random.Random(0), "s", {})
    ctx.state["scores"] = scorer.score(ctx, pods)
    return ctx


def idle(name: str) -> Pod:
    return Pod(name, "10.0.0.1:8000", metrics=PodMetrics(waiting=0, running=0, stale=False))


def test_auto_finds_the_models_files_by_its_name(tmp_path: Path) -> None:
    """The request's model name as a Hugging Face repo id in the local cache (with or without an
    organisation) or as a local directory (vLLM serves --model /path under that name)."""
    assert PrecisePrefixArgs().tokenizer == "auto"
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(), index_with("a"))
    with mock.patch.object(constants, "HF_HUB_CACHE", str(tmp_path / "hub")):
        hf_cache_model(tmp_path / "hub", "acme/small")
        hf_cache_model(tmp_path / "hub", "tiny")
        local = write_model(tmp_path / "served" / "m", bos=False, template=None)
        for model, where in (("acme/small", "acme/small"), ("tiny", "tiny"), (str(local),) * 2):
            tok, entry = scorer.tokenizer_for(model)
            assert tok is not None and tok.source == where
            assert entry is not None and entry.confirmed
            ctx = score(scorer, model, "hello world", [idle("a")])
            assert ctx.state["scores"] == [1.0] and PRECISE in ctx.state
            assert tok.encode("hello world") == [3, 4]  # the model's own vocabulary


def test_auto_trusts_the_simulators_files_once_the_engines_events_confirm_them() -> None:
    index = index_with("a", "b")
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(), index)
    sim = load_tokenizer("simulator")
    assert sim is not None
    prompt = " ".join(["able"] * 40)  # 40 tokens: two full blocks of 16
    tok, entry = scorer.tokenizer_for("bench-model")  # not a local path, not in the HF cache
    assert tok is sim and entry is not None and not entry.confirmed
    # nothing reported yet: no evidence, abstain (prefix-cache decides)
    assert score(scorer, "bench-model", prompt, [idle("a"), idle("b")]).state["scores"] is None
    assert entry.trials == 0
    hashes = PromptHasher("sha256", "0", 16).hashes(sim.encode(prompt))
    index.stored("b", hashes)  # pod b's engine reports the prompt's blocks
    ctx = score(scorer, "bench-model", prompt, [idle("a"), idle("b")])
    assert entry.confirmed and PRECISE in ctx.state
    scores = ctx.state["scores"]
    assert isinstance(scores, list) and scores[1] == 1.0 and scores[0] < 1.0


def test_auto_gives_the_simulators_files_up_when_the_engines_never_match_them() -> None:
    index = index_with("a")
    index.stored("a", [1, 2, 3])  # a real engine's blocks: other tokens, other hashes
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(), index)
    prompt = " ".join(["able"] * 40)
    for _ in range(64):
        assert score(scorer, "llama", prompt, [idle("a")]).state["scores"] is None
    tok, entry = scorer.tokenizer_for("llama")
    assert tok is None and entry is not None and entry.trials == 64
    ctx = score(scorer, "llama", prompt, [idle("a")])
    assert ctx.state["scores"] is None and PRECISE not in ctx.state
    entry.retry_at = 0.0  # the retry interval has passed: looked for again
    assert scorer.tokenizer_for("llama")[0] is not None


def test_an_explicit_tokenizer_is_used_for_every_model(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", bos=False, template=None)
    scorer = PrecisePrefixScorer(PrecisePrefixArgs(tokenizer=str(model)), index_with("a"))
    tok, entry = scorer.tokenizer_for("anything")
    assert tok is not None and tok.source == str(model) and entry is None
