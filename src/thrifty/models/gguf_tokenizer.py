"""Tokenizers built straight from GGUF metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the vocabulary, the merges (byte-level
BPE) or the scores (SentencePiece), the token types and the special token ids. This module turns that into a
`tokenizers.Tokenizer` that gives the same ids as transformers' own GGUF import (the reference the tests
compare against), in well under the ~10-45 s that import takes:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. `tokenizer.ggml.pre` picks the split regex the merges were
  learned with (qwen2, llama3-style, or GPT-2's own). No NFC normalizer: neither llama.cpp nor transformers'
  GGUF import applies one, so non-NFC input (decomposed accents) gives different ids than the model repo's
  tokenizer.json would; NFC text is identical.
- `"llama"`: SentencePiece-style BPE with byte fallback (`<0xNN>`) and '▁' for spaces. Such files list no
  merges, so they are derived: every split of a token into two tokens is a merge, ranked by the token's score
  (for Gemma by its position in the file, which is its merge order).
- Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens; both are
  matched whole in text.

`meta_hash` names a vocabulary for the cache of built tokenizers (thrifty.models.tokenizer).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from thrifty.errors import ModelFileError, UnsupportedModelError

# Bump when the way a tokenizer is built changes, so stale cache entries are not reused.
BUILD_VERSION = 1

# Split regexes of byte-level BPE vocabularies, by `tokenizer.ggml.pre`. They decide which pieces of text
# merges may join: contractions, letters with one leading non-letter, digits one at a time (qwen2) or up to
# three (llama3), punctuation runs with trailing newlines, newline runs, and whitespace runs that leave the
# last space for the next word.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = None  # ByteLevel's built-in regex
BYTE_LEVEL_PRE = {
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
    "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
    "default": GPT2_SPLIT, "gpt2": GPT2_SPLIT, "gpt-2": GPT2_SPLIT,
}

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's visible space


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, ...) are shifted to code points 256 and up in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in set(keep)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table


def meta_hash(md: dict[str, Any]) -> str:
    """A content hash of everything in the metadata that shapes the built tokenizer."""
    h = hashlib.sha256(f"thrifty-tokenizer/{BUILD_VERSION}/tokenizers-{tokenizers.__version__}".encode())
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"):
        h.update(f"\0{key}={md.get(key)!r}".encode())
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        values = md.get(key) or []
        h.update(f"\0{key}#{len(values)}\0".encode())
        h.update("\0".join(values).encode("utf-8", "surrogatepass"))
    for key, dtype in (("tokenizer.ggml.token_type", np.int32), ("tokenizer.ggml.scores", np.float32)):
        h.update(f"\0{key}\0".encode())
        h.update(np.asarray(md.get(key) or [], dtype=dtype).tobytes())
    return h.hexdigest()[:32]


def _post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None):
    """BOS/EOS around every encoded text (when the model asks for them) through a template."""
    pre = [bos] if bos is not None else []
    post = [eos] if eos is not None else []
    single = " ".join([*pre, "$A", *post])
    pair = " ".join([*pre, "$A", *post, *pre, "$B:1", *post])
    specials = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def _build_byte_level(md: dict[str, Any]) -> tokenizers.Tokenizer:
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE:
        raise UnsupportedModelError(f"unknown byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre)",
                                    f"thrifty knows {', '.join(sorted(BYTE_LEVEL_PRE))}")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    merges = md.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelFileError("the GGUF's byte-level BPE tokenizer has no tokenizer.ggml.merges",
                             "convert the model again with a current llama.cpp")
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    # Tokens outside the byte alphabet (raw added tokens in some files) are respelled byte by byte.
    spelled = [t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    model = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                       fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(model)
    split = BYTE_LEVEL_PRE[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, md, spelled, lambda i: spelled[i] == tokens[i])
    return tok


_HASH_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64


def _sentencepiece_merges(vocab: dict[str, int], scores: Sequence[float] | None) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, as BPE merges: best-ranked token first (highest score, or
    earliest in the file when `scores` is None), then longest left part, then longest right part; ties keep
    the file's order.

    Gemma has 1.2M candidate splits, too many to slice and look up one by one in Python within the time
    budget. So every token's characters get polynomial prefix hashes (mod 2**64, numpy), all candidate
    halves are tested against the vocabulary's hashes at once, and only the hits are sliced -- and checked
    against the vocabulary for real, so a hash collision can never add a merge.
    """
    tokens = list(vocab)
    count = len(tokens)
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=count)
    if count == 0 or lengths.max() < 2:
        return []
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=count)
    if scores is None:
        group = ids
    else:  # equal scores share a rank group
        group = np.unique(-np.asarray(scores, dtype=np.float64)[ids], return_inverse=True)[1]
    width = int(lengths.max())
    power = np.array([pow(_HASH_BASE, j, 1 << 64) for j in range(width + 1)], dtype=np.uint64)
    unpower = np.array([pow(_HASH_BASE, -j, 1 << 64) for j in range(width + 1)], dtype=np.uint64)
    codes = np.frombuffer("".join(tokens).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    starts = np.zeros(count, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    within = np.arange(codes.size, dtype=np.int64) - np.repeat(starts, lengths)
    with np.errstate(over="ignore"):  # wrap-around is the point
        prefix = np.zeros(codes.size + 1, dtype=np.uint64)   # prefix[p] = hash of all characters before p
        np.cumsum((codes.astype(np.uint64) + np.uint64(1)) * power[within], out=prefix[1:])
        whole = prefix[starts + lengths] - prefix[starts]
        splits = np.maximum(lengths - 1, 0)                  # token i, cut after k characters, 0 < k < len
        token = np.repeat(np.arange(count, dtype=np.int64), splits)
        first = np.zeros(count, dtype=np.int64)
        np.cumsum(splits[:-1], out=first[1:])
        cut = np.arange(token.size, dtype=np.int64) - np.repeat(first, splits) + 1
        start = starts[token]
        keep = np.isin(prefix[start + cut] - prefix[start], whole)
        token, cut, start = token[keep], cut[keep], start[keep]
        right = (prefix[start + lengths[token]] - prefix[start + cut]) * unpower[cut]  # shifted to position 0
        keep = np.isin(right, whole)
    token, cut = token[keep], cut[keep]
    order = np.lexsort((token, cut - lengths[token], -cut, group[token]))
    pairs = [(t[:k], t[k:]) for t, k in zip(map(tokens.__getitem__, token[order].tolist()), cut[order].tolist())]
    return [p for p in pairs if p[0] in vocab and p[1] in vocab]


def _build_sentencepiece(md: dict[str, Any]) -> tokenizers.Tokenizer:
    raw: list[str] = md["tokenizer.ggml.tokens"]
    arch = str(md.get("general.architecture", ""))
    # Files store whitespace-run tokens with real spaces; in the model they are spelled with '▁'.
    tokens = [t.replace(" ", SPACE) if " " in t and not t.strip() else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = None  # Gemma: the order in the file is the merge order (its scores agree for normal tokens)
    if not arch.startswith("gemma"):
        scores = md.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelFileError("the GGUF's SentencePiece tokenizer has no usable tokenizer.ggml.scores",
                                 "convert the model again with a current llama.cpp")
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = models.BPE(vocab=vocab, merges=_sentencepiece_merges(vocab, scores), unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if md.get("tokenizer.ggml.add_space_prefix", not arch.startswith("gemma")):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence(steps)
    _add_special_tokens(tok, md, tokens, lambda i: tokens[i] == raw[i])
    return tok


def _add_special_tokens(tok: tokenizers.Tokenizer, md: dict[str, Any], tokens: list[str], verbatim) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens, both matched whole
    in the raw text. Tokens the build had to respell are left to the model (their text form differs)."""
    types = md.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == CONTROL and verbatim(i)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == USER_DEFINED and verbatim(i)]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    token_id = {name: md.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos")}
    bos = token_id["bos"] if md.get("tokenizer.ggml.add_bos_token", False) else None
    eos = token_id["eos"] if md.get("tokenizer.ggml.add_eos_token", False) else None
    if bos is not None or eos is not None:
        tok.post_processor = _post_processor(tokens[bos] if bos is not None else None, bos,
                                             tokens[eos] if eos is not None else None, eos)


def build_from_metadata(md: dict[str, Any]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` for a GGUF's tokenizer metadata (no cache)."""
    kind = md.get("tokenizer.ggml.model")
    if not md.get("tokenizer.ggml.tokens"):
        raise ModelFileError("the GGUF has no tokenizer (tokenizer.ggml.tokens is missing)",
                             "use a GGUF converted with its tokenizer, or a Hugging Face folder with tokenizer.json")
    if kind == "gpt2":
        return _build_byte_level(md)
    if kind == "llama":
        return _build_sentencepiece(md)
    raise UnsupportedModelError(f"unknown GGUF tokenizer model {kind!r} (tokenizer.ggml.model)",
                                "thrifty builds 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) tokenizers")
