"""The simulator's tokenizer: a Hugging Face ``tokenizers`` file shipped with the simulator.

The files live in ``sim/tokenizer_files/`` as a model's would: ``tokenizer.json`` (the
tokenizer) and ``tokenizer_config.json`` (its Jinja ``chat_template``). The gateway loads them
with the same generic code it uses for a real model's files; nothing here is special to it.

Rules (built by :func:`build`, run ``python -m sim.tokenizer`` to rebuild; see sim/README.md):

1. Pre-tokenizing: whitespace separates pieces and yields no token; each piece is split into
   runs of word characters (``\\w+``) and single other characters (punctuation, symbols).
2. Model: byte-pair merges over printable ASCII, trained on :data:`WORDS` (3,000 four-letter
   lowercase words), :data:`OUTPUT_WORDS` and a few common words and numbers, until each of
   those is one token. Other words split into smaller known pieces; a character outside
   printable ASCII is ``[UNK]``.
3. The chat roles' markers (``<|system|>``, ``<|user|>``, ``<|assistant|>``, ...) are special
   tokens of their own.

Because whitespace yields no token, tokenizing a concatenation at whitespace equals
concatenating the tokenizations: the generated text fed back in the next chat turn hits the
prefix cache exactly as the engine produced it.

Generated text is drawn from ``OUTPUT_WORDS``: short lowercase words of 2 or 4 letters, each
exactly one token, so ``completion_tokens`` equals the token count of the returned text.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from itertools import chain
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "OUTPUT_WORDS",
    "OUTPUT_WORD_IDS",
    "ROLES",
    "TOKENIZER_DIR",
    "VOCAB_SIZE",
    "WORDS",
    "Tokenizer",
    "apply_chat_template",
    "build",
    "clear_cache",
]

TOKENIZER_DIR = Path(__file__).with_name("tokenizer_files")
"""The simulator's model files (tokenizer.json, tokenizer_config.json): give this directory to
the gateway's ``precise-prefix`` scorer (its default ``tokenizer: simulator`` names it)."""

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The chat template (Jinja, as in a model's tokenizer_config.json); :func:`apply_chat_template`
is the same in Python."""

_N_WORDS = 3000
_UNK = "[UNK]"


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


def _make_words() -> tuple[str, ...]:
    """:data:`_N_WORDS` distinct random four-letter lowercase words (seeded, not output words)."""
    rng = random.Random(16)
    taken = set(OUTPUT_WORDS)
    out: dict[str, None] = {}
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(out) < _N_WORDS:
        w = "".join(rng.choice(letters) for _ in range(4))
        if w not in taken:
            out.setdefault(w, None)
    return tuple(out)


OUTPUT_WORDS: tuple[str, ...] = _make_output_words()
WORDS: tuple[str, ...] = _make_words()
"""Four-letter words that are one token each: benchmark prompts are made of them."""

_COMMON = """
You are assistant Question Session Turn Document Task Hello hello the a an of to and in is
it you that he was for on are with as I his they be at one have this from or had by word but
what some we can out other were all there when up use your how said each she which do their
time if will way about many then them write would like so these her long make thing see him
two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find tell me story more answer
""".split()  # noqa: SIM905 - a word list reads better as text


def build(directory: Path = TOKENIZER_DIR) -> None:
    """Train and write the simulator's tokenizer files (deterministic; committed to the repo)."""
    from tokenizers import Regex, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token=_UNK))
    # the pieces are the regex's matches (invert); what lies between them (whitespace) is dropped
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), "removed", invert=True)
    specials = [_UNK, *(f"<|{r}|>" for r in ROLES)]
    alphabet = [chr(c) for c in range(33, 127)]
    corpus = [*WORDS, *OUTPUT_WORDS, *_COMMON, *map(str, range(1000))]
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # not reached: training stops when every corpus word is one token
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(corpus)] * 2, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "unk_token": _UNK,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


@cache
def _load() -> HFTokenizer:
    return HFTokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


# The token ids of each whitespace-free piece of text seen so far (process-wide, bounded): since
# whitespace separates pre-tokenizer pieces and yields no token (rule 1; the special tokens hold
# no whitespace), a text's ids are its pieces' ids, concatenated.
_PIECES: dict[str, tuple[int, ...]] = {}
_PIECES_KEPT = 1 << 17
# Texts outside the piece cache: any ASCII control character but tab, newline and carriage
# return (Python's and the tokenizer's whitespace differ on some, e.g. \x1c-\x1f), non-ASCII.
_UNCACHED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clear_cache() -> None:
    """Forget the pieces' token ids (benchmarks measuring a cold start)."""
    _PIECES.clear()


class Tokenizer:
    """Text -> token ids with the shipped tokenizer.json. Cheap to share."""

    __slots__ = ("_tok",)

    def __init__(self) -> None:
        self._tok = _load()

    def encode(self, text: str) -> list[int]:
        """The text's token ids: those of its whitespace-separated pieces, each tokenized once
        per process (~20x cheaper than tokenizing a 4,000-word prompt whole); the same ids."""
        if not text.isascii() or _UNCACHED.search(text) is not None:
            return self._encode(text)
        pieces = text.split()
        get = _PIECES.__getitem__
        try:
            return list(chain.from_iterable(map(get, pieces)))
        except KeyError:
            pass
        new = list(set(pieces).difference(_PIECES))
        if len(new) > _PIECES_KEPT:
            return self._encode(text)
        if len(_PIECES) + len(new) > _PIECES_KEPT:
            _PIECES.clear()
            new = list(set(pieces))
        # the new pieces tokenized in one call, joined by spaces; each token goes to the piece its
        # characters start in (every piece has a token: one [UNK] at least)
        enc = self._tok.encode(" ".join(new), add_special_tokens=False)
        groups: list[list[int]] = [[] for _ in new]
        i, end = 0, len(new[0])
        for tid, (start, _end) in zip(enc.ids, enc.offsets, strict=True):
            while start >= end:
                i += 1
                end += 1 + len(new[i])
            groups[i].append(tid)
        for piece, ids in zip(new, groups, strict=True):
            _PIECES[piece] = tuple(ids)
        return list(chain.from_iterable(map(get, pieces)))

    def _encode(self, text: str) -> list[int]:
        # without character offsets: ~2x faster than encode()
        return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def piece_id(self, piece: str) -> int:
        """The id of a piece that is one token (KeyError otherwise)."""
        tid = self._tok.token_to_id(piece)
        if tid is None:
            raise KeyError(f"{piece!r} is not one token of the simulator's tokenizer")
        return tid


VOCAB_SIZE: int
"""Token ids are below this (the tokenizer's vocabulary size)."""
OUTPUT_WORD_IDS: tuple[int, ...]
"""The token id of each of :data:`OUTPUT_WORDS`."""


def __getattr__(name: str) -> object:
    # computed on first use, so that build() runs before the files exist
    if name == "VOCAB_SIZE":
        value: object = _load().get_vocab_size()
    elif name == "OUTPUT_WORD_IDS":
        value = tuple(Tokenizer().piece_id(w) for w in OUTPUT_WORDS)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def apply_chat_template(messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """:data:`CHAT_TEMPLATE` in Python: ``<|role|>`` line, content line, per message.

    ``messages`` are (role, text) pairs; the assistant turn is opened when
    ``add_generation_prompt`` is set.
    """
    parts = [f"<|{role}|>\n{content}\n" for role, content in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


if __name__ == "__main__":
    build()
    print(f"wrote {TOKENIZER_DIR}/tokenizer.json ({_load().get_vocab_size()} tokens)")
