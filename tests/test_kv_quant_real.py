"""int8 / fp8 KV on the real Qwen2.5-Coder-0.5B-Instruct (the zoo's GGUF, default weights): greedy chat answers
with an int8 KV equal the bf16 KV's; fp8_e4m3 agrees on most (its 3-bit mantissa flips near-ties)."""
from __future__ import annotations

import pytest

from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.models.loader import load

pytestmark = pytest.mark.real

CHATS = [
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in one sentence.",
    "Write a SQL query that counts users per country.",
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(qwen05_gguf):
    return load(qwen05_gguf)


def answers(loaded, kv_cache_dtype: str) -> list[list[int]]:
    engine = LLMEngine(loaded, EngineConfig(kv_cache_dtype=kv_cache_dtype, kv_cache_memory=0.25,
                                            max_num_seqs=len(CHATS)))
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
               for c in CHATS]
    return [out.token_ids for out in engine.run(prompts, [PARAMS] * len(prompts))]


@pytest.fixture(scope="module")
def bf16(loaded):
    return answers(loaded, "bfloat16")


def test_int8_kv_greedy_equals_bf16_kv(loaded, bf16):
    assert answers(loaded, "int8") == bf16


def test_fp8_kv_greedy_mostly_equals_bf16_kv(loaded, bf16):
    same = sum(a == b for a, b in zip(answers(loaded, "fp8_e4m3"), bf16))
    assert same >= len(CHATS) - 1
