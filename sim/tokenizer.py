"""The simulator's tokenizer: deterministic, documented, and the engine's truth.

Rules (see sim/README.md):

1. The text is split into *pieces*: runs of word characters (``\\w+``, Unicode letters, digits,
   underscore) and single non-space, non-word characters (punctuation, symbols). Whitespace
   separates pieces and produces no token.
2. A word longer than ``CHUNK`` (4) characters is cut into chunks of 4 characters from its start
   (the last chunk may be shorter): ``"internationalization"`` -> ``inte rnat iona liza tion``.
3. Each piece's id is ``FIRST_ID + xxh32(piece, seed=0) % (VOCAB_SIZE - FIRST_ID)``; ids below
   ``FIRST_ID`` are reserved.

Because whitespace yields no token, tokenising a concatenation at a word boundary equals
concatenating the tokenisations: the generated text fed back in the next chat turn hits the
prefix cache exactly as the engine produced it.

Generated text is drawn from ``OUTPUT_WORDS``: short lowercase words of at most 4 characters,
each exactly one token, so ``completion_tokens`` equals the token count of the returned text.
"""

from __future__ import annotations

import re

import xxhash

__all__ = [
    "CHUNK",
    "FIRST_ID",
    "OUTPUT_WORDS",
    "OUTPUT_WORD_IDS",
    "VOCAB_SIZE",
    "Tokenizer",
    "apply_chat_template",
]

VOCAB_SIZE = 128_000
FIRST_ID = 1_000
CHUNK = 4
_PIECE = re.compile(r"\w+|[^\w\s]")
_CACHE_LIMIT = 200_000


def _make_output_words() -> tuple[str, ...]:
    """About 500 distinct pronounceable words of 2 or 4 letters (consonant-vowel syllables)."""
    consonants = "bdfgklmnprstvz"
    vowels = "aeiou"
    syllables = [c + v for c in consonants for v in vowels]  # 70 two-letter syllables
    words: list[str] = []
    for i, a in enumerate(syllables):
        words.append(a)
        for b in syllables[(i * 7) % 70 : (i * 7) % 70 + 6]:
            words.append(a + b)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(list(seen)[:512])


OUTPUT_WORDS: tuple[str, ...] = _make_output_words()


class Tokenizer:
    """Text -> token ids by the rules in the module docstring. Cheap to share; caches ids."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def piece_id(self, piece: str) -> int:
        tid = self._ids.get(piece)
        if tid is None:
            tid = FIRST_ID + xxhash.xxh32_intdigest(piece.encode()) % (VOCAB_SIZE - FIRST_ID)
            if len(self._ids) >= _CACHE_LIMIT:
                self._ids.clear()
            self._ids[piece] = tid
        return tid

    def pieces(self, text: str) -> list[str]:
        out: list[str] = []
        for p in _PIECE.findall(text):
            if len(p) <= CHUNK:
                out.append(p)
            else:
                out.extend(p[i : i + CHUNK] for i in range(0, len(p), CHUNK))
        return out

    def encode(self, text: str) -> list[int]:
        pid = self.piece_id
        return [pid(p) for p in self.pieces(text)]

    def count(self, text: str) -> int:
        return len(self.pieces(text))


_default = Tokenizer()
OUTPUT_WORD_IDS: tuple[int, ...] = tuple(_default.piece_id(w) for w in OUTPUT_WORDS)


def apply_chat_template(messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """The simulator's chat template: ``<|role|>`` line, content line, per message.

    ``messages`` are (role, text) pairs; the assistant turn is opened when
    ``add_generation_prompt`` is set.
    """
    parts = [f"<|{role}|>\n{content}\n" for role, content in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)
