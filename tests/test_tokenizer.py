"""Fast tokenizer tests on tiny GGUF vocabularies: byte-level BPE (Qwen2 style) and SentencePiece (Gemma style)."""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import gguf
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_gguf import CHATML_TEMPLATE, SPECIAL_TOKENS, bytes_to_unicode, tiny_vocab

from thrifty.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from thrifty.models import tokenizer as tokmod
from thrifty.models.detokenizer import IncrementalDetokenizer
from thrifty.models.gguf_file import GGUFFile
from thrifty.models.tokenizer import Tokenizer

VARIED = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "Hello world", "hello  world   x  ", "The theory of everything.",
    "def f(x):\n    return x ** 2\n\n", "for (int i = 0; i < n; ++i) {\r\n\tsum += a[i];\r\n}",
    "I'm sure they'll say WE'VE won", "1234567890 3.14159 -42 1e-9", "café naïve Ünïcödé ß", "日本語のテキスト",
    "中文，标点。", "😀 🤖 👨‍👩‍👧‍👦 🇫🇷", "Привет, мир", "مرحبا", "नमस्ते", "x" * 200, "\x00\x01\x7f",
    "a\u00a0b\u2003c\u200b", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><|endoftext|>",
    "text<|im_end|>more", "<|im_start", "|im_end|>",
]


@pytest.fixture(scope="module")
def tok(tiny_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(tiny_gguf), cache=False)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("THRIFTY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---------------------------------------------------------------- an independent byte-level BPE in pure Python
class ReferenceBPE:
    """GPT-2 style BPE straight from the definition: split out special tokens, split text with the Qwen2
    regex, map bytes to the printable alphabet, merge the lowest-ranked adjacent pair until none is left."""

    def __init__(self) -> None:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tokens, merges, _ = tiny_vocab()
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.alphabet = bytes_to_unicode()
        self.split = regex.compile(PRETOKENIZE_REGEX)
        self.special = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

    def bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk in self.special.split(text):
            if chunk in SPECIAL_TOKENS:
                out.append(self.ids[chunk])
                continue
            for piece in self.split.findall(chunk):
                spelled = "".join(self.alphabet[b] for b in piece.encode("utf-8"))
                out.extend(self.ids[p] for p in self.bpe(spelled))
        return out


@pytest.fixture(scope="module")
def reference() -> ReferenceBPE:
    return ReferenceBPE()


# ---------------------------------------------------------------- byte-level BPE (tiny Qwen2 GGUF)
@pytest.mark.parametrize("text", VARIED)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == re.sub("|".join(map(re.escape, SPECIAL_TOKENS)), "", text)


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    tokens, _, _ = tiny_vocab()
    start, end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    assert ids.count(start) == 1 and ids.count(end) == 1
    assert tok.encode("<|im_start|>") == [start]
    assert tok.decode(ids) == "user\nhi"
    assert tok.id_to_token(start) == "<|im_start|>" and tok.token_to_id("<|im_end|>") == end


def test_special_token_ids_and_stops(tok: Tokenizer) -> None:
    tokens, _, _ = tiny_vocab()
    assert tok.vocab_size == len(tokens)
    assert tok.bos_token_id == tokens.index("<|endoftext|>")
    assert tok.eos_token_id == tokens.index("<|im_end|>")
    assert tok.pad_token_id == tokens.index("<|endoftext|>")
    assert set(tok.stop_token_ids) == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert not tok.add_bos_token
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(VARIED) == [tok.encode(t) for t in VARIED]


@pytest.mark.parametrize("text", VARIED)
def test_matches_pure_python_reference(tok: Tokenizer, reference: ReferenceBPE, text: str) -> None:
    assert tok.encode(text) == reference.encode(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"the and of in to is thereforeTHE0123 \t\n\r.,'!-_() é日😀\u0301",
                                 "the", " the", "ing", "  ", "<|", "|>", *SPECIAL_TOKENS]), max_size=30).map("".join))
def test_matches_reference_on_random_text(tok: Tokenizer, reference: ReferenceBPE, text: str) -> None:
    assert tok.encode(text) == reference.encode(text)


def test_matches_transformers_qwen2_tokenizer(tok: Tokenizer, tmp_path: Path) -> None:
    """transformers' Qwen2Tokenizer from vocab.json + merges.txt. It normalizes to NFC (the model repo's
    tokenizer.json does; GGUF tokenizers, llama.cpp and transformers' GGUF import don't), so NFC text only."""
    from transformers import Qwen2Tokenizer

    tokens, merges, _ = tiny_vocab()
    plain = tokens[:-len(SPECIAL_TOKENS)]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(plain)}, ensure_ascii=False))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    ref = Qwen2Tokenizer.from_pretrained(tmp_path)
    ref.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    assert [ref.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [tokens.index(t) for t in SPECIAL_TOKENS]
    for text in VARIED:
        assert unicodedata.is_normalized("NFC", text)
        assert tok.encode(text) == ref.encode(text), text


def test_chat_template_renders_chatml(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    prompt = tok.apply_chat_template(messages)
    assert prompt == expected + "<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 5


def test_chat_template_helpers_and_sandbox(tiny_gguf: Path) -> None:
    template = ("{{ bos_token }}{{ messages | tojson }}{{ tools | tojson(indent=1) }}{{ flag }}"
                "{% if messages | length > 2 %}{{ raise_exception('too many') }}{% endif %}{{ strftime_now('%Y') | length }}")
    t = Tokenizer.from_gguf(GGUFFile(tiny_gguf), cache=False)
    t.chat_template = template
    out = t.apply_chat_template([{"role": "user", "content": "é<&>"}], tools=[{"name": "f"}], flag="X")
    assert out == '<|endoftext|>[{"role": "user", "content": "é<&>"}][\n {\n  "name": "f"\n }\n]X4'
    with pytest.raises(InvalidRequestError, match="too many"):
        t.apply_chat_template([{"role": "user", "content": "a"}] * 3)
    t.chat_template = "{{ messages.__class__ }}{{ messages[0].__init__ }}"  # the sandbox hides internals
    assert t.apply_chat_template([{"role": "user", "content": "a"}]) == ""
    t.chat_template = "{{ messages.append(1) }}"  # and refuses to mutate (immutable sandbox)
    with pytest.raises(InvalidRequestError, match="chat template"):
        t.apply_chat_template([{"role": "user", "content": "a"}])
    t.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "a"}])


# ---------------------------------------------------------------- streaming detokenizer
STREAMED = ["Hello, world! 😀👍🏽 日本語テキスト e\u0301 ñ", "👨‍👩‍👧‍👦🇫🇷🇩🇪 𝔘𝔫𝔦", "中文，标点。\n\tcode = 1",
            "<|im_start|>assistant\n答案是 42 🎉<|im_end|>", "\ufffd literal replacement char \ufffd"]


@pytest.mark.parametrize("text", STREAMED)
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_matches_full_decode(tok: Tokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip) == detok.text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)  # never a broken character
    assert detok.output_ids == ids


def test_incremental_detokenizer_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")  # four bytes -> several byte tokens in the tiny vocabulary
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_incremental_detokenizer_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode("the cat sat on the mat. " * 200)
    detok = IncrementalDetokenizer(tok)
    widest = 0
    for i in ids:
        detok.add(i)
        widest = max(widest, len(detok.ids) - detok.prefix_offset)
    assert widest <= 4
    assert detok.text + detok.flush() == tok.decode(ids)


def test_incremental_detokenizer_with_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("Say hi:")
    answer = tok.encode(" hello 😀 there")
    detok = tok.incremental_detokenizer(prompt, skip_special_tokens=True)
    text = detok.add_many(answer) + detok.flush()
    assert text == " hello 😀 there"
    assert detok.output_ids == answer


def test_incremental_detokenizer_flushes_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode("ab😀")[:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(tok)
    text = detok.add_many(ids)
    assert text == "ab"
    assert text + detok.flush() == tok.decode(ids)


# ---------------------------------------------------------------- cache, folders, errors
def test_cache_hit_loads_the_same_tokenizer(tiny_gguf: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = GGUFFile(tiny_gguf)
    first = Tokenizer.from_gguf(g)
    cached = list((home / "tokenizers").glob("*.json"))
    assert len(cached) == 1 and not list((home / "tokenizers").glob(".*partial"))

    def no_build(md):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(tokmod, "build_from_metadata", no_build)
    second = Tokenizer.from_gguf(g)
    assert second.backend.to_str() == first.backend.to_str()
    assert [second.encode(t) for t in VARIED] == [first.encode(t) for t in VARIED]
    assert second.chat_template == first.chat_template and second.stop_token_ids == first.stop_token_ids


def test_damaged_cache_is_rebuilt(tiny_gguf: Path, home: Path) -> None:
    g = GGUFFile(tiny_gguf)
    good = Tokenizer.from_gguf(g)
    (entry,) = (home / "tokenizers").glob("*.json")
    entry.write_text("{ not json")
    again = Tokenizer.from_gguf(g)
    assert again.encode("hello there") == good.encode("hello there")
    assert json.loads(entry.read_text())["model"]["type"] == "BPE"


def test_cache_key_follows_the_vocabulary(tiny_gguf: Path) -> None:
    md = dict(GGUFFile(tiny_gguf).metadata)
    key = tokmod._meta_hash(md)
    assert key == tokmod._meta_hash(dict(md))
    md["tokenizer.ggml.merges"] = md["tokenizer.ggml.merges"][:-1]
    assert tokmod._meta_hash(md) != key


def test_from_hf_folder(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "add_bos_token": False}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|endoftext|>")]}))
    hf = Tokenizer.from_hf_folder(tmp_path)
    assert [hf.encode(t) for t in VARIED] == [tok.encode(t) for t in VARIED]
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id and hf.bos_token_id is None
    assert set(hf.stop_token_ids) == set(tok.stop_token_ids)
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages) == tok.apply_chat_template(messages)
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path / "missing")


class FakeGGUF:
    def __init__(self, metadata: dict) -> None:
        self.metadata = metadata


def test_unknown_pre_tokenizer_is_named(tiny_gguf: Path) -> None:
    md = dict(GGUFFile(tiny_gguf).metadata, **{"tokenizer.ggml.pre": "klingon-bpe"})
    with pytest.raises(UnsupportedModelError, match="klingon-bpe"):
        Tokenizer.from_gguf(FakeGGUF(md), cache=False)


def test_unknown_tokenizer_model_is_named(tiny_gguf: Path) -> None:
    md = dict(GGUFFile(tiny_gguf).metadata, **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedModelError, match="bert"):
        Tokenizer.from_gguf(FakeGGUF(md), cache=False)
    with pytest.raises(ModelFileError, match="no tokenizer"):
        Tokenizer.from_gguf(FakeGGUF({"general.architecture": "qwen2"}), cache=False)


def test_pre_tokenizers_split_digits_as_their_models_do(tiny_gguf: Path) -> None:
    md = dict(GGUFFile(tiny_gguf).metadata)
    runs = {}
    for pre in ("qwen2", "llama-bpe", "gpt2"):
        t = Tokenizer.from_gguf(FakeGGUF(dict(md, **{"tokenizer.ggml.pre": pre})), cache=False)
        runs[pre] = [t.id_to_token(i) for i in t.encode("1212121")]
        assert t.decode(t.encode("x = 12345  y")) == "x = 12345  y"
    assert runs["qwen2"] == list("1212121")                    # digits one at a time
    assert runs["llama-bpe"] == ["12", "1", "2", "12", "1"]     # runs of up to three digits
    assert runs["gpt2"] == ["12", "12", "12", "1"]              # one run


def test_decode_rejects_ids_outside_the_vocabulary(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(InvalidRequestError):
        tok.encode(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- SentencePiece (tiny Gemma-style GGUF)
SP_PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "a", "n", "▁t", "he", "hel", "hello", "▁hello", "ll",
             "▁the", "lo", "▁w", "or", "ld", "▁wor", "▁world", "an", "▁an", "▁and", "ha", "at", "▁that"]


def write_tiny_sentencepiece_gguf(path: Path, arch: str = "gemma3") -> list[str]:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n\n", "  "]
    types = [3, 3, 3, 3, 3, 3, 4, 4]
    scores = [-1000.0] * 6 + [0.0, 0.0]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    scores += [0.0] * 256
    for i, piece in enumerate(SP_PIECES):  # file order is merge order: earlier is better
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    if arch == "gemma3":
        w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, list[str]]:
    path = tmp_path_factory.mktemp("sp") / "tiny-sp.gguf"
    tokens = write_tiny_sentencepiece_gguf(path)
    return Tokenizer.from_gguf(GGUFFile(path), cache=False), tokens


def test_sentencepiece_pieces_bos_and_byte_fallback(sp: tuple[Tokenizer, list[str]]) -> None:
    t, tokens = sp
    pieces = [t.id_to_token(i) for i in t.encode("hello world")]
    assert pieces == ["<bos>", "hello", "▁world"]
    assert t.encode("hello", add_special_tokens=False) == [tokens.index("hello")]
    assert [t.id_to_token(i) for i in t.encode("日", add_special_tokens=False)] == ["<0xE6>", "<0x97>", "<0xA5>"]
    assert [t.id_to_token(i) for i in t.encode("<start_of_turn>he\n\nthat", add_special_tokens=False)] == \
        ["<start_of_turn>", "he", "\n\n", "t", "ha", "t"]
    assert [t.id_to_token(i) for i in t.encode("  the", add_special_tokens=False)] == ["▁▁", "t", "he"]
    assert t.bos_token_id == 2 and t.eos_token_id == 1 and t.add_bos_token
    assert t.stop_token_ids == (1, tokens.index("<end_of_turn>"))


@pytest.mark.parametrize("text", ["hello world", " hello  the world ", "hé 日本 😀", "a\n\nb", "",
                                  "<start_of_turn>user\nhi<end_of_turn>", "   "])
def test_sentencepiece_round_trip_and_streaming(sp: tuple[Tokenizer, list[str]], text: str) -> None:
    t, _ = sp
    ids = t.encode(text)
    assert t.decode(ids) == re.sub("<start_of_turn>|<end_of_turn>", "", text)
    assert t.decode(ids, skip_special_tokens=False) == "<bos>" + text
    detok = IncrementalDetokenizer(t)
    streamed = detok.add_many(ids) + detok.flush()
    assert streamed == t.decode(ids)


def reference_sentencepiece_bpe(tokens: list[str], text: str) -> list[int]:
    """SentencePiece BPE by its definition: spaces become '▁', characters outside the vocabulary become
    byte tokens, then the adjacent pair whose join is the best-scored token merges first (leftmost on ties)."""
    tokens = [t.replace(" ", "▁") if not t.strip() else t for t in tokens]  # "  " is the piece "▁▁"
    ids = {t: i for i, t in enumerate(tokens)}
    score = {t: -i for i, t in enumerate(tokens)}  # file order is merge order
    mergeable = {*SP_PIECES, "▁▁"}
    parts: list[str] = []
    for ch in text.replace(" ", "▁"):
        parts.extend([ch] if ch in ids else [f"<0x{b:02X}>" for b in ch.encode("utf-8")])
    while True:
        best = None
        for i in range(len(parts) - 1):
            joined = parts[i] + parts[i + 1]
            if joined in mergeable and (best is None or score[joined] > score[parts[best] + parts[best + 1]]):
                best = i
        if best is None:
            return [ids[p] for p in parts]
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("helowrdtan 日")), max_size=30))
def test_sentencepiece_matches_definition(sp: tuple[Tokenizer, list[str]], text: str) -> None:
    t, tokens = sp
    assert t.encode(text, add_special_tokens=False) == reference_sentencepiece_bpe(tokens, text)


def test_llama_style_sentencepiece_prefixes_a_space(tmp_path: Path) -> None:
    """Llama-2-style files (no add_space_prefix key): text starts as if after a space, decode strips it."""
    path = tmp_path / "tiny-llama-sp.gguf"
    tokens = write_tiny_sentencepiece_gguf(path, arch="llama")
    t = Tokenizer.from_gguf(GGUFFile(path), cache=False)
    assert [t.id_to_token(i) for i in t.encode("hello world")] == ["<bos>", "▁hello", "▁world"]
    for text in ["hello world", "that and the world", "日本 hello"]:
        ids = t.encode(text)
        assert t.decode(ids) == text
        detok = IncrementalDetokenizer(t)
        assert detok.add_many(ids) + detok.flush() == text
    assert tokens.index("▁hello") in t.encode("hello", add_special_tokens=False)
