"""Prompt -> token ids as the engine computes them, for the precise-prefix scorer.

One tokenizer today: ``simulator``, the matrixinfer simulator's documented rules (sim/README.md,
"Tokenizer"), written here from that description (the gateway does not import the simulator):

1. pieces: runs of word characters (``\\w+``) and single non-space, non-word characters;
   whitespace yields nothing;
2. a word longer than 4 characters is cut into chunks of 4 from its start;
3. a piece's id is ``1000 + xxh32(piece, seed=0) % 127000``.

Chat requests are rendered with the simulator's chat template (``<|role|>\\n content \\n`` per
message, then ``<|assistant|>\\n``). The gateway hands the scheduler the chat messages flattened as
``role: content\\n`` lines (extproc.parsing); they are split back at lines that start with a
known role and ``": "``, so a message whose content has such a line is split wrongly — the
prefix then simply matches less.

Real engines need their model's tokenizer files (not read by the gateway yet): without them
the precise-prefix scorer is not used and the approximate ``prefix-cache`` scorer applies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import xxhash

__all__ = ["TOKENIZERS", "SimulatorTokenizer"]

_PIECE = re.compile(r"\w+|[^\w\s]")
_ROLE_LINE = re.compile(r"^(system|user|assistant|tool|developer|function): ", re.MULTILINE)
_VOCAB, _FIRST, _CHUNK = 128_000, 1_000, 4


class SimulatorTokenizer:
    """The simulator's tokenizer and chat template; caches piece ids."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def _piece(self, piece: str) -> int:
        tid = self._ids.get(piece)
        if tid is None:
            tid = _FIRST + xxhash.xxh32_intdigest(piece.encode()) % (_VOCAB - _FIRST)
            if len(self._ids) >= 200_000:
                self._ids.clear()
            self._ids[piece] = tid
        return tid

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        piece = self._piece
        for p in _PIECE.findall(text):
            if len(p) <= _CHUNK:
                out.append(piece(p))
            else:
                out.extend(piece(p[i : i + _CHUNK]) for i in range(0, len(p), _CHUNK))
        return out

    # encode(a + b) == encode(a) + encode(b) when a ends at whitespace: no piece spans
    # whitespace. The precise-prefix scorer caches per prefix segment on that property.
    concatenates_at_whitespace = True

    def engine_text(self, prompt: str, headers: Mapping[str, str]) -> str:
        """The text the engine tokenizes (the chat template applied for chat completions)."""
        chat = headers.get(":path", "").split("?", 1)[0].endswith("/chat/completions")
        return self.chat_text(prompt) if chat else prompt

    @staticmethod
    def chat_text(flattened: str) -> str:
        """The simulator's chat template over the gateway's flattened ``role: content`` lines."""
        starts = [(m.start(), m.end(), m.group(1)) for m in _ROLE_LINE.finditer(flattened)]
        if not starts or starts[0][0] != 0:
            return flattened
        parts: list[str] = []
        for i, (_, end, role) in enumerate(starts):
            stop = starts[i + 1][0] if i + 1 < len(starts) else len(flattened)
            parts.append(f"<|{role}|>\n{flattened[end:stop].removesuffix(chr(10))}\n")
        parts.append("<|assistant|>\n")
        return "".join(parts)

    def prompt_ids(self, prompt: str, headers: Mapping[str, str]) -> list[int]:
        """Token ids of the request's prompt (chat template applied for chat completions)."""
        return self.encode(self.engine_text(prompt, headers))


TOKENIZERS = {"simulator": SimulatorTokenizer}
"""Tokenizers by the name the precise-prefix scorer's ``tokenizer`` argument takes."""
