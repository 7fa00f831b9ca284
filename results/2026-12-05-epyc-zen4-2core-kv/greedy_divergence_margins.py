"""Where a KV format's greedy answer first leaves the bf16 KV's, how close the bf16 run was to a tie there.

For each of bench kv's 20 HumanEval chat prompts: greedy 64 tokens with the bf16 KV and with each other format (the
engine, as bench kv runs it); at the first differing token, the bf16 KV's log-prob margin between the token it
picked and the one the other format picked (teacher-forced over the prompt and the shared prefix, bf16 KV, one
pass). A margin far below the format's typical per-token KL says the divergence is a near-tie flipped by noise.

    PYTHONPATH=src python greedy_divergence_margins.py gemma-3-270m float16,int8,fp8_e4m3
"""
import statistics
import sys

import torch

from thrifty.bench.kv import _greedy
from thrifty.bench.ppl import sequence_logprobs
from thrifty.bench.quant import prompt_sets
from thrifty.models import zoo
from thrifty.models.loader import load

torch.set_num_threads(2)
model = sys.argv[1] if len(sys.argv) > 1 else "gemma-3-270m"
formats = (sys.argv[2] if len(sys.argv) > 2 else "int8").split(",")
loaded = load(zoo.resolve(model))
prompts = prompt_sets(loaded.tokenizer, [], 0, 20)["chat"]
ref = _greedy(loaded, prompts, 64, "bfloat16")
dtype = loaded.model.model.norm.weight.dtype
print(f"{model}: first divergence from the bf16 KV's greedy answer (64 tokens, 20 prompts)")
print("| format | prompt | token | bf16 KV margin (nats) between its pick and the format's |")
print("|---|---|---|---|")
for name in formats:
    outs, margins = _greedy(loaded, prompts, 64, name), []
    for i, (a, b) in enumerate(zip(ref, outs)):
        j = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            continue
        lp = sequence_logprobs(loaded.model, loaded.config, prompts[i] + a[:j + 1], dtype)[-1]   # predicts a[j]
        margin = float(lp[a[j]] - lp[b[j]])
        margins.append(margin)
        print(f"| {name} | {i} | {j} | {margin:.4f} |")
    if margins:
        print(f"| {name} | {len(margins)} differ | | median {statistics.median(margins):.4f}, max {max(margins):.4f} |")
