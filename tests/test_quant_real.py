"""int8 weights on the real Qwen2.5-Coder-0.5B: greedy continuations identical to bf16 on most prompts (~20 s)."""
from __future__ import annotations

import pytest

from thrifty.bench.engine_run import greedy_exact, make_engine
from thrifty.models.loader import load
from thrifty.models.quantized import formats, weight_bytes

pytestmark = pytest.mark.real

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n\ndef normalize(x):",
           "# Sort a list of dictionaries by a key\n", "SELECT name FROM users WHERE", "class Stack:\n    def"]


def _greedy(loaded, n=16):
    engine = make_engine(loaded, max_num_seqs=len(PROMPTS), kv_cache_memory=0.25)
    return [out.token_ids for out in engine.run(PROMPTS, [greedy_exact(n)] * len(PROMPTS))]


def test_int8_greedy_matches_bf16(qwen05_gguf):
    bf16 = load(qwen05_gguf, weights="bf16")
    ref = _greedy(bf16)
    int8 = load(qwen05_gguf, weights="int8")
    assert formats(int8.model) == {"int8": 97}  # 24 layers x (qkv, o, gate|up, down) + the output head
    assert weight_bytes(int8.model)["linear"] < 0.51 * weight_bytes(bf16.model)["linear"]
    same = sum(a == b for a, b in zip(_greedy(int8), ref))
    # measured 4 of 6 (the two others part at near-ties: "D.C." / "D. C."). `thrifty bench quant` measures the
    # target: 95 % on 20 chat-templated HumanEval prompts; 75 % on raw code continuations, where fp32 compute of
    # the bf16 weights itself agrees with bf16 on only 80 %. This guards against regressions, not the target.
    assert same >= 4, same
