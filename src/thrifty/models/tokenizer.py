"""Tokenizers built straight from GGUF metadata (or a Hugging Face tokenizer.json), and chat templates.

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

The serialized tokenizer is cached under `home()/tokenizers/<hash of the vocabulary>.json`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from thrifty.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from thrifty.paths import atomic_write, home

if TYPE_CHECKING:
    from thrifty.models.detokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

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

# End-of-turn markers that stop generation besides EOS, where the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>")
SPACE = "\u2581"  # SentencePiece's visible space


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, ...) are shifted to code points 256 and up in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in set(keep)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table


def _meta_hash(md: dict[str, Any]) -> str:
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


class ChatTemplate:
    """A chat template compiled in jinja2's immutable sandbox, with the helpers Hugging Face templates use."""

    def __init__(self, source: str) -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ModelFileError(f"the model's chat template does not compile: {e}",
                                 "fix tokenizer.chat_template or pass a template of your own") from None

    def render(self, **variables: Any) -> str:
        return self._template.render(**{k: _plain(v) for k, v in variables.items()})


def _plain(value: Any) -> Any:
    """A fresh copy of `value` made of plain JSON types, so a template sees no caller objects or methods."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if hasattr(value, "model_dump"):  # pydantic models
        return _plain(value.model_dump(exclude_none=True))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, *, vocab_size: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, unk_token_id: int | None = None,
                 chat_template: str | None = None, add_bos_token: bool = False,
                 extra_stop_ids: Iterable[int] = ()) -> None:
        self.backend = backend
        self._vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._compiled: ChatTemplate | None = None
        stops = {eos_token_id, *extra_stop_ids}
        stops.update(backend.token_to_id(t) for t in END_OF_TURN_TOKENS)
        self._stop_ids = tuple(sorted(i for i in stops if i is not None))

    # ----- construction
    @classmethod
    def from_gguf(cls, gguf: Any, cache: bool = True) -> Tokenizer:
        """Build from a `GGUFFile`'s metadata, through the cache under home()/tokenizers/."""
        md = gguf.metadata
        backend = None
        path = None
        if cache:
            path = home() / "tokenizers" / f"{_meta_hash(md)}.json"
            if path.is_file():
                try:
                    backend = tokenizers.Tokenizer.from_file(str(path))
                except Exception as e:  # a damaged cache entry is rebuilt, never fatal
                    log.warning("ignoring unreadable tokenizer cache %s: %s", path, e)
        if backend is None:
            backend = build_from_metadata(md)
            if path is not None:
                try:
                    with atomic_write(path, "w") as f:
                        f.write(backend.to_str())
                except OSError as e:
                    log.warning("could not cache the tokenizer at %s: %s", path, e)
        tokens = md["tokenizer.ggml.tokens"]

        def token_id(name: str) -> int | None:
            i = md.get(f"tokenizer.ggml.{name}_token_id")
            return int(i) if i is not None and 0 <= int(i) < len(tokens) else None

        return cls(backend, vocab_size=len(tokens), bos_token_id=token_id("bos"), eos_token_id=token_id("eos"),
                   pad_token_id=token_id("padding"), unk_token_id=token_id("unknown"),
                   chat_template=md.get("tokenizer.chat_template"),
                   add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ModelFileError(f"{folder} has no tokenizer.json",
                                 "save the tokenizer with transformers' save_pretrained into the model folder")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:
            raise ModelFileError(f"{tj} is not a valid tokenizer.json ({e})", "save the tokenizer again") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

        def token_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        generation = _read_json(folder / "generation_config.json")
        eos = generation.get("eos_token_id")
        extra = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
        eos_id = token_id("eos_token")
        if eos_id is None and extra:
            eos_id = extra[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # what the post-processor does is what counts
            bos_id = token_id("bos_token")
            add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]
        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_id=eos_id,
                   pad_token_id=token_id("pad_token"), unk_token_id=token_id("unk_token"),
                   chat_template=template, add_bos_token=bool(add_bos), extra_stop_ids=extra)

    # ----- properties
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """EOS plus the end-of-turn tokens this vocabulary has."""
        return self._stop_ids

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ----- encoding and decoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds BOS (and EOS) where the model asks for them.
        Special tokens written in the text ("<|im_start|>") are always matched as single ids."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a string, not {type(text).__name__}", param="prompt")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        for t in texts:
            if not isinstance(t, str):
                raise InvalidRequestError(f"texts to encode must be strings, not {type(t).__name__}", param="prompt")
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{self._vocab_size - 1})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def incremental_detokenizer(self, prompt_ids: Iterable[int] = (),
                                skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A streaming detokenizer for the tokens generated after `prompt_ids` (its last few are context)."""
        from thrifty.models.detokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    # ----- chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[dict[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt text for `messages`, rendered as Hugging Face does (sandboxed jinja2)."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template, so chat messages cannot be turned "
                                      "into a prompt", "send a plain completion prompt instead", param="messages")
        if self._compiled is None or self._compiled.source != self.chat_template:
            self._compiled = ChatTemplate(self.chat_template)
        specials = {name: self.id_to_token(i) for name, i in (
            ("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id),
            ("pad_token", self.pad_token_id), ("unk_token", self.unk_token_id)) if i is not None}
        import jinja2

        try:
            return self._compiled.render(**{**specials, **extra, "messages": list(messages), "tools": tools,
                                            "add_generation_prompt": add_generation_prompt})
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected the messages: {e}", param="messages") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e})", "restore the file from the model's source") from None
    return data if isinstance(data, dict) else {}
