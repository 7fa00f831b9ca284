"""The llama.cpp peer: llama-cpp-python's low-level batch API on the same GGUF file.

One llama context per concurrency level C with n_seq_max = C (one unified KV buffer), the
same closed loop as thrifty's: C slots, a finished request's slot is cleared and takes the next request. Each
llama_decode call carries one token for every decoding slot plus whole prompts of newly started requests (up
to n_batch tokens), the continuous batching llama-server does. Greedy (argmax of the logits), EOS ignored.
Besides output tokens/s it reports prefill tokens/s, from the calls that held prompt tokens only.

llama-cpp-python is installed on demand (pip, it builds llama.cpp from source: minutes); it is no dependency
of thrifty and no part of the tests.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import subprocess
import sys
import time
from collections import deque
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from thrifty.bench.stats import RunResult
from thrifty.bench.workload import BenchRequest
from thrifty.errors import ThriftyError

REQUIREMENT = "llama-cpp-python==0.3.36"
KV_UNIFIED = True    # one KV buffer shared by all sequences, so mixed prefill + decode batches split freely;
                     # per-sequence streams (False) are llama.cpp's other layout (not yet compared on a quiet machine)


def ensure_installed(log: Callable[[str], None] = print):
    """Import llama_cpp, pip-installing it into this interpreter's environment first when it is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        log(f"installing {REQUIREMENT} for the llama.cpp peer: it builds llama.cpp from source, ~270 s on 2 cores")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", REQUIREMENT])
        if proc.returncode != 0:
            raise ThriftyError(f"pip could not install {REQUIREMENT} (exit {proc.returncode})",
                               "install it by hand (needs a C++ compiler and cmake), or drop --peers llamacpp")
        importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


class LlamaCppModel:
    """A loaded llama.cpp model; contexts are made per run and freed after it."""

    def __init__(self, path: str, threads: int) -> None:
        self.lib = lib = ensure_installed()
        self._quiet = lib.llama_log_callback(lambda level, text, data: None)   # kept alive with self
        lib.llama_log_set(self._quiet, ctypes.c_void_p())
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        # llama.cpp 0.3.36's AMX weight repacking (an "extra buffer type") segfaults in llama_decode on a
        # Sapphire Rapids CPU with this Q4_K_M/Q5_0 file; on CPUs with AMX, load without extra buffer types.
        self.amx_off = _cpu_has("amx_tile") and hasattr(params, "use_extra_bufts")
        if self.amx_off:
            params.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ThriftyError(f"llama.cpp could not load {path}", "check the file with `thrifty models list`")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.threads = threads
        self.version = getattr(lib, "__version__", "?")

    def close(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def run(self, requests: list[BenchRequest], concurrency: int, progress: bool = True) -> RunResult:
        lib = self.lib
        per_seq = max(len(r.prompt_ids) + r.output_len for r in requests) + 16
        per_seq = -(-per_seq // 256) * 256
        n_batch = max(2048, max(len(r.prompt_ids) for r in requests) + concurrency)
        cp = lib.llama_context_default_params()
        cp.n_ctx = per_seq * concurrency
        cp.n_batch = n_batch
        cp.n_ubatch = min(512, n_batch)
        cp.n_seq_max = concurrency
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = KV_UNIFIED
        cp.no_perf = True
        ctx = lib.llama_init_from_model(self.model, cp)
        if not ctx:
            raise ThriftyError(f"llama.cpp could not create a context of {cp.n_ctx} tokens for {concurrency} "
                               "sequences", "lower the concurrency or the lengths")
        batch = lib.llama_batch_init(n_batch, 0, 1)
        try:
            return self._loop(ctx, batch, requests, concurrency, n_batch, progress)
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)

    def _loop(self, ctx, batch, requests: list[BenchRequest], concurrency: int, n_batch: int,
              progress: bool) -> RunResult:
        lib = self.lib
        mem = lib.llama_get_memory(ctx)
        pending = deque(requests)
        free_slots = list(range(concurrency))
        waiting: deque[tuple[int, BenchRequest, float]] = deque()    # (slot, request, submit time)
        active: dict[int, dict] = {}                                  # slot -> state of a decoding request
        ttfts, tpots, out_tokens = [], [], 0
        prefill_tokens, prefill_s = 0, 0.0
        bar = tqdm(total=len(requests), desc=f"llama.cpp c={concurrency}", unit="req", disable=not progress,
                   leave=False)
        start = time.monotonic()

        def submit(now: float) -> None:
            while free_slots and pending:
                slot = free_slots.pop(0)
                lib.llama_memory_seq_rm(mem, slot, -1, -1)
                waiting.append((slot, pending.popleft(), now))

        submit(start)
        while waiting or active:
            n = 0
            outputs: list[tuple[int, int]] = []      # (batch index with logits, slot)
            for slot, st in active.items():
                _put(batch, n, st["next"], st["pos"], slot, True)
                outputs.append((n, slot))
                n += 1
            started = []
            while waiting and n + len(waiting[0][1].prompt_ids) <= n_batch:
                slot, req, submitted = waiting.popleft()
                for i, tok in enumerate(req.prompt_ids):
                    _put(batch, n, tok, i, slot, i == len(req.prompt_ids) - 1)
                    n += 1
                outputs.append((n - 1, slot))
                started.append((slot, req, submitted))
            batch.n_tokens = n
            t0 = time.monotonic()
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise ThriftyError(f"llama_decode returned {rc} at concurrency {concurrency}", "")
            for index, slot in outputs:
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
                token = int(logits.argmax())
                now = time.monotonic()
                if slot not in active:           # a prompt just finished prefilling: its first token
                    slot_, req, submitted = next(s for s in started if s[0] == slot)
                    active[slot] = {"next": token, "pos": len(req.prompt_ids), "left": req.output_len - 1,
                                    "n": 1, "first": now}
                    ttfts.append(now - submitted)
                else:
                    st = active[slot]
                    st["next"], st["pos"], st["left"], st["n"] = token, st["pos"] + 1, st["left"] - 1, st["n"] + 1
            if started and len(outputs) == len(started):   # prompt tokens only: a prefill measurement
                prefill_tokens += n
                prefill_s += time.monotonic() - t0
            now = time.monotonic()
            for slot in [s for s, st in active.items() if st["left"] <= 0]:
                st = active.pop(slot)
                out_tokens += st["n"]
                tpots.append((now - st["first"]) / (st["n"] - 1) if st["n"] > 1 else None)
                free_slots.append(slot)
                bar.update(1)
            submit(now)
        duration = time.monotonic() - start
        bar.close()
        return RunResult.from_timings(
            "llamacpp", "continuous", concurrency, duration, out_tokens, ttfts, tpots,
            extra={"prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else None,
                   "threads": self.threads, "llama_cpp_python": self.version, "n_batch": n_batch,
                   "kv_unified": KV_UNIFIED, "extra_buffer_types": not self.amx_off},
            notes=[f"llama-cpp-python {self.version} low-level batch API, n_seq_max={concurrency}, "
                   f"{self.threads} threads, greedy argmax"
                   + (", extra buffer types (AMX repacking) off: they crash on this CPU" if self.amx_off else "")])


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def _put(batch, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def run(path: str, all_requests: list[BenchRequest], concurrencies: list[int],
        num_requests: Callable[[int], int], threads: int, progress: bool = True,
        log: Callable[[str], None] = print) -> list[RunResult]:
    ensure_installed(log)
    model = LlamaCppModel(path, threads)
    try:
        model.run(all_requests[:1], 1, progress=False)          # warm-up
        results = []
        for c in concurrencies:
            r = model.run(all_requests[:num_requests(c)], c, progress)
            log(f"llamacpp c={c}: {r.output_tokens_per_s:.1f} output tok/s, "
                f"prefill {r.extra['prefill_tokens_per_s'] or 0:.1f} tok/s")
            results.append(r)
        return results
    finally:
        model.close()


def decode_at_context(path: str, prompt: list[int], contexts: list[int], batch: int, steps: int, kv_type: str,
                      threads: int, progress: bool = True) -> list[dict]:
    """Decode tok/s of `batch` sequences each holding a `context`-token KV (`bench kv`): one context per run with
    one KV stream per sequence (kv_unified off, so a sequence attends only its own cells, as thrifty's do),
    K and V stored as `kv_type` (f16, q8_0; flash attention on, which a quantized V cache needs). The first
    sequence is prefilled with prompt[:context] once and copied to the others (llama_memory_seq_cp: a physical
    copy between streams); then `steps` timed llama_decode calls of one token per sequence, greedy argmax."""
    lib = ensure_installed()
    model = LlamaCppModel(path, threads)
    types = {"f16": lib.GGML_TYPE_F16, "q8_0": lib.GGML_TYPE_Q8_0}
    try:
        rows = []
        for context in tqdm(contexts, desc=f"llama.cpp {kv_type}", disable=not progress, leave=False):
            cp = lib.llama_context_default_params()
            per_seq = -(-(context + steps + 8) // 256) * 256
            cp.n_ctx, cp.n_seq_max, cp.kv_unified = per_seq * batch, batch, False
            cp.n_batch = cp.n_ubatch = 512
            cp.n_threads = cp.n_threads_batch = threads
            cp.type_k = cp.type_v = types[kv_type]
            cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
            cp.no_perf = True
            ctx = lib.llama_init_from_model(model.model, cp)
            if not ctx:
                raise ThriftyError(f"llama.cpp could not create a {batch} x {per_seq}-token context", "")
            buf = lib.llama_batch_init(512, 0, 1)
            try:
                rows.append(_decode_rows(model, ctx, buf, prompt[:context], batch, steps, kv_type))
            finally:
                lib.llama_batch_free(buf)
                lib.llama_free(ctx)
        return rows
    finally:
        model.close()


def _decode_rows(model: LlamaCppModel, ctx, buf, prompt: list[int], batch: int, steps: int, kv_type: str) -> dict:
    lib = model.lib
    start = time.monotonic()
    for lo in range(0, len(prompt), 512):                       # prefill sequence 0
        chunk = prompt[lo:lo + 512]
        for i, tok in enumerate(chunk):
            _put(buf, i, tok, lo + i, 0, lo + i == len(prompt) - 1)
        buf.n_tokens = len(chunk)
        if lib.llama_decode(ctx, buf) != 0:
            raise ThriftyError("llama_decode failed in the prefill", "")
    prefill_s = time.monotonic() - start
    mem = lib.llama_get_memory(ctx)
    for s in range(1, batch):
        lib.llama_memory_seq_cp(mem, 0, s, -1, -1)
    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(model.n_vocab,))
    tokens = [int(logits.argmax())] * batch
    times = []
    for step in range(steps + 2):                               # two warm-up steps (the stream copies run first)
        for s in range(batch):
            _put(buf, s, tokens[s], len(prompt) + step, s, True)
        buf.n_tokens = batch
        t0 = time.perf_counter()
        if lib.llama_decode(ctx, buf) != 0:
            raise ThriftyError("llama_decode failed in a decode step", "")
        tokens = [int(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, s), shape=(model.n_vocab,)).argmax())
                  for s in range(batch)]
        times.append(time.perf_counter() - t0)
    timed = sum(times[2:])
    return {"engine": f"llama.cpp {kv_type}", "kv_type": kv_type, "context": len(prompt), "batch": batch,
            "steps": steps, "decode_tok_s": batch * steps / timed, "ms_per_step": 1000 * timed / steps,
            "prefill_s": prefill_s, "llama_cpp_python": model.version}
