"""Each source of error on one scale: mean KL of the next-token distribution against the float32 model with a
float32 KV cache (the truth this file measures against), 2 windows of 384 held-out tokens (code, prose).

Rows: the bf16 model (what thrifty serves) through the prefill and the decode attention paths (the noise floor of
bf16 compute itself), then int8 KV through the decode kernel with the float kernel and the integer dot (auto),
on the bf16 and on the float32 model, and through the prefill path.

    PYTHONPATH=src python kl_against_float32.py gemma-3-270m
"""
import torch, os, sys
from thrifty.bench.ppl import EvalSet, sequence_logprobs
from thrifty.engine import kv_calibration
from thrifty.models import zoo
from thrifty.models.loader import load
torch.set_num_threads(2)
name = sys.argv[1]
f32 = load(zoo.resolve(name), dtype="float32")
b16 = load(zoo.resolve(name))
ev = EvalSet.build(b16.tokenizer, 2048, 512)
res = {}
for w in (ev.windows["code"][0], ev.windows["prose"][0]):
    ids = w[:384]
    ref = sequence_logprobs(f32.model, f32.config, ids, torch.float32)
    def kl(lp): return float((ref.exp() * (ref - lp)).sum(-1).mean())
    rows = {
      "bf16 model, bf16 KV, prefill attn": sequence_logprobs(b16.model, b16.config, ids, torch.bfloat16),
      "bf16 model, bf16 KV, decode attn": sequence_logprobs(b16.model, b16.config, ids, torch.bfloat16, as_decodes=True),
    }
    for mode in ("float", "auto"):
        os.environ["THRIFTY_KV_INT8_DOT"] = mode
        rows[f"bf16 model, int8 KV, decode attn ({mode})"] = sequence_logprobs(b16.model, b16.config, ids, torch.int8, kv_calibration.calibrate(b16), as_decodes=True)
        rows[f"fp32 model, int8 KV, decode attn ({mode})"] = sequence_logprobs(f32.model, f32.config, ids, torch.int8, kv_calibration.calibrate(f32), as_decodes=True)
    rows["bf16 model, int8 KV, prefill attn"] = sequence_logprobs(b16.model, b16.config, ids, torch.int8, kv_calibration.calibrate(b16))
    for k, lp in rows.items():
        res.setdefault(k, []).append(kl(lp))
print(f"{name}: mean KL against the float32 model with a float32 KV (2 windows of 384 held-out tokens)")
for k, v in res.items():
    print(f"| {k} | {sum(v)/len(v):.5f} |")
