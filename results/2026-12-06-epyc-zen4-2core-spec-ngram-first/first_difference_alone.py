"""Rerun the first three prompts that differed in equality-draft-int4.json alone (batch 1), with and without
the draft model, and print where (if anywhere) their outputs first differ."""
import json
from pathlib import Path

import torch
from thrifty.bench.spec import workload_messages
from thrifty.models.loader import load
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
torch.set_num_threads(2)
rep = json.load(open(Path(__file__).parent / "equality-draft-int4.json"))
m = load("qwen2.5-coder-1.5b-instruct", weights="int4")
d = load("qwen2.5-coder-0.5b-instruct", m.dtype, weights="int4")
tok = m.tokenizer
msgs = workload_messages("chat", 164)
idx = rep["differ"][:3]
ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": msgs[i]}], add_generation_prompt=True),
                  add_special_tokens=False) for i in idx]
plain = LLMEngine(m, EngineConfig(weights="int4", kv_cache_memory=0.5, max_num_seqs=1))
draft_alone = {"method": "draft", "draft_model": "qwen2.5-coder-0.5b-instruct", "ngram_first": False}
spec = LLMEngine(m, EngineConfig(weights="int4", kv_cache_memory=0.5, max_num_seqs=1, speculative=draft_alone),
                 draft=d)
for i, p in zip(idx, ids):
    a = plain.run([p], [SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=3)])[0]
    b = spec.run([p], [SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)])[0]
    ta, tb = list(a.token_ids), list(b.token_ids)
    j = next((k for k in range(64) if ta[k] != tb[k]), None)
    print(i, "alone-batch1 first diff at", j)
    if j is not None:
        print("  top logprobs at", j, a.logprobs[j] if a.logprobs else None)
