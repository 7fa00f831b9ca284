"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2 (384-dim) from the offline zoo.

A lean BERT forward in torch over the sentence-transformers folder's `model.safetensors` and
`tokenizer.json`: mean pooling over real tokens, then L2 normalisation, as the model was trained. It skips
sentence-transformers and transformers on purpose: importing them costs seconds, and their per-call
overhead is most of the ~9 ms a single short sentence takes there; this forward takes 1-3 ms on two cores.
`tests/test_cache_embedder.py` checks it against sentence-transformers.

Embeddings of recent texts are kept in a small LRU map, so the store and the look-up of one request (and
repeated questions) embed once.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


class Embedder:
    """`embed(texts) -> float32 array (n, dim)`, rows L2-normalised; thread-safe."""

    def __init__(self, folder: str | Path, max_tokens: int = 256, memo_size: int = 4096,
                 num_threads: int | None = 1) -> None:
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        self.dim = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.max_tokens = max_tokens
        self.num_threads = num_threads
        w = load_file(str(folder / "model.safetensors"))
        self._w = {k.removeprefix("bert."): v.float().contiguous() for k, v in w.items()}
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
            # longest first keeps padding small inside each batch
            todo.sort(key=lambda i: len(texts[i]))
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
    def _remember(self, text: str, v: np.ndarray) -> None:
        self._memo[text] = v
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)

    def _forward(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        F = torch.nn.functional
        enc = self._tok.encode_batch(texts)
        n = max(len(e.ids) for e in enc)
        ids = torch.zeros((len(enc), n), dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.float32)
        for r, e in enumerate(enc):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
            mask[r, :len(e.ids)] = 1.0
        w, d, h = self._w, self.dim, self.heads
        hd = d // h
        old_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.inference_mode():
                x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
                     + w["embeddings.token_type_embeddings.weight"][0])
                x = F.layer_norm(x, (d,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
                bias = ((1.0 - mask) * -1e9)[:, None, None, :]
                b = len(enc)
                for i in range(self.layers):
                    p = f"encoder.layer.{i}."
                    q = F.linear(x, w[p + "attention.self.query.weight"], w[p + "attention.self.query.bias"])
                    k = F.linear(x, w[p + "attention.self.key.weight"], w[p + "attention.self.key.bias"])
                    v = F.linear(x, w[p + "attention.self.value.weight"], w[p + "attention.self.value.bias"])
                    q, k, v = (t.view(b, n, h, hd).transpose(1, 2) for t in (q, k, v))
                    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
                    ctx = (att @ v).transpose(1, 2).reshape(b, n, d)
                    ctx = F.linear(ctx, w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"])
                    x = F.layer_norm(x + ctx, (d,), w[p + "attention.output.LayerNorm.weight"],
                                     w[p + "attention.output.LayerNorm.bias"], self.eps)
                    hid = F.gelu(F.linear(x, w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"]))
                    hid = F.linear(hid, w[p + "output.dense.weight"], w[p + "output.dense.bias"])
                    x = F.layer_norm(x + hid, (d,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                                     self.eps)
                pooled = (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
                pooled = F.normalize(pooled, dim=-1)
        finally:
            if self.num_threads:
                torch.set_num_threads(old_threads)
        return pooled.numpy().astype(np.float32, copy=False)
