"""Tiny random-weight models written as real GGUF files, so unit tests exercise the real loader.

The vocabulary is GPT-2 style byte-level BPE: 256 byte tokens, a handful of merges, and the Qwen2 special
tokens, with Qwen2's ChatML template, so the tokenizer and chat paths run exactly as on the real model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t", "Ġ w", "Ġ o", "e n", "Ġ c",
          "i t", "i s", "a n", "o r", "e s", "Ġ b", "e d", "Ġ f", "in g", "Ġ p", "o u", "Ġa n", "a l", "a r",
          "Ġt o", "Ġ m", "Ġo f", "Ġ in", "Ġ d", "Ġ h", "Ġan d", "i c", "a s", "l e", "Ġt h", "i on", "o m",
          "l l", "en t", "Ġ n", "Ġ l", "s t", "Ġ re", "v e", "Ġ e", "r o", "l y", "Ġb e", "Ġ g", "Ġ T", "c t",
          "Ġ S", "i d", "o t", "Ġ I", "u t", "e t", "Ġ A", "Ġ is", "Ġ on", "i m", "a m", "o w", "a y", "a d",
          "s e", "Ġth at", "Ġ C", "i g", "Ġf or", "a c", "Ġ y", "v er", "u r", "Ġ u", "l d", "Ġs t", "Ġ M",
          "' s", "Ġ he", "Ġ it", "at ion", "it h", "i r", "c e", "Ġyo u", "i l", "Ġ B", "Ġw h", "o l", "Ġ P",
          "Ġw ith", "Ġ 1", "t er", "c h", "Ġa s", "Ġw e", "Ġ (", "n d", "i ll", "Ġ D", "i f", "Ġ 2", "a g",
          "er s", "k e", "Ġ \"", "Ġ H", "e m", "Ġc on", "Ġ W", "Ġ R", "he r", "Ġw as", "Ġ r", "o d", "Ġ F",
          "u l", "at e", "Ġa t", "r i", "p p", "o re", "ĠT he", "Ġs e", "u s", "Ġp ro", "Ġh a", "u m", "Ġa re",
          "Ġd e", "a in", "an d", "Ġo r", "ig h", "es t", "is t", "a b", "r om", "Ġ N", "t h", "Ġc om", "Ġ G",
          "u n", "o p", "0 0", "Ġ L", "Ġn ot", "es s", "Ġe x", "Ġ v", "re s", "Ġ E", "e w", "it y", "an t",
          "Ġb y", "e l", "o s", "or t", "o c", "q u", "Ġf rom", "Ġha ve", "Ġs u", "i ve", "ou ld", "Ġs h",
          "Ġth is", "n t", "r a", "p e", "igh t", "ar t", "m ent", "Ġa l", "u st", "en d", "- -", "al l",
          "Ġ O", "ac k", "Ġc h", "Ġ le", "i es", "re d", "ar d", "â Ģ", "ou t", "Ġ J", "Ġa b", "e ar", "i v",
          "al ly", "ou r", "o st", "g h", "p t", "Ġp l", "as t", "Ġc an", "a k", "om e", "u d", "T he",
          "Ġh is", "Ġd o", "Ġg o", "Ġh as", "g e", "' t", "Ġ U", "r ou", "Ġs a", "Ġ j", "Ġb ut", "Ġw or",
          "Ġa ll", "e ct", "Ġ k", "am e", "Ġw ill", "o k", "Ġw he", "Ġthe y", "id e", "0 1", "f f", "ic h",
          "p l", "t her", "Ġt r", ". .", "Ġin t", "i e", "u re", "ag e", "Ġn e", "i al", "a p", "in e",
          "ic e", "Ġm e", "Ġo ut", "an s", "on e", "on g", "ion s", "Ġwh o", "Ġ K", "Ġu p", "Ġthe ir",
          "Ġa d", "Ġ 3", "Ġu s", "at ed", "ou s", "Ġm ore", "u e", "o g", "ĠS t", "in d", "i ke", "Ġs o",
          "i me", "p er", ".\" ", "b er", "i z", "a ct", "Ġon e", "Ġsa id", "Ġ -", "a re", "Ġyou r", "c c",
          "ĠT h", "Ġc l", "e p", "a ke", "ab le", "i p", "Ġcon t", "Ġwh ich", "i a", "Ġ im", "Ġab out",
          "Ġwe re", "ver y", "u b", "Ġh ad", "Ġ en", "Ġcom p", ", \"", "ĠI n", "Ġu n", "Ġa g", "i re",
          "ac e", "a u", "ar y", "Ġw ould", "as s", "r y", "Ġ âĢ", "c l", "o ok", "e re", "s o", "Ġ V",
          "ig n", "i b", "Ġof f", "Ġt e", "v en", "Ġ Y", "i le", "o se", "it e", "or m", "Ġ2 01", "Ġre s",
          "Ġm an", "Ġp er", "Ġo ther", "or d", "ul t", "Ġbe en", "Ġl ike", "as e", "an ce", "k s", "ay s",
          "ow n", "en ce", "Ġd is", "ct ion", "Ġan y", "Ġa pp", "Ġs p", "in t", "res s", "ation s", "a il",
          "Ġ 4", "ic al", "Ġthe m", "Ġhe r", "ou nt", "ĠC h", "Ġa r", "Ġ if", "Ġthe re", "Ġp e", "Ġy ear",
          "a v", "Ġm y", "Ġs ome", "Ġwhe n", "ou gh", "ac h", "Ġth an", "r u", "on d", "ic k", "Ġo ver",
          "ve l", "Ġ qu", "Ċ Ċ", "Ġs c", "re at", "re e", "ĠI t", "ou nd", "p ort", "Ġal so", "Ġp art",
          "f ter", "Ġk n", "Ġbe c", "Ġt ime", "en s", "Ġ 5", "op le", "Ġwh at", "Ġn o", "d u", "m er",
          "an g", "Ġn ew", "-- --", "Ġg et", "or y", "it ion", "ing s", "Ġj ust", "Ġint o", "Ġ 0", "ent s",
          "o ve", "t e", "Ġpe ople", "Ġp re", "Ġit s", "Ġre c", "Ġt w", "i an", "ir st", "ar k", "or s",
          "Ġwor k", "ad e", "o b", "Ġs he", "Ġo ur", "w n", "in k", "l ic", "Ġ1 9", "ĠH e", "is h",
          "nd er", "au se", "Ġh im", "on s", "Ġ [", "Ġ ro", "f orm", "i ld", "at es", "ver s", "Ġon ly",
          "o ll", "Ġs pe", "c k", "e ll", "am p", "Ġa cc", "Ġb l", "i ous", "ur n", "f t", "o od", "Ġh ow",
          "he d", "Ġ '", "Ġa fter", "a w", "Ġat t", "o v", "n e", "Ġpl ay", "er v", "ic t", "Ġc ould",
          "it t", "Ġa m", "Ġf irst", "Ġ 6", "Ġa ct", "Ġ $", "e c", "h ing", "u al", "u ll", "Ġcom m",
          "o y", "o ld", "c es", "at er", "Ġf e", "Ġbe t", "w e", "if f", "Ġtw o", "oc k", "Ġb ack",
          ") .", "id ent", "Ġu nder", "rou gh", "se l", "x t", "Ġm ay", "rou nd", "Ġp o", "p h", "is s",
          "Ġd es", "Ġm ost", "Ġd id", "Ġad d", "j ect", "Ġin c", "f ore", "Ġp ol", "on t", "Ġag ain",
          "cl ud", "ter n", "Ġkn ow", "Ġne ed", "Ġcon s", "Ġc o", "Ġ .", "Ġw ant", "Ġse e", "Ġ 7",
          "n ing", "i ew", "ĠTh is", "c ed", "Ġe ven", "Ġin d", "t y", "ĠW e", "at h", "Ġthe se",
          "Ġp r", "Ġu se", "Ġbec ause", "Ġf l", "n g", "Ġn ow", "ĠâĢ ĵ", "c om", "is e", "Ġm ake",
          "Ġthe n", "ow er", "Ġe very", "ĠU n", "Ġse c", "os s", "u ch", "Ġe m", "Ġ =", "ĠR e", "i ed",
          "r it", "Ġin v", "le ct", "Ġsu pp", "at ing", "Ġl ook", "m an", "pe ct", "Ġ 8", "r ow",
          "Ġb u", "Ġwhe re", "if ic", "Ġyear s", "i ly", "Ġd iff", "Ġsh ould", "Ġre m", "T h", "I n",
          "Ġe v", "d ay", "' re", "ri b", "Ġre l", "s s", "Ġde f", "Ġr ight", "Ġs y", ") ,", "l es",
          "00 0", "he n", "Ġth rough", "ĠT r", "_ _", "Ġw ay", "Ġd on", "Ġ ,", "Ġ1 0", "as ed", "Ġas s",
          "ub lic", "Ġre g", "ĠA nd", "i x", "Ġ very", "Ġin clud", "ot her", "Ġim p", "ot h", "Ġsu b",
          "ĠâĢ Ķ", "Ġbe ing", "ar g", "ĠW h", "= =", "ib le", "Ġdo es", "an ge", "r am", "Ġ 9", "er t",
          "p s", "it ed", "ation al", "Ġb r", "Ġd own", "Ġman y", "ak ing", "Ġc all", "ur ing", "it ies",
          "Ġp h", "ic s", "al s", "Ġde c", "at ive", "en er", "Ġbe fore", "il ity", "Ġwe ll", "Ġm uch",
          "ers on", "Ġth ose", "Ġsu ch", "Ġ ke", "Ġ end", "ĠB ut", "as on", "t ing", "Ġl ong", "e f",
          "Ġth ink", "y s", "Ġbe l", "Ġs m", "it s", "a x", "Ġo wn", "Ġpro v", "Ġs et", "if e", "ment s",
          "b le", "w ard", "Ġsh ow", "Ġp res", "m s", "om et", "Ġo b", "Ġs ay", "ĠS h", "t s", "f ul",
          "Ġe ff", "Ġg u", "Ġin st", "u nd", "re n", "c ess", "Ġ ent", "ĠY ou", "Ġgo od", "Ġst art",
          "in ce", "Ġm ade", "t t", "st em", "ol og", "u p", "Ġ |", "um p", "Ġhe l", "ver n", "ul ar",
          "u ally", "Ġa c", "Ġm on", "Ġl ast", "Ġ2 00", "1 0", "Ġst ud", "u res", "ĠA r", "sel f", "ar s",
          "mer ic", "u es", "c y", "Ġm in", "oll ow", "Ġc ol", "i o", "Ġm od", "Ġc ount", "ĠC om",
          "he s", "Ġf in", "a ir", "i er", "âĢ Ķ", "re ad", "an k", "at ch", "e ver", "Ġst r", "Ġpo int",
          "or k", "ĠN ew", "Ġs ur", "o ol", "al k", "em ent", "Ġus ed", "ra ct", "we en", "Ġs ame",
          "ou n", "ĠA l", "c i", "Ġdiff ere", "Ġwh ile", "-------- --------", "Ġg ame", "ce pt", "Ġs im",
          ".. .", "Ġin ter", "e k", "Ġre port", "Ġpro du", "Ġst ill", "l ed", "a h", "Ġhe re", "Ġwor ld",
          "Ġth ough", "Ġn um", "ar ch", "im es", "al e", "ĠS e", "ĠI f", "/ /", "ĠL e", "Ġre t", "Ġre f",
          "Ġtr ans", "n er", "ut ion", "ter s", "Ġt ake", "ĠC l", "Ġcon f", "w ay", "a ve", "Ġgo ing",
          "Ġs l", "u g", "ĠA meric", "Ġspe c", "Ġh and", "Ġbet ween", "ist s", "ĠD e", "o ot", "I t",
          "Ġe ar", "Ġagain st", "Ġh igh", "g an", "a z", "at her", "Ġex p", "Ġo p", "Ġin s", "Ġg r",
          "Ġhel p", "Ġre qu", "et s", "in s", "ĠP ro", "is m", "Ġf ound", "l and", "at a", "us s",
          "am es", "Ġp erson", "Ġg reat", "p r", "Ġs ign", "ĠA n", "' ve", "Ġs omet", "Ġs er", "h ip",
          "Ġr un", "Ġ :", "Ġt er", "ire ct", "Ġf ollow", "Ġd et", "ic es", "Ġf ind", "1 2", "Ġm em",
          "Ġc r", "e red", "e x", "Ġex t", "ut h", "en se", "c o", "Ġte am", "v ing", "ou se", "as h",
          "at t", "v ed", "Ġsy stem", "ĠA s", "d er", "iv es", "m in", "Ġle ad", "ĠB l", "c ent",
          "Ġa round", "Ġgo vern", "Ġc ur", "vel op", "an y", "Ġc our", "al th", "ag es", "iz e",
          "Ġc ar", "od e", "Ġl aw", "Ġre ad", "' m", "c on", "Ġre al", "Ġsupp ort", "Ġ1 2", ".. ..",
          "Ġre ally", "n ess", "Ġf act", "Ġd ay", "Ġb oth", "y ing", "Ġs erv", "ĠF or", "Ġth ree",
          "Ġw om", "Ġm ed", "od y", "ĠThe y", "5 0", "Ġex per", "t on", "Ġe ach", "ak es", "Ġc he",
          "Ġc re", "in es", "Ġre p", "1 9", "g g", "ill ion", "Ġg rou", "ut e", "i k", "W e", "g et",
          "E R", "Ġm et", "Ġs ays", "o x", "Ġd uring", "er n", "iz ed", "a red", "Ġf am", "ic ally",
          "Ġha pp", "ĠI s", "Ġch ar", "m ed", "v ent", "Ġg ener", "i ent", "p le", "i et", "re nt",
          "1 1", "v es", "pt ion", "Ġ2 0", "form ation", "Ġc or", "Ġoff ic", "ie ld", "Ġto o",
          "is ion", "Ġin f", "Ġ Z", "t he", "o ad", "Ġp ublic", "Ġpro g", "r ic", "* *", "Ġw ar",
          "Ġp ower", "v iew", "Ġf ew", "Ġl oc", "Ġdiffere nt", "Ġst ate", "Ġhe ad", "Ġcom pan",
          "a ff", "d ef", "( n", "Ġ re", ": Ċ", "Ġ Ġ", "ĠĠ ĠĠ", "ĠĠĠĠ ĠĠĠĠ"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_vocab(num_merges: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a byte-level BPE vocabulary with Qwen2's special tokens; fewer merges
    give another vocabulary (the special tokens' ids move)."""
    tokens = list(bytes_to_unicode().values())
    seen = set(tokens)
    merges: list[str] = []
    for merge in MERGES[:num_merges]:
        left, right = merge.split(" ")
        if left in seen and right in seen and left + right not in seen:
            tokens.append(left + right)
            seen.add(left + right)
            merges.append(merge)
    types = [1] * len(tokens) + [3] * len(SPECIAL_TOKENS)  # 1 normal, 3 control
    return tokens + SPECIAL_TOKENS, merges, types


@dataclass(slots=True)
class TinySpec:
    architecture: str = "qwen2"
    num_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    context_length: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    seed: int = 0
    norm_spread: float = 0.0     # > 0: norm weights times exp(spread * N(0, 1)), outlier channels as in LLMs
    file_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    sliding_window: int | None = None       # gemma3: the local layers' window
    sliding_window_pattern: int = 6          # gemma3: every Nth layer global
    perturb: float = 0.0         # > 0: every weight plus this much noise from perturb_seed (a near copy of seed's
    perturb_seed: int = 1        # model: a draft that agrees with it often but not always)
    num_merges: int | None = None  # fewer BPE merges: another vocabulary


def tiny_gemma3(**overrides) -> TinySpec:
    """A Gemma 3 of 4 layers, local / global alternating, with an 8-token window: prompts of a few dozen tokens
    span many windows."""
    return TinySpec(**{"architecture": "gemma3", "num_layers": 4, "num_kv_heads": 1, "rope_theta": 1e6,
                       "tie_word_embeddings": True, "attention_bias": False, "sliding_window": 8,
                       "sliding_window_pattern": 2, **overrides})


def write_tiny_gguf(path: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a random-weight model of `spec` (Qwen2 by default) as a GGUF file and return its path."""
    spec = spec or TinySpec()
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    noise = np.random.default_rng(spec.perturb_seed)
    tokens, merges, types = tiny_vocab(spec.num_merges)
    vocab = len(tokens)
    head_dim = spec.hidden_size // spec.num_heads
    arch = spec.architecture

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(spec.num_layers)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(int(spec.file_type))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    if arch == "gemma3":
        w.add_sliding_window(spec.sliding_window)
        w.add_uint32("gemma3.attention.sliding_window_pattern", spec.sliding_window_pattern)

    def tensor(name: str, *shape: int, scale: float = 0.08, around: float = 0.0) -> None:
        data = (around + scale * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith("norm.weight") and spec.norm_spread > 0:
            data *= np.exp(spec.norm_spread * rng.standard_normal(shape)).astype(np.float32)
        if spec.perturb > 0:
            data += (spec.perturb * scale * noise.standard_normal(shape)).astype(np.float32)
        if spec.file_type == gguf.GGMLQuantizationType.F32 or len(shape) == 1:
            w.add_tensor(name, data)
        else:
            q = gguf.quants.quantize(data, spec.file_type)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=spec.file_type)

    h, kv = spec.hidden_size, spec.num_kv_heads * head_dim
    tensor("token_embd.weight", vocab, h, scale=0.5)
    for i in range(spec.num_layers):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", h, scale=0.1, around=1.0)
        tensor(p + "attn_q.weight", h, h)
        tensor(p + "attn_k.weight", kv, h)
        tensor(p + "attn_v.weight", kv, h)
        if spec.attention_bias:
            tensor(p + "attn_q.bias", h, scale=0.1)
            tensor(p + "attn_k.bias", kv, scale=0.1)
            tensor(p + "attn_v.bias", kv, scale=0.1)
        tensor(p + "attn_output.weight", h, h)
        tensor(p + "ffn_norm.weight", h, scale=0.1, around=1.0)
        if arch == "gemma3":  # llama.cpp's converter stores Gemma's norms as 1 + weight, hence around 1
            for norm, size in (("attn_q_norm", head_dim), ("attn_k_norm", head_dim), ("post_attention_norm", h),
                               ("post_ffw_norm", h)):
                tensor(p + norm + ".weight", size, scale=0.1, around=1.0)
        tensor(p + "ffn_gate.weight", spec.intermediate_size, h)
        tensor(p + "ffn_up.weight", spec.intermediate_size, h)
        tensor(p + "ffn_down.weight", h, spec.intermediate_size)
    tensor("output_norm.weight", h, scale=0.1, around=1.0)
    if not spec.tie_word_embeddings:
        tensor("output.weight", vocab, h, scale=0.3)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
