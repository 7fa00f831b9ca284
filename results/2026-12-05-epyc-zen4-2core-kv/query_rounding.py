"""What rounding the query costs the int8 integer dot, by design of the rounding, on a real model.

The integer-dot kernel (csrc/int8_dot.h) computes q . k exactly over int8 codes, so its only error against float
attention over the same cache is the query's rounding. Here that rounding is simulated in float (q rounded,
then the float kernel over the int8 cache), for several designs, and the held-out text is scored with every
position attending through the decode kernel, as `thrifty bench kv`'s decode-attn columns do. The row "kernel"
is the integer dot as built (one int8 term per head until cb1f974, two terms since); "per head" simulates the
one-term design, "two int8 terms per head" the current one. Gemma's bf16 compute is itself chaotic at this scale
(its prefill and decode attention paths differ by KL 0.0024 over the same bf16 cache), so differences below
~0.005 in KL between rows are noise.

    PYTHONPATH=src python query_rounding.py gemma-3-270m
"""
import sys

import torch

from thrifty import native
from thrifty.bench.ppl import EvalSet, score
from thrifty.models import zoo
from thrifty.models.loader import load


def per_head(qf: torch.Tensor) -> torch.Tensor:
    s = qf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return (qf / s).round().clamp(-127, 127) * s


def per_group(width: int):
    def rounding(qf: torch.Tensor) -> torch.Tensor:
        shape = qf.shape
        return per_head(qf.reshape(*shape[:-1], shape[-1] // width, width)).reshape(shape)
    return rounding


def two_term(qf: torch.Tensor) -> torch.Tensor:
    hi = per_head(qf)
    s2 = qf.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127 / 127
    return hi + ((qf - hi) / s2).round() * s2


ORIGINAL = native.decode_attention


def simulate(rounding):
    def decode_attention(q, k_cache, v_cache, tables, lens, scale, window, k_scale=None, v_scale=None,
                         k_channel=None, int8_dot=None):
        if k_cache.dtype != torch.int8 or rounding is None:
            return ORIGINAL(q, k_cache, v_cache, tables, lens, scale, window, k_scale, v_scale, k_channel, "float")
        b, h, d = q.shape
        hkv = k_channel.shape[0]
        div = k_channel[None, :, None, :]                        # the kernel rounds q times K's channel divisor
        qf = q.float().view(b, hkv, h // hkv, d) * div
        qs = (rounding(qf) / div).view(b, h, d)
        out = ORIGINAL(qs, k_cache, v_cache, tables, lens, scale, window, k_scale, v_scale, k_channel, "float")
        return out.to(q.dtype)
    return decode_attention


torch.set_num_threads(2)
model = sys.argv[1] if len(sys.argv) > 1 else "gemma-3-270m"
loaded = load(zoo.resolve(model))
evalset = EvalSet.build(loaded.tokenizer, 2048, 512)
ref = score(loaded, evalset, keep_as_reference=True, progress=False, kv_dtype=torch.bfloat16, as_decodes=True)
print(f"{model}: held-out text, every position attending through the decode kernel; bf16 KV ppl {ref['ppl']:.4f}")
print("| int8 KV, query | ppl vs bf16 KV | KL vs bf16 KV |")
print("|---|---|---|")
designs = {"kernel (THRIFTY_KV_INT8_DOT=auto)": "kernel", "not rounded (float kernel)": None,
           "per head (simulated)": per_head, "per 64 channels": per_group(64), "per 32 channels": per_group(32),
           "two int8 terms per head": two_term}
for name, rounding in designs.items():
    native.decode_attention = ORIGINAL if rounding == "kernel" else simulate(rounding)
    r = score(loaded, evalset, progress=False, kv_dtype=torch.int8, as_decodes=True)
    print(f"| {name} | {r['ppl'] / ref['ppl'] - 1:+.3%} | {r['kl_vs_bf16']:.5f} |", flush=True)
native.decode_attention = ORIGINAL
