"""Perplexity on held-out code and prose, and the mean KL divergence of next-token distributions against bf16.

Every window is one sequence run from its first token (no carried context); each position after the first
predicts the next token. KL(P_bf16 || P_format) is averaged over the same positions. The bf16 reference is the
same checkpoint loaded dense in bf16 (for a GGUF file: its blocks dequantized, then rounded to bf16); its
log-probabilities are kept in memory as float32 (0.6 MB per token for a 152k vocabulary), so many formats can
be compared against one reference pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from thrifty.models.quantized import formats, weight_bytes
from thrifty.ops.forward_context import set_forward_context
from thrifty.quantizers import data
from thrifty.quantizers.prefill import prefill_meta

@torch.inference_mode()
def sequence_logprobs(model, config, ids: list[int], kv_dtype: torch.dtype | None = None,
                      k_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
                      as_decodes: bool = False) -> torch.Tensor:
    """log-softmax [len - 1, vocab] (float32) of the predictions for tokens 1..len-1. `kv_dtype`: the KV cache's
    storage (default: the model's dtype; int8 / fp8 with `k_transform`, as the engine does), read by every
    attention; `as_decodes`: each position attends through the decode kernel (the path generated tokens take)
    instead of the prefill's."""
    device = next(model.parameters()).device
    dtype = model.model.norm.weight.dtype   # the compute dtype (an int8 head's tied table is no dense weight)
    meta = prefill_meta(config, [len(ids)], kv_dtype or dtype, device, k_transform=k_transform,
                       rows_as_decodes=as_decodes)
    with set_forward_context(meta):
        hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device))
    return torch.log_softmax(model.compute_logits(hidden[:-1]).float(), dim=-1)


@dataclass(slots=True)
class EvalSet:
    windows: dict[str, list[list[int]]]                           # domain -> windows of token ids
    reference: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer, max_eval_tokens: int = 4096, seq_len: int = 512) -> EvalSet:
        per_domain = max(2, max_eval_tokens // 2)
        return cls({d: data.eval_windows(tokenizer, d, per_domain, seq_len) for d in ("code", "prose")})

    @property
    def num_tokens(self) -> int:
        return sum(len(w) for ws in self.windows.values() for w in ws)


def score(loaded, evalset: EvalSet, keep_as_reference: bool = False, progress: bool = True,
          label: str = "", kv_dtype: torch.dtype | None = None, as_decodes: bool = False) -> dict:
    """ppl (all, code, prose), mean KL vs the reference held in `evalset` (None when there is none), bytes.
    `kv_dtype`: the KV cache's storage dtype (default: the model's); `as_decodes`: see sequence_logprobs."""
    from thrifty.engine import kv_calibration
    from thrifty.ops.kv_quant import is_quantized

    k_transform = kv_calibration.calibrate(loaded) if kv_dtype is not None and is_quantized(kv_dtype) else None
    nll = {d: 0.0 for d in evalset.windows}
    count = {d: 0 for d in evalset.windows}
    kl_sum, kl_n = 0.0, 0
    total = sum(len(ws) for ws in evalset.windows.values())
    start = time.monotonic()
    with tqdm(total=total, desc=f"eval {label}".strip(), unit="window", disable=not progress, leave=False) as bar:
        for domain, windows in evalset.windows.items():
            for i, ids in enumerate(windows):
                lp = sequence_logprobs(loaded.model, loaded.config, ids, kv_dtype, k_transform, as_decodes)
                target = torch.tensor(ids[1:], device=lp.device)
                nll[domain] -= float(lp.gather(1, target[:, None]).sum())
                count[domain] += len(ids) - 1
                ref = evalset.reference.get((domain, i))
                if ref is not None:
                    kl_sum += float((ref.exp() * (ref - lp)).sum())
                    kl_n += lp.shape[0]
                if keep_as_reference:
                    evalset.reference[(domain, i)] = lp
                bar.update(1)
    n_all = sum(count.values())
    wb = weight_bytes(loaded.model)
    return {
        "weights": loaded.weights, "lm_head": loaded.lm_head, "formats": formats(loaded.model),
        "ppl": math.exp(sum(nll.values()) / n_all),
        "ppl_code": math.exp(nll["code"] / count["code"]),
        "ppl_prose": math.exp(nll["prose"] / count["prose"]),
        "kl_vs_bf16": 0.0 if keep_as_reference else (kl_sum / kl_n if kl_n else None),
        "weight_bytes": wb["total"], "linear_weight_bytes": wb["linear"], "embedding_bytes": wb["embedding"],
        "eval_tokens": {d: count[d] for d in count}, "eval_seconds": time.monotonic() - start,
    }


def reference_spec(model: str, weights: str) -> str:
    """The checkpoint the bf16 reference loads: the model itself, or the source a quantized folder records."""
    from pathlib import Path

    from thrifty.models import quantized_checkpoint as checkpoint

    for candidate in (weights, model):
        if candidate and Path(str(candidate)).is_dir() and checkpoint.is_quantized_folder(Path(candidate)):
            return checkpoint.quantization_config(Path(candidate)).get("source") or model
    return model


def eval_ppl(model: str, weights: str = "auto", max_eval_tokens: int = 4096, seq_len: int = 512,
             progress: bool = True, threads: int | None = None, lm_head: str = "auto") -> dict:
    """`thrifty eval ppl`: the format's scores, with KL against the bf16 reference of the same checkpoint."""
    from thrifty.models.loader import load

    if threads:
        torch.set_num_threads(threads)
    ref_model = reference_spec(model, weights)
    reference = load(ref_model, dtype="bfloat16", weights="bf16", lm_head="dense")
    evalset = EvalSet.build(reference.tokenizer, max_eval_tokens, seq_len)
    ref_scores = score(reference, evalset, keep_as_reference=True, progress=progress, label="bf16")
    if weights in ("auto", "bf16", "bfloat16") and ref_model == model and lm_head in ("auto", "dense"):
        result = dict(ref_scores)
    else:
        del reference
        candidate = load(model, weights=weights, lm_head=lm_head)
        result = score(candidate, evalset, progress=progress, label=str(weights))
    result.update(model=str(model), reference={k: ref_scores[k] for k in ("ppl", "ppl_code", "ppl_prose")},
                  max_eval_tokens=max_eval_tokens, seq_len=seq_len, data=data.describe())
    return result
