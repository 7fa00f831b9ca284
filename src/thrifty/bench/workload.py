"""Synthetic requests with a fixed seed: random prompt token ids of an exact length, exact output lengths."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


def token_high(vocab_size: int, stop_token_ids: tuple[int, ...] | list[int]) -> int:
    """Draw prompt tokens from [0, high): ordinary tokens only. Special tokens (EOS, end of turn) sit at the top
    of the vocabularies we run (Qwen2 and the tiny test models), so stop below the lowest of them."""
    specials = [t for t in stop_token_ids if t > 0]
    return min([vocab_size, *specials])


def parse_range(text: str) -> tuple[int, int]:
    """'32:256' -> (32, 256), inclusive."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"output length range must look like 32:256, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"output length range needs 1 <= low <= high, got {text!r}")
    return lo, hi


def random_requests(n: int, prompt_len: int, output_len: int | tuple[int, int], high: int,
                    seed: int = 0) -> list[BenchRequest]:
    """`n` requests of exactly `prompt_len` random tokens; output lengths fixed or uniform in [lo, hi].
    Request i is the same whatever n is, so suites of several sizes share their first requests."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(high) for _ in range(prompt_len)]
        length = output_len if isinstance(output_len, int) else rng.randint(*output_len)
        out.append(BenchRequest(prompt, length))
    return out


def shared_prefix_requests(n: int, prefix_len: int, suffix_len: int, high: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts sharing one random `prefix_len`-token prefix, each with its own `suffix_len`-token suffix."""
    rng = random.Random(seed)
    prefix = [rng.randrange(high) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(high) for _ in range(suffix_len)] for _ in range(n)]
