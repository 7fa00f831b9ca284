"""llama.cpp's own speculative decoding beside `thrifty bench spec --llamacpp`: llama-server on the same GGUF
files (target, and the draft's for method draft), the same token ids as prompts, greedy, exactly `output_len`
tokens per request (ignore_eos), `batch` parallel slots with `batch` requests in flight.

Methods map onto llama-server's own: off = no speculation; ngram = `--spec-type ngram-simple` drafting `num_tokens`
tokens after a match of the last min(ngram_n, num_tokens) tokens (ngram_n: thrifty's ngram_max; llama-server's
default is 12): its ngram-simple never drafts fewer tokens than its lookup length (size m < size n drafts nothing,
which is what a first run with n 4, m 3 measured). draft = `--spec-type draft-simple` with the draft GGUF and
`--spec-draft-n-max num_tokens`. llama.cpp runs each GGUF in its own quantized blocks (Q4_K_M / Q5_0 / Q8_0 for the
zoo's files) where thrifty runs the format `--weights` names: the rows compare engines, not bits, so the report
checks each llama-server method against llama-server without speculation, not against thrifty.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from thrifty.bench import serve_peers as peers
from thrifty.errors import ThriftyError

SLOT_MARGIN = 64   # context per slot beyond the longest prompt and its output


def spec_argv(method: str, num_tokens: int, draft_path: Path | None, threads: int, ngram_n: int = 4) -> list[str]:
    """llama-server's flags for one of `thrifty bench spec`'s methods."""
    if method == "off":
        return []
    if method == "ngram":
        # llama.cpp's ngram-simple returns no draft when its draft length m is below its lookup length n
        return ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(min(ngram_n, num_tokens)),
                "--spec-ngram-simple-size-m", str(num_tokens)]
    if method == "draft":
        if draft_path is None:
            raise ThriftyError("llama-server's draft method needs the draft's GGUF", "pass --draft")
        return ["--spec-type", "draft-simple", "--model-draft", str(draft_path), "--spec-draft-n-max",
                str(num_tokens), "--threads-draft", str(threads), "--threads-batch-draft", str(threads)]
    raise ThriftyError(f"unknown method {method!r}", "off, ngram or draft")


def _complete(root: str, prompt: list[int], output_len: int) -> dict:
    body = {"prompt": prompt, "n_predict": output_len, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": False, "return_tokens": True, "stream": False}
    r = httpx.post(root + "/completion", json=body, timeout=3600)
    if r.status_code != 200:
        raise ThriftyError(f"llama-server answered HTTP {r.status_code}", r.text[:300])
    return r.json()


def run_cell(root: str, prompts: list[list[int]], batch: int, output_len: int) -> dict:
    """All prompts with `batch` in flight: output tok/s over the wall time, llama-server's draft counters."""
    _complete(root, prompts[0], 4)   # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        answers = list(pool.map(lambda p: _complete(root, p, output_len), prompts))
    wall = time.perf_counter() - start
    tokens = [a.get("tokens") or [] for a in answers]
    timings = [a.get("timings") or {} for a in answers]
    drafted = sum(int(t.get("draft_n") or 0) for t in timings)
    accepted = sum(int(t.get("draft_n_accepted") or 0) for t in timings)
    out = sum(int(a.get("tokens_predicted") or len(t)) for a, t in zip(answers, tokens))
    return {"output_tokens": out, "wall_s": wall, "output_tokens_per_s": out / wall, "_outputs": tokens,
            "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None}


def run_method(model: str, draft: str | None, method: str, cells: list[tuple[str, int, list[list[int]]]],
               num_tokens: int, output_len: int, threads: int | None, ngram_n: int = 4) -> list[dict]:
    """One llama-server for `method`, its slots as many as the largest batch; a row per (workload, batch)."""
    from thrifty.models import zoo

    threads = threads or len(os.sched_getaffinity(0))
    paths = {name: Path(zoo.resolve(name)) for name in (model, draft if method == "draft" else None) if name}
    for name, path in paths.items():
        if path.suffix != ".gguf":
            raise ThriftyError(f"llama-server runs GGUF files; {name} is not one", "drop --llamacpp, or pass GGUFs")
    slots = max(b for _, b, _ in cells)
    slot_ctx = max(len(p) for _, _, ps in cells for p in ps) + output_len + num_tokens + SLOT_MARGIN
    draft_path = paths.get(draft) if method == "draft" else None
    port = peers.free_port()
    spec = peers.llama_server_spec(paths[model], model, threads, port, slots=slots, slot_ctx=slot_ctx)
    spec.argv += spec_argv(method, num_tokens, draft_path, threads, ngram_n)
    rows = []
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-spec-") as tmp, \
            peers.ServerProcess(spec, port, Path(tmp) / "llama-server.log") as server:
        root = server.base_url.removesuffix("/v1")
        for workload, batch, prompts in cells:
            rows.append({"engine": "llama-server", "method": method, "workload": workload, "batch": batch,
                         "requests": len(prompts), **run_cell(root, prompts, batch, output_len)})
    return rows
