"""Prices and the cost of one request: USD per 1M tokens, for input, cached input and output.

A remote tier's price is what its provider bills. A local tier costs what the machine costs per hour,
spread over the tokens it can compute in that hour (`auto_price`): input tokens at the measured prefill
rate, output tokens at the decode rate, cached input (prefix-cache hits) as a fraction of input.
"""
from __future__ import annotations

from dataclasses import dataclass

PER = 1_000_000  # prices are per 1M tokens


@dataclass(slots=True, frozen=True)
class Price:
    """USD per 1M tokens."""
    input: float
    cached_input: float
    output: float

    def describe(self) -> str:
        return f"${self.input:.4g} in / ${self.cached_input:.4g} cached / ${self.output:.4g} out per 1M tokens"


FREE = Price(0.0, 0.0, 0.0)


def auto_price(machine_usd_per_hour: float, prefill_tokens_per_s: float, decode_tokens_per_s: float,
               cached_input_fraction: float) -> Price:
    """The price per 1M tokens of a machine that costs `machine_usd_per_hour` and computes prompt tokens
    at `prefill_tokens_per_s` and output tokens at `decode_tokens_per_s` (machine USD per second / tokens
    per second x 1M). Cached input: the input price x `cached_input_fraction`."""
    if prefill_tokens_per_s <= 0 or decode_tokens_per_s <= 0:
        raise ValueError("throughputs must be > 0 tokens/s")
    usd_per_s = machine_usd_per_hour / 3600.0
    input_ = usd_per_s / prefill_tokens_per_s * PER
    return Price(input_, input_ * cached_input_fraction, usd_per_s / decode_tokens_per_s * PER)


def request_cost(price: Price, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
    """USD for one request: uncached prompt tokens at the input price, cached ones at the cached-input
    price, completion tokens at the output price. `cached_tokens` is part of `prompt_tokens`."""
    cached = max(0, min(cached_tokens, prompt_tokens))
    return ((prompt_tokens - cached) * price.input + cached * price.cached_input
            + completion_tokens * price.output) / PER
