"""Damaged copies of a file's bytes for the loaders' fuzz tests: cut short anywhere, or a few bytes of its header
overwritten."""
from __future__ import annotations

import numpy as np


def damaged(original: bytes, header: int, rng: np.random.Generator, cuts: int, flips: int) -> list[bytes]:
    """`cuts` truncations at random lengths and `flips` copies with 1-3 random bytes among the first `header`."""
    cases = [original[:int(cut)] for cut in rng.integers(0, len(original), cuts)]
    for _ in range(flips):
        mutated = bytearray(original)
        for pos in rng.integers(0, header, rng.integers(1, 4)):
            mutated[pos] = int(rng.integers(0, 256))
        cases.append(bytes(mutated))
    return cases
