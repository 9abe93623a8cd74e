"""Benchmark workloads: lists of :class:`bench.loadgen.Conversation`, deterministic from a seed.

Text is made of random 4-letter lowercase words from ``sim.tokenizer.WORDS``, each exactly one
token of the simulator's tokenizer, so "N tokens" below means N words (about 5N bytes).

- ``shared_prefix``: ``groups`` applications, each with a long system prompt
  (``system_tokens``); every request is one of them (uniformly drawn) plus a short unique question
  (``question_tokens``). Poisson arrivals at ``qps``.
- ``multi_turn``: chat sessions of ``turns`` user turns (the first ``first_tokens`` long, the next
  ``turn_tokens``); each turn resends the whole history, including the answers received, after
  ``think_time`` s. Sessions start Poisson at ``qps / turns`` (so about ``qps`` requests/s).
- ``long_context``: unique prompts (no sharing) whose lengths are drawn from ``lengths`` with
  ``weights``. Poisson at ``qps``.
- ``lora_mix``: requests for ``adapters`` LoRA adapters (Zipf-like popularity, 1/k) and for the
  base model (``base_share``), short unique prompts. Poisson at ``qps``.
- ``bursts``: shared-prefix traffic arriving in bursts: every ``period`` s, ``qps * period``
  requests within ``spread`` s.

Every generator takes ``seed``: the same seed gives the same conversations (texts, groups,
arrival times), so compared contenders see identical traffic. A different seed gives different
system prompts, which is how the suite keeps caches cold between QPS points on one fleet.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from bench.loadgen import Conversation
from sim.tokenizer import WORDS

__all__ = [
    "WORKLOADS",
    "adapter_names",
    "bursts",
    "long_context",
    "lora_mix",
    "multi_turn",
    "shared_prefix",
    "words",
]


def words(rng: random.Random, n: int) -> str:
    """``n`` random 4-letter words (= ``n`` simulator tokens)."""
    return " ".join(rng.choices(WORDS, k=n))


def _poisson(rng: random.Random, rate: float, duration: float) -> list[float]:
    out: list[float] = []
    t = 0.0
    if rate <= 0:
        return out
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        out.append(t)


def _system_prompts(rng: random.Random, groups: int, tokens: int) -> list[str]:
    return [f"You are assistant {g}. " + words(rng, tokens) for g in range(groups)]


def shared_prefix(
    *,
    qps: float,
    duration: float,
    seed: int = 0,
    model: str = "bench-model",
    groups: int = 16,
    system_tokens: int = 2000,
    question_tokens: int = 24,
    max_tokens: int = 64,
) -> list[Conversation]:
    rng = random.Random(f"shared-prefix/{seed}")
    systems = _system_prompts(rng, groups, system_tokens)
    out = []
    for i, t in enumerate(_poisson(rng, qps, duration)):
        g = rng.randrange(groups)
        question = f"Question {i}: " + words(rng, question_tokens)
        out.append(
            Conversation(t, model, (("system", systems[g]),), (question,), max_tokens, f"g{g}")
        )
    return out


def multi_turn(
    *,
    qps: float,
    duration: float,
    seed: int = 0,
    model: str = "bench-model",
    turns: int = 4,
    first_tokens: int = 600,
    turn_tokens: int = 60,
    max_tokens: int = 64,
    think_time: float = 0.5,
) -> list[Conversation]:
    rng = random.Random(f"multi-turn/{seed}")
    out = []
    for i, t in enumerate(_poisson(rng, qps / turns, duration)):
        first = f"Session {i}. " + words(rng, first_tokens)
        rest = tuple(f"Turn {k}: " + words(rng, turn_tokens) for k in range(1, turns))
        out.append(Conversation(t, model, (), (first, *rest), max_tokens, f"s{i}", think_time))
    return out


def long_context(
    *,
    qps: float,
    duration: float,
    seed: int = 0,
    model: str = "bench-model",
    lengths: Sequence[int] = (128, 512, 2000, 5000),
    weights: Sequence[float] = (4, 3, 2, 1),
    max_tokens: int = 64,
) -> list[Conversation]:
    rng = random.Random(f"long-context/{seed}")
    out = []
    for i, t in enumerate(_poisson(rng, qps, duration)):
        n = rng.choices(list(lengths), weights=list(weights))[0]
        prompt = f"Document {i}: " + words(rng, n)
        out.append(Conversation(t, model, (), (prompt,), max_tokens, f"len{n}"))
    return out


def adapter_names(n: int, prefix: str = "bench-lora") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def lora_mix(
    *,
    qps: float,
    duration: float,
    seed: int = 0,
    model: str = "bench-model",
    adapters: int = 6,
    base_share: float = 0.2,
    prompt_tokens: int = 300,
    max_tokens: int = 64,
) -> list[Conversation]:
    rng = random.Random(f"lora-mix/{seed}")
    names = adapter_names(adapters)
    weights = [1.0 / (k + 1) for k in range(adapters)]
    out = []
    for i, t in enumerate(_poisson(rng, qps, duration)):
        name = model if rng.random() < base_share else rng.choices(names, weights=weights)[0]
        prompt = f"Task {i}: " + words(rng, prompt_tokens)
        out.append(Conversation(t, name, (), (prompt,), max_tokens, name))
    return out


def bursts(
    *,
    qps: float,
    duration: float,
    seed: int = 0,
    model: str = "bench-model",
    period: float = 5.0,
    spread: float = 0.5,
    groups: int = 16,
    system_tokens: int = 2000,
    question_tokens: int = 24,
    max_tokens: int = 64,
) -> list[Conversation]:
    rng = random.Random(f"bursts/{seed}")
    systems = _system_prompts(rng, groups, system_tokens)
    per_burst = max(1, round(qps * period))
    out = []
    start = 0.0
    i = 0
    while start <= duration:
        for _ in range(per_burst):
            t = start + rng.uniform(0, spread)
            g = rng.randrange(groups)
            question = f"Question {i}: " + words(rng, question_tokens)
            out.append(
                Conversation(t, model, (("system", systems[g]),), (question,), max_tokens, f"g{g}")
            )
            i += 1
        start += period
    out.sort(key=lambda c: c.arrival)
    return out


def zipf_prefix(
    *,
    qps: float,
    duration: float,
    seed: int = 0,
    model: str = "bench-model",
    groups: int = 48,
    zipf: float = 1.1,
    system_tokens: int = 2000,
    question_tokens: int = 24,
    max_tokens: int = 64,
) -> list[Conversation]:
    """Shared-prefix traffic whose groups have Zipf(``zipf``) popularity (group k ~ 1/k^zipf):
    with more groups than the fleet's caches hold, a few hot prompts and a long cold tail - cache
    pressure with skewed popularity. Poisson arrivals at ``qps``."""
    rng = random.Random(f"zipf-prefix/{seed}")
    systems = [f"You are assistant {g}. " + words(rng, system_tokens) for g in range(groups)]
    weights = [1.0 / (k + 1) ** zipf for k in range(groups)]
    out: list[Conversation] = []
    t = 0.0
    i = 0
    while qps > 0:
        t += rng.expovariate(qps)
        if t > duration:
            break
        g = rng.choices(range(groups), weights)[0]
        question = f"Question {i}: " + words(rng, question_tokens)
        out.append(
            Conversation(t, model, (("system", systems[g]),), (question,), max_tokens, f"g{g}")
        )
        i += 1
    return out


WORKLOADS: dict[str, Callable[..., list[Conversation]]] = {
    "shared_prefix": shared_prefix,
    "multi_turn": multi_turn,
    "long_context": long_context,
    "lora_mix": lora_mix,
    "bursts": bursts,
    "zipf_prefix": zipf_prefix,
}
"""Every workload generator by name (all take ``qps``, ``duration``, ``seed`` and sizes)."""
