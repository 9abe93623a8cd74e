"""``BlockHashes`` (the prefix-cache scorer's hasher) gives exactly ``block_hashes``' chains."""

from __future__ import annotations

import random

from extproc.scheduling.prefix import BlockHashes, block_hashes


def _reference(prompt: str, block_size: int, max_blocks: int) -> list[int]:
    """The chain as first specified: the whole prompt encoded, then its leading blocks."""
    import xxhash

    data = prompt.encode("utf-8", "surrogatepass")
    n = min(len(data) // block_size, max_blocks)
    out, h = [], 0
    for i in range(0, n * block_size, block_size):
        h = xxhash.xxh3_64_intdigest(data[i : i + block_size], h)
        out.append(h)
    return out


def test_kept_chains_equal_the_computed_ones() -> None:
    gen = random.Random(5)
    alphabet = "ab é€\U0001f600\ud800\n"  # 1-4 byte characters and a lone surrogate
    hasher = BlockHashes(16, 6, kept=8)
    prompts = ["".join(gen.choice(alphabet) for _ in range(gen.randint(0, 140))) for _ in range(60)]
    for _ in range(3):  # the second and third pass find most chains kept
        for prompt in prompts:
            want = _reference(prompt, 16, 6)
            assert block_hashes(prompt, 16, 6) == want
            got = hasher(prompt)
            assert got == want
            got.append(0)  # callers get their own list: the kept chain does not change
            assert hasher(prompt) == want
    assert len(hasher._chains) <= 8  # bounded


def test_prompts_sharing_their_hashed_bytes_share_a_chain() -> None:
    hasher = BlockHashes(8, 4)
    system = "s" * 32  # fills all 4 blocks
    a, b = hasher(system + "question one"), hasher(system + "another")
    assert a == b == _reference(system, 8, 4) and len(a) == 4
    assert len(hasher._chains) == 1
    assert hasher("short") == [] and hasher("") == []
