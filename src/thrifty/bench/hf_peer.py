"""The Hugging Face transformers peer: Qwen2ForCausalLM on the same GGUF weights (dequantized, bf16 by default),
`generate` per request, one request at a time, greedy, exactly the requested number of new tokens.

A server built this way serves its clients one after another. At concurrency C (closed loop, as for thrifty)
each request waits behind the others; the report's TTFT includes that wait, computed from the measured
service times by replaying the FIFO queue. Timing every request at concurrency 32 would take many minutes, so
only the first `timed` requests are run and the rest are extrapolated from them (cycled); the result says so.
`gpu_check` loads the peer from a Hugging Face folder instead and times `generate` on static batches.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from thrifty.bench.stats import RunResult
from thrifty.bench.workload import BenchRequest
from thrifty.errors import UnsupportedModelError
from thrifty.models.gguf_file import GGUFFile, hf_weights


def load_hf_model(path: Path, dtype: torch.dtype = torch.bfloat16):
    """transformers' model of a Hugging Face folder, or Qwen2ForCausalLM with a GGUF file's weights dequantized,
    in `dtype`, on the CPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    gguf = GGUFFile(path)
    c = gguf.model_config()
    if c.architecture != "qwen2":
        raise UnsupportedModelError(f"the transformers peer builds Qwen2 models; {path.name} is {c.architecture}",
                                    "benchmark a Qwen2 GGUF, or drop --peers hf")
    config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings)
    model = Qwen2ForCausalLM._from_config(config, dtype=dtype).eval()
    params = dict(model.named_parameters())
    loaded = set()
    with torch.no_grad():
        for name, tensor in hf_weights(gguf, c):     # one tensor at a time: no second full copy in float32
            params[name].copy_(tensor)
            loaded.add(name)
        for name, p in params.items():
            if name.endswith("_proj.bias") and name not in loaded:   # Qwen2 in HF always has qkv biases
                p.zero_()
                loaded.add(name)
    if c.tie_word_embeddings:
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    if missing:
        raise UnsupportedModelError(f"the transformers peer found no weights for {sorted(missing)[:3]}", "")
    return model


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.monotonic()

    def end(self) -> None:
        pass


PAD_ID = 0      # any id: padding is masked out


def _greedy(n: int) -> dict:
    """generate() options for exactly n new greedy tokens. A folder's generation_config.json may ask for sampling
    or a repetition penalty; the peer decodes plain greedy, as thrifty does."""
    return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "repetition_penalty": 1.0,
            "pad_token_id": PAD_ID}


def generate_one(model, prompt_ids: list[int], n: int) -> tuple[float, float, int]:
    """(seconds to the first new token, total seconds, new tokens) for one greedy generate call."""
    ids = torch.tensor([prompt_ids])
    streamer = _FirstToken()
    start = time.monotonic()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **_greedy(n))
    total = time.monotonic() - start
    first = (streamer.first - start) if streamer.first is not None else total
    return first, total, out.shape[1] - len(prompt_ids)


def generate_batch(model, prompts: list[list[int]], n: int) -> tuple[float, int]:
    """(seconds, new tokens) for one greedy generate call over the static batch `prompts`, padded on the left
    (new tokens follow each prompt directly), on the model's device."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    _sync(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, **_greedy(n))
    _sync(model.device)
    return time.perf_counter() - start, out[:, width:].numel()


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, requests: list[BenchRequest], progress: bool = True) -> list[tuple[float, float, int]]:
    return [generate_one(model, r.prompt_ids, r.output_len)
            for r in tqdm(requests, desc="hf generate", unit="req", disable=not progress, leave=False)]


def serial_result(timings: list[tuple[float, float, int]], num_requests: int, concurrency: int,
                  dtype: str) -> RunResult:
    """Replay a FIFO one-at-a-time server under a closed loop of `concurrency` clients over `num_requests`
    requests, with service times from `timings` (cycled when fewer were timed than requested)."""
    k = len(timings)
    submit = [0.0] * num_requests
    finish: list[float] = []
    ttfts, tpots, tokens = [], [], 0
    free_at = 0.0
    for i in range(num_requests):
        first, total, n = timings[i % k]
        if i >= concurrency:
            submit[i] = finish[i - concurrency]      # FIFO: completions come in order
        start = max(submit[i], free_at)
        free_at = start + total
        finish.append(free_at)
        ttfts.append(start + first - submit[i])
        tpots.append((total - first) / (n - 1) if n > 1 else None)
        tokens += n
    notes = [f"transformers generate per request, serial, {dtype}; TTFT includes queueing behind the other "
             f"{concurrency - 1} clients"] if concurrency > 1 else [f"transformers generate per request, {dtype}"]
    if k < num_requests:
        notes.append(f"timed {k} of {num_requests} requests; the rest extrapolated from them")
    return RunResult.from_timings("hf", "serial", concurrency, finish[-1], tokens, ttfts, tpots,
                                  extra={"timed_requests": min(k, num_requests), "dtype": dtype}, notes=notes)
