"""The simulator's tokenizer: deterministic, chunked, whitespace-free, output words = 1 token."""

from __future__ import annotations

from sim.tokenizer import (
    FIRST_ID,
    OUTPUT_WORD_IDS,
    OUTPUT_WORDS,
    VOCAB_SIZE,
    Tokenizer,
    apply_chat_template,
)


def test_pieces_split_words_punctuation_and_long_words() -> None:
    t = Tokenizer()
    assert t.pieces("Hello, internationalization world!") == [
        "Hell", "o", ",", "inte", "rnat", "iona", "liza", "tion", "worl", "d", "!",
    ]  # fmt: skip
    assert t.pieces("  \n\t ") == []


def test_ids_are_deterministic_and_in_vocab() -> None:
    a, b = Tokenizer(), Tokenizer()
    text = "The quick brown fox jumps over the lazy dog. 12345 _x_"
    ids = a.encode(text)
    assert ids == b.encode(text)
    assert all(FIRST_ID <= i < VOCAB_SIZE for i in ids)
    assert a.count(text) == len(ids)
    assert a.encode("fox") != a.encode("dog")


def test_concatenation_at_whitespace_is_prefix_stable() -> None:
    t = Tokenizer()
    first = apply_chat_template([("user", "tell me a story")])
    answer = "ba bedo kilu"
    second = first + answer + "\n" + "<|user|>\nmore\n"
    assert t.encode(second)[: len(t.encode(first))] == t.encode(first)
    assert t.encode(first + answer) == t.encode(first) + t.encode(answer)


def test_every_output_word_is_one_token() -> None:
    t = Tokenizer()
    assert len(OUTPUT_WORDS) >= 400
    for w, i in zip(OUTPUT_WORDS, OUTPUT_WORD_IDS, strict=True):
        assert t.encode(" " + w) == [i]
    text = " ".join(OUTPUT_WORDS[:50])
    assert t.count(text) == 50
