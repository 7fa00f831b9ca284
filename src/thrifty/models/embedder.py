"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2 (384-dim) from the offline zoo.

A lean BERT forward in torch over the sentence-transformers folder's `model.safetensors` and
`tokenizer.json`: mean pooling over real tokens, then L2 normalisation, as the model was trained. It skips
sentence-transformers and transformers on purpose: importing them costs seconds, and their per-call
overhead is a large part of what a short sentence costs there.

Two precisions:
- "int8" (the cache's default): the 24 linear layers run as fbgemm dynamic-int8 GEMMs (weights int8 per
  output channel, activations quantized per call). A look-up embeds one short sentence, where the fp32
  forward is bound by streaming 42 MB of weights (more than L3) through small GEMMs: ~10 ms on one Zen 3
  core, ~4 ms in int8. Embeddings stay within cosine ~0.99 of fp32; the guard's thresholds were chosen
  on the int8 embeddings. Each text runs alone, so its vector never depends on which
  other texts share a batch (activation scales are per call).
- "fp32": the reference; `tests/test_cache_eval.py` checks it against what sentence-transformers computes.
Neither touches torch's process-wide thread count: switching it per call is itself costly and races with
an engine using torch in another thread.

Embeddings of recent texts are kept in a small LRU map, so the store and the look-up of one request (and
repeated questions) embed once.
"""
from __future__ import annotations

import json
import math
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
PRECISIONS = ("int8", "fp32")


class Embedder:
    """`embed(texts) -> float32 array (n, dim)`, rows L2-normalised; thread-safe."""

    def __init__(self, folder: str | Path, max_tokens: int = 256, memo_size: int = 4096,
                 precision: str = "int8") -> None:
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        if precision not in PRECISIONS:
            raise ValueError(f"unknown embedder precision {precision!r}; use one of {PRECISIONS}")
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        self.dim = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.max_tokens = max_tokens
        self.precision = precision
        w = {k.removeprefix("bert."): v.float().contiguous()
             for k, v in load_file(str(folder / "model.safetensors")).items()}
        self._emb = (w["embeddings.word_embeddings.weight"], w["embeddings.position_embeddings.weight"],
                     w["embeddings.token_type_embeddings.weight"][0], w["embeddings.LayerNorm.weight"],
                     w["embeddings.LayerNorm.bias"])
        self._layers = [self._layer(w, f"encoder.layer.{i}.", torch) for i in range(self.layers)]
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_tokens)
        self._tok = tok
        self._torch = torch
        self._lock = threading.Lock()
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo_size
        self.name = folder.name

    @classmethod
    def from_zoo(cls, name: str = DEFAULT_EMBEDDER, **kw) -> Embedder:
        from thrifty.models import zoo

        return cls(zoo.resolve(name), **kw)

    # ---- public ------------------------------------------------------------------------------------
    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        with self._lock:
            for i, t in enumerate(texts):
                v = self._memo.get(t)
                if v is None:
                    todo.append(i)
                else:
                    self._memo.move_to_end(t)
                    out[i] = v
            if self.precision == "int8":
                batch_size = 1  # activation scales are per call: one text per call keeps vectors independent
            todo.sort(key=lambda i: len(texts[i]))  # similar lengths together keep padding small
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                vecs = self._forward([texts[i] for i in idx])
                for i, v in zip(idx, vecs):
                    out[i] = v
                    self._remember(texts[i], v)
        return out

    def forget(self) -> None:
        """Drop the memo (benchmarks time real embeddings)."""
        with self._lock:
            self._memo.clear()

    # ---- internals ---------------------------------------------------------------------------------
    def _layer(self, w: dict, p: str, torch) -> dict:
        qkv_w = torch.cat([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
        qkv_b = torch.cat([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        lin = {"qkv": (qkv_w, qkv_b), "o": (w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"]),
               "up": (w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"]),
               "down": (w[p + "output.dense.weight"], w[p + "output.dense.bias"])}
        if self.precision == "int8":
            lin = {k: self._pack(wt, b, torch) for k, (wt, b) in lin.items()}
        lin["ln1"] = (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        lin["ln2"] = (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        return lin

    @staticmethod
    def _pack(weight, bias, torch):
        """Per-output-channel symmetric int8 weights, prepacked for fbgemm's dynamic linear. torch 2.13
        marks quantized tensors deprecated (the project pins it); the warning says nothing new per call."""
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, bias)

    def _linear(self, x, p):
        torch = self._torch
        if self.precision == "int8":
            return torch.ops.quantized.linear_dynamic(x, p)
        return torch.nn.functional.linear(x, *p)

    def _remember(self, text: str, v: np.ndarray) -> None:
        self._memo[text] = v
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)

    def _forward(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        F = torch.nn.functional
        enc = self._tok.encode_batch(texts)
        b, n = len(enc), max(len(e.ids) for e in enc)
        ids = torch.zeros((b, n), dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.bool)
        for r, e in enumerate(enc):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
            mask[r, :len(e.ids)] = True
        d, h = self.dim, self.heads
        hd = d // h
        word, pos, typ, ln_w, ln_b = self._emb
        with torch.inference_mode():
            x = F.layer_norm(word[ids] + pos[:n] + typ, (d,), ln_w, ln_b, self.eps).reshape(b * n, d)
            # padded keys are masked out; a single text has no padding and needs no mask
            att_mask = None if b == 1 else mask[:, None, None, :]
            for lay in self._layers:
                qkv = self._linear(x, lay["qkv"]).view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
                ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=att_mask,
                                                     scale=1.0 / math.sqrt(hd))
                ctx = ctx.transpose(1, 2).reshape(b * n, d)
                x = F.layer_norm(x + self._linear(ctx, lay["o"]), (d,), *lay["ln1"], self.eps)
                hid = self._linear(F.gelu(self._linear(x, lay["up"])), lay["down"])
                x = F.layer_norm(x + hid, (d,), *lay["ln2"], self.eps)
            x = x.view(b, n, d)
            m = mask[:, :, None].float()
            pooled = F.normalize((x * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
        return pooled.numpy().astype(np.float32, copy=False)
