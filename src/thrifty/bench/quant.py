"""`thrifty bench quant`: weight formats side by side in one run, with llama.cpp on the same GGUF as a row.

Per format: weight bytes (linear layers incl. the output head, embeddings apart), perplexity on held-out code
and prose, mean KL vs the bf16 reference, greedy agreement with bf16 (identical 32-token continuations of N
prompts, batched; two prompt sets, see `prompt_sets`), batch-1 decode tokens/s (128 new tokens after a short
prompt) and prefill tokens/s (one ~1,800-token prompt, time to first token). The reference is the checkpoint
dequantized to bf16.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thrifty.errors import InvalidRequestError

DEFAULT_FORMATS = "bf16,fp32,int8,int4,awq,gptq,gguf,llamacpp,llamacpp-q4_0"
DEFAULT_GROUP_SIZES = "32,64,128"
METHODS = {"int4": "RTN", "awq": "AWQ", "gptq": "GPTQ"}   # the int4 rows run at every group size
COLUMNS = ("format", "linear MiB", "embed MiB", "ppl code", "ppl prose", "ppl vs bf16", "KL vs bf16", "greedy = bf16 chat",
           "greedy = bf16 text", "decode tok/s", "prefill tok/s")


def add_parser(bsub: argparse._SubParsersAction) -> None:
    q = bsub.add_parser("quant", help="weight formats: bytes, perplexity, KL vs bf16, decode and prefill speed")
    q.add_argument("--model", required=True, help="zoo name or .gguf file")
    q.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    q.add_argument("--plot", metavar="PNG", help="plot the int4 quality / speed frontier")
    q.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"comma-separated: weights values (bf16, int8, int4-g128, fp8, gguf, a DIR), int4 (RTN), awq, "
                        f"gptq (one row per --group-sizes; AWQ/GPTQ quantized once and kept under THRIFTY_HOME/quant "
                        f"unless --awq/--gptq name a folder), llamacpp (the GGUF as stored), llamacpp-q4_0 (the GGUF "
                        f"requantized by llama.cpp) (default {DEFAULT_FORMATS})")
    q.add_argument("--group-sizes", default=DEFAULT_GROUP_SIZES,
                   help=f"int4 groups of the RTN, AWQ and GPTQ rows (default {DEFAULT_GROUP_SIZES})")
    q.add_argument("--awq", help="an AWQ folder from thrifty quantize: one AWQ row, at the folder's own group")
    q.add_argument("--gptq", help="a GPTQ folder from thrifty quantize: one GPTQ row, at the folder's own group")
    q.add_argument("--lm-heads", default="auto",
                   help="comma-separated lm_head values (auto, dense, int8): each thrifty row but bf16 runs once per "
                        "value, labelled with it when more than one is given (default auto)")
    q.add_argument("--max-eval-tokens", type=int, default=2048)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--greedy-prompts", type=int, default=20)
    q.add_argument("--greedy-tokens", type=int, default=32)
    q.add_argument("--decode-tokens", type=int, default=128)
    q.add_argument("--prefill-tokens", type=int, default=1800)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--no-progress", dest="progress", action="store_false")


@dataclass(slots=True, frozen=True)
class Row:
    """One row to measure: a `weights=` value, or an int4 method at a group size, or a llama.cpp file."""
    name: str                  # as given in --formats
    group: int | None = None   # int4 methods
    folder: str | None = None  # a given AWQ / GPTQ folder
    head: str = "auto"         # the lm_head value it loads with
    head_in_label: bool = False

    @property
    def label(self) -> str:
        if self.name in METHODS:
            base = f"int4-g{self.group} {METHODS[self.name]}"
        else:
            base = {"llamacpp": "llama.cpp", "llamacpp-q4_0": "llama.cpp Q4_0"}.get(self.name, self.name)
        return f"{base}, head {self.head}" if self.head_in_label else base


def plan_rows(formats: str, group_sizes: str, folders: dict[str, str | None], heads: str = "auto") -> list[Row]:
    """bf16 first (the reference), then each format; int4 methods once per group size (or at a given folder's);
    each thrifty row once per lm_head value."""
    from thrifty.models import quantized_checkpoint as checkpoint
    from thrifty.models.lm_head import check_lm_head

    names = [f.strip() for f in formats.split(",") if f.strip()]
    groups = _groups(group_sizes)
    head_values = [check_lm_head(h) for h in heads.split(",") if h.strip()] or ["auto"]
    several = len(head_values) > 1
    rows = [Row("bf16")]
    for name in names:
        if name == "bf16":
            continue
        if name.startswith("llamacpp"):
            rows.append(Row(name))
            continue
        if folders.get(name):
            group = checkpoint.quantization_config(Path(folders[name]))["group_size"]
            base = [Row(name, group, folders[name])]
        elif name in METHODS:
            base = [Row(name, g) for g in groups]
        else:
            base = [Row(name)]
        rows += [Row(r.name, r.group, r.folder, h, several) for r in base for h in head_values]
    return rows


def _groups(text: str) -> list[int]:
    from thrifty.quant.qtensor import INT4_GROUP_SIZES

    try:
        groups = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        groups = []
    if not groups or any(g not in INT4_GROUP_SIZES for g in groups):
        raise InvalidRequestError(f"bad --group-sizes '{text}'",
                                  f"give a comma-separated list of {', '.join(map(str, INT4_GROUP_SIZES))}",
                                  param="group_sizes")
    return groups


def _weights(model: str, row: Row, progress: bool) -> str:
    """The `weights=` value that loads `row`: AWQ and GPTQ folders are made once and kept under THRIFTY_HOME."""
    if row.name == "int4":
        return f"int4-g{row.group}"
    if row.name not in METHODS:
        return row.name
    if row.folder:
        return row.folder
    from thrifty.paths import home
    from thrifty.models import quantized_checkpoint as checkpoint
    from thrifty.quantizers.quantize import quantize_model

    stem = Path(str(model)).name.removesuffix(".gguf")
    out = home() / "quant" / f"{stem}-{row.name}-4b-g{row.group}"
    if not checkpoint.is_quantized_folder(out):
        quantize_model(model, row.name, 4, out, row.group, progress=progress)
    return str(out)


def _text_ids(tokenizer, n: int) -> list[int]:
    from thrifty.quantizers import data

    ids = data._stream(tokenizer, data.documents("code", held_out=True), n)
    return ids[:n]


def prompt_sets(tokenizer, stream: list[int], start: int, n: int) -> dict[str, list[list[int]]]:
    """The greedy-agreement prompts. `chat`: the first n HumanEval problems through the model's chat template,
    the requests this instruct model serves. `text`: n raw 16-32 token slices of held-out code from `stream` at
    `start`; continuing mid-line code has near-ties everywhere, so there even fp32 and bf16 compute of the same
    weights disagree (the fp32 row shows that floor)."""
    from thrifty.bench.humaneval import load_problems

    chat = [tokenizer.encode(tokenizer.apply_chat_template(p.messages()), add_special_tokens=False)
            for p in load_problems(0, n - 1)]
    text = [stream[start + 48 * i:start + 48 * i + 16 + (i % 3) * 8] for i in range(n)]
    return {"chat": chat, "text": text}


def _greedy(loaded, prompts: dict[str, list[list[int]]], n: int) -> dict[str, list[list[int]]]:
    from thrifty.bench.engine_run import greedy_exact, make_engine

    outs = {}
    for kind, batch in prompts.items():
        engine = make_engine(loaded, max_num_seqs=len(batch), kv_cache_memory=0.5, max_num_batched_tokens=8192)
        outs[kind] = [out.token_ids for out in engine.run(batch, [greedy_exact(n)] * len(batch))]
    return outs


def _agreement(outs: dict[str, list[list[int]]], ref: dict[str, list[list[int]]]) -> dict[str, float]:
    """Per prompt set, the share of continuations identical to the reference's."""
    return {kind: sum(a == b for a, b in zip(outs[kind], ref[kind])) / len(ref[kind]) for kind in ref}


def _speed(loaded, prompt: list[int], long_prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """(batch-1 decode tok/s, prefill tok/s) through the engine."""
    from thrifty.bench.engine_run import greedy_exact, make_engine

    options = dict(max_num_seqs=1, kv_cache_memory=0.5, max_num_batched_tokens=max(2048, len(long_prompt) + 1))
    engine = make_engine(loaded, **options)
    engine.add_request(prompt[:64], greedy_exact(8))        # warm-up
    while engine.has_unfinished():
        engine.step()
    engine = make_engine(loaded, **options)
    engine.add_request(prompt, greedy_exact(decode_tokens))
    engine.step()                                            # prefill + first token
    start, n = time.perf_counter(), 0
    while engine.has_unfinished():
        n += len(engine.step())
    decode = n / (time.perf_counter() - start)
    engine = make_engine(loaded, **options)
    engine.add_request(long_prompt, greedy_exact(1))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return decode, len(long_prompt) / (time.perf_counter() - start)


def _row(row: Row, scores: dict, greedy_match: dict[str, float], decode: float, prefill: float) -> dict:
    return {"format": row.label, "method": METHODS.get(row.name), "group_size": row.group, "lm_head_option": row.head,
            **scores,
            "greedy_match_vs_bf16": greedy_match["chat"], "greedy_match_vs_bf16_text": greedy_match["text"],
            "decode_tok_s": decode, "prefill_tok_s": prefill}


def _open_llama(llama_cpp, low, params, path: Path, n_ctx: int, threads: int, logits_all: bool):
    """A llama.cpp context built with our model params (`params`) in place of the library's defaults."""
    default_params = low.llama_model_default_params
    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, verbose=False)
    finally:
        low.llama_model_default_params = default_params


def _llamacpp_speed(llama_cpp, low, params, path: Path, n_ctx: int, args, prompt, long_prompt) -> tuple[float, float]:
    """(batch-1 decode tok/s, prefill tok/s) on a context that keeps only the last position's logits, as a
    llama.cpp server does (logits_all=True, which the perplexity needs, computes and copies the output head's
    151,936 logits for every prompt token: ~1.5x slower prefill here)."""
    import numpy as np

    llm = _open_llama(llama_cpp, low, params, path, n_ctx, args.threads, logits_all=False)
    vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    llm.eval(prompt[:64])                                         # warm-up
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    token = next_token()
    for _ in range(args.decode_tokens - 1):
        llm.eval([token])
        token = next_token()
    decode = (args.decode_tokens - 1) / (time.perf_counter() - start)
    llm.reset()
    start = time.perf_counter()
    llm.eval(long_prompt)
    next_token()
    prefill = len(long_prompt) / (time.perf_counter() - start)
    return decode, prefill


def _llamacpp_row(row: Row, path: Path, evalset, prompts, greedy_ref, args, prompt, long_prompt) -> dict:
    import importlib

    import numpy as np

    from thrifty.models.gguf_file import GGUFFile, hf_name
    from thrifty.models.gguf_native import is_linear_weight

    from thrifty.bench.llamacpp_peer import _cpu_has

    llama_cpp = importlib.import_module("llama_cpp")
    low = importlib.import_module("llama_cpp.llama_cpp")
    if row.name == "llamacpp-q4_0":
        path = requantize(low, path, "q4_0", args.threads)
    n_ctx = max(args.seq_len, len(long_prompt) + 8, len(prompt) + args.decode_tokens + 8)
    default_params = low.llama_model_default_params
    amx_off = _cpu_has("amx_tile")

    def params():  # llama.cpp 0.3.36's AMX repacking segfaults in llama_decode here (see llamacpp_peer)
        p = default_params()
        if amx_off and hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    llm = _open_llama(llama_cpp, low, params, path, n_ctx, args.threads, logits_all=True)
    nll = {d: 0.0 for d in evalset.windows}
    count = {d: 0 for d in evalset.windows}
    kl_sum, kl_n = 0.0, 0
    for domain, windows in evalset.windows.items():
        for i, ids in enumerate(windows):
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.array(llm.scores[:len(ids) - 1], dtype=np.float32))
            lp = torch.log_softmax(logits, dim=-1)
            nll[domain] -= float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
            count[domain] += len(ids) - 1
            ref = evalset.reference[(domain, i)]
            kl_sum += float((ref.exp() * (ref - lp)).sum())
            kl_n += lp.shape[0]

    def greedy(p: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(p)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out

    outs = {kind: [greedy(p, args.greedy_tokens) for p in batch] for kind, batch in prompts.items()}
    del llm
    decode, prefill = _llamacpp_speed(llama_cpp, low, params, path, n_ctx, args, prompt, long_prompt)
    gguf = GGUFFile(path)
    linear = sum(t.nbytes for n, t in gguf.tensors.items() if is_linear_weight(hf_name(n) or ""))
    embed = gguf.tensors["token_embd.weight"].nbytes
    n_all = sum(count.values())
    scores = {"weights": f"llama.cpp ({gguf.file_type_name})", "ppl": float(np.exp(sum(nll.values()) / n_all)),
              "ppl_code": float(np.exp(nll["code"] / count["code"])),
              "ppl_prose": float(np.exp(nll["prose"] / count["prose"])), "kl_vs_bf16": kl_sum / kl_n,
              "weight_bytes": sum(t.nbytes for t in gguf.tensors.values()), "linear_weight_bytes": linear,
              "embedding_bytes": embed, "version": getattr(llama_cpp, "__version__", "?"),
              "note": "extra buffer types (AMX repacking) off" if amx_off else ""}
    return _row(row, scores, _agreement(outs, greedy_ref), decode, prefill)


def requantize(low, source: Path, kind: str, threads: int) -> Path:
    """`source` requantized by llama.cpp's own quantizer (kept under THRIFTY_HOME/quant). The zoo's GGUFs are
    Q4_K_M, so this quantizes already-quantized weights (llama-quantize --allow-requantize does the same)."""
    from thrifty.paths import home

    out = home() / "quant" / f"{source.name.removesuffix('.gguf')}-llamacpp-{kind}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = low.llama_model_quantize_default_params()
    params.ftype = {"q4_0": low.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.allow_requantize, params.nthread = True, threads
    tmp = out.with_suffix(".partial")
    if low.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    tmp.replace(out)
    return out


def run_quant(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from thrifty.models import zoo
    from thrifty.models.loader import load
    from thrifty.quantizers import data
    from thrifty.bench.ppl import EvalSet, score
    from thrifty.bench.quant_frontier import choose_defaults

    torch.set_num_threads(args.threads)
    plan = plan_rows(args.formats, args.group_sizes, {"awq": args.awq, "gptq": args.gptq},
                     getattr(args, "lm_heads", "auto"))
    path = zoo.resolve(args.model)
    reference = load(path, weights="bf16")
    tok = reference.tokenizer
    evalset = EvalSet.build(tok, args.max_eval_tokens, args.seq_len)
    stream = _text_ids(tok, args.prefill_tokens + args.greedy_prompts * 48 + 64)
    long_prompt = stream[:args.prefill_tokens]
    prompt = stream[:32]
    prompts = prompt_sets(tok, stream, args.prefill_tokens, args.greedy_prompts)
    rows: list[dict] = []
    greedy_ref = None
    for row in tqdm(plan, desc="bench quant", unit="format", disable=not args.progress):
        if row.name.startswith("llamacpp"):
            try:
                rows.append(_llamacpp_row(row, path, evalset, prompts, greedy_ref, args, prompt, long_prompt))
            except ImportError:
                rows.append({"format": row.label, "error": "llama-cpp-python is not installed "
                                                           "(pip install llama-cpp-python==0.3.36)"})
            continue
        loaded = reference if row.name == "bf16" else load(path, weights=_weights(args.model, row, args.progress),
                                                           lm_head=row.head)
        scores = score(loaded, evalset, keep_as_reference=row.name == "bf16", progress=args.progress,
                       label=row.label)
        outs = _greedy(loaded, prompts, args.greedy_tokens)
        if greedy_ref is None:
            greedy_ref = outs
        decode, prefill = _speed(loaded, prompt, long_prompt, args.decode_tokens)
        rows.append(_row(row, scores, _agreement(outs, greedy_ref), decode, prefill))
        if args.json:  # partial results survive a crash of a later row
            from thrifty.bench.report import write_json

            write_json(args.json, {"suite": "quant", "partial": True, "rows": rows})
        if loaded is not reference:
            del loaded
    return {"suite": "quant", "model": str(args.model), "path": str(path), "rows": rows,
            "defaults": choose_defaults(rows), "targets": _targets(rows), "threads": args.threads,
            "data": data.describe(),
            "settings": {k: getattr(args, k) for k in ("max_eval_tokens", "seq_len", "greedy_prompts", "greedy_tokens",
                                                       "decode_tokens", "prefill_tokens", "group_sizes")},
            "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch": torch.__version__}, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _targets(rows: list[dict]) -> dict:
    from thrifty.quant.qtensor import DEFAULT_INT4_GROUP

    by = {r["format"]: r for r in rows if "error" not in r}
    bf = by.get("bf16")
    out: dict = {}
    if not bf:
        return out

    def rel(r: dict) -> float:
        return r["ppl"] / bf["ppl"] - 1

    if "int8" in by:
        out["int8_ppl_within_0.5pct"] = rel(by["int8"]) <= 0.005
        out["int8_greedy_identical_ge_90pct"] = by["int8"]["greedy_match_vs_bf16"] >= 0.9
        out["int8_greedy_identical_text"] = by["int8"]["greedy_match_vs_bf16_text"]
    if "fp32" in by:  # the noise floor: the same weights computed in float32 instead of bf16
        out["fp32_greedy_identical_text"] = by["fp32"]["greedy_match_vs_bf16_text"]
    g = DEFAULT_INT4_GROUP
    rtn = by.get(f"int4-g{g} RTN")
    for m in ("AWQ", "GPTQ"):
        r = by.get(f"int4-g{g} {m}")
        if r:  # at the default group, what `thrifty quantize --method awq|gptq --bits 4` makes
            out[f"{m.lower()}_default_ppl_vs_bf16"] = rel(r)
            out[f"{m.lower()}_default_ppl_within_3pct"] = rel(r) <= 0.03
            if rtn:
                out[f"{m.lower()}_default_better_than_rtn"] = r["ppl"] < rtn["ppl"]
    int4 = [r for r in by.values() if r.get("method")]
    if int4:
        fastest = max(r["decode_tok_s"] for r in int4)
        at_default = [r["decode_tok_s"] for r in int4 if r["group_size"] == g]
        if at_default:
            out["default_group_decode_vs_fastest"] = max(at_default) / fastest
        out["int4_linear_bytes_ratio_vs_bf16"] = min(r["linear_weight_bytes"] for r in int4) / bf["linear_weight_bytes"]
        out["int4_linear_bytes_le_0.35x"] = out["int4_linear_bytes_ratio_vs_bf16"] <= 0.35
    peer = by.get("llama.cpp")
    if int4 and peer:
        out["int4_decode_vs_llamacpp"] = max(r["decode_tok_s"] for r in int4) / peer["decode_tok_s"]
        out["int4_prefill_vs_llamacpp"] = max(r["prefill_tok_s"] for r in int4) / peer["prefill_tok_s"]
    return out


def format_report(report: dict) -> str:
    from thrifty.bench.report import markdown_table

    rows = []
    bf16 = next((r for r in report["rows"] if r["format"] == "bf16" and "error" not in r), None)
    for r in report["rows"]:
        if "error" in r:
            rows.append([r["format"], r["error"]] + [None] * (len(COLUMNS) - 2))
            continue
        loss = f"{r['ppl'] / bf16['ppl'] - 1:+.2%}" if bf16 else None
        rows.append([r["format"], r["linear_weight_bytes"] / 2**20, r["embedding_bytes"] / 2**20, r["ppl_code"],
                     r["ppl_prose"], loss, r["kl_vs_bf16"], r["greedy_match_vs_bf16"], r.get("greedy_match_vs_bf16_text"),
                     r["decode_tok_s"], r["prefill_tok_s"]])
    lines = [f"model {report['model']}, {report['threads']} threads, {report['hardware']['cores']} cores, "
             f"torch {report['hardware']['torch']}", "", markdown_table(COLUMNS, rows), ""]
    lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in report["targets"].items()]
    if report.get("defaults"):
        from thrifty.bench.quant_frontier import format_defaults

        lines += ["", format_defaults(report["defaults"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from thrifty.bench.report import write_json

    if args.threads < 1:
        raise InvalidRequestError("--threads must be >= 1", "", param="threads")
    report = run_quant(args)
    print(format_report(report))
    if args.json:
        print(f"\nwrote {write_json(args.json, report)}")
    if args.plot:
        from thrifty.bench.report import plot_quant_frontier

        print(f"wrote {plot_quant_frontier(report, args.plot)}")
