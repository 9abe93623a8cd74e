"""The simulator's tokenizer: the shipped tokenizer.json; output and bench words = 1 token."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jinja2

from sim.tokenizer import (
    CHAT_TEMPLATE,
    OUTPUT_WORD_IDS,
    OUTPUT_WORDS,
    TOKENIZER_DIR,
    VOCAB_SIZE,
    WORDS,
    Tokenizer,
    apply_chat_template,
    build,
    clear_cache,
)


def test_the_shipped_files_are_what_build_writes(tmp_path: Path) -> None:
    build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
    assert (TOKENIZER_DIR / "tokenizer.json").stat().st_size < 300_000  # small


def test_words_and_punctuation_split_whitespace_yields_nothing() -> None:
    t = Tokenizer()
    assert t.encode("  \n\t ") == []
    assert len(t.encode("abcd, efgh!")) == len(t.encode("abcd")) + 1 + len(t.encode("efgh")) + 1
    assert t.encode("internationalization")  # unknown words split into known pieces
    assert t.encode("é") == [t.piece_id("[UNK]")]


def test_ids_are_deterministic_and_in_vocab() -> None:
    a, b = Tokenizer(), Tokenizer()
    text = "The quick brown fox jumps over the lazy dog. 12345 _x_ <|user|>"
    ids = a.encode(text)
    assert ids == b.encode(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert a.count(text) == len(ids)
    assert a.encode("<|user|>") == [a.piece_id("<|user|>")]  # a special token of its own


def test_concatenation_at_whitespace_is_prefix_stable() -> None:
    t = Tokenizer()
    first = apply_chat_template([("user", "tell me a story")])
    answer = "ba bedo kilu"
    second = first + answer + "\n" + "<|user|>\nmore\n"
    assert t.encode(second)[: len(t.encode(first))] == t.encode(first)
    assert t.encode(first + answer) == t.encode(first) + t.encode(answer)


def test_every_output_word_and_bench_word_is_one_token() -> None:
    t = Tokenizer()
    assert len(OUTPUT_WORDS) >= 400
    for w, i in zip(OUTPUT_WORDS, OUTPUT_WORD_IDS, strict=True):
        assert t.encode(" " + w) == [i]
    assert t.count(" ".join(OUTPUT_WORDS[:50])) == 50
    assert len(WORDS) == 3000
    assert t.count(" ".join(WORDS)) == len(WORDS)


def test_the_jinja_chat_template_is_apply_chat_template() -> None:
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    messages = [("system", "Be brief."), ("user", "Hi,\nthere")]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    rendered = env.from_string(CHAT_TEMPLATE).render(
        messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True
    )
    assert rendered == apply_chat_template(messages)


def test_cached_pieces_give_the_ids_of_the_whole_text() -> None:
    """encode() tokenizes each whitespace-separated piece once and joins their ids: the ids of
    tokenizing the whole text (``_encode``), for words, punctuation, special tokens, control
    characters and non-ASCII text (outside the cache), cold and warm."""
    t = Tokenizer()
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + [
        "é",
        "\u00a0",
        "\u2028",
        "<|user|>",
        "<|system|>x",
        "[UNK]",
        "<|",
        "|>",
        "internationalization",
        *WORDS[:50],
        *OUTPUT_WORDS[:20],
    ]
    for i in range(2000):
        if i % 400 == 0:
            clear_cache()
        text = "".join(
            rng.choice(alphabet) + rng.choice(["", " ", "\n", "\t", "  ", "\r\n"])
            for _ in range(rng.randint(0, 30))
        )
        assert t.encode(text) == t._encode(text), repr(text)
    text = " ".join(rng.choice(WORDS) for _ in range(2000)) + "\nQuestion: 42?"
    clear_cache()
    assert t.encode(text) == t._encode(text) == t.encode(text)  # cold, then cached
