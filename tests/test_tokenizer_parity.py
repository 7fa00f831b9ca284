"""Real-model tokenizer parity: our GGUF tokenizers against transformers' own import of the same GGUF files.

The reference is `AutoTokenizer.from_pretrained(folder, gguf_file=name)` (~10-45 s per model, so it is built
once per module). It does not need `accelerate` (only transformers' GGUF *model* import does).
"""
from __future__ import annotations

import ast
import random
import sysconfig
import time
from pathlib import Path

import pytest

from thrifty.errors import InvalidRequestError
from thrifty.models.detokenizer import IncrementalDetokenizer
from thrifty.models.gguf_file import GGUFFile
from thrifty.models.tokenizer import Tokenizer

pytestmark = pytest.mark.real

CODE = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import numpy as np\n\nx = np.arange(10, dtype=np.float32)\nprint(f\"{x.mean():.3f}\")\n",
    "class Foo(Base):\n\t\"\"\"Doc.\"\"\"\n\tdef __init__(self, *args, **kwargs) -> None:\n\t\tsuper().__init__()\n",
    "function add(a, b) {\n  return a + b;\n}\nconst x = [1, 2, 3].map((v) => v * 2);\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello\")\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE 'A%' ORDER BY name DESC;",
    "<!DOCTYPE html>\n<html><body><div class=\"x\"><p>Hi &amp; bye</p></div></body></html>",
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
    "public static void main(String[] args) { System.out.println(\"Hi\"); }",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    "---\nmodel: qwen\nlayers: 24\n  - item\n",
    "    \n        indented\n\t\tmixed\t tabs\n",
    "x=1;y=2;z=x+y*3//4**5%6",
    "# Title\n\n* bullet\n* **bold** _it_ `code`\n\n```python\nprint(1)\n```\n",
    "$ pip install torch==2.13.0 && python -m pytest -q",
    "lambda x: x if x else None  # comment\r\n",
]
UNICODE = [
    "café naïve résumé", "e\u0301 a\u0300 o\u0308 n\u0303", "Z\u0351\u0352\u0353algo", "ﬁ ﬂ ﬀ", "Ångström ÅÄÖ",
    "日本語のテキストです。", "中文测试，标点符号！", "한국어 텍스트", "Привет, как дела?", "Ελληνικά γράμματα",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ภาษาไทย", "Tiếng Việt có dấu",
    "😀😃😄 🤖 👍🏽", "👨‍👩‍👧‍👦 family", "🇫🇷🇩🇪🇯🇵", "❤️ ✨ ☃", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "ｆｕｌｌｗｉｄｔｈ",
    "a\u00a0b\u2003c\u200bd\u200de\ufeff", "\u202eRTL override", "\x00\x01\x02\x7f", "\ufffd replacement",
    "math: ∀x∈ℝ, ∑ᵢ xᵢ² ≥ 0 ⇒ √π", "emoji+text😀mixed日本", "I'm sure they'll've WE'RE You'D",
]
WHITESPACE = ["", " ", "  ", "   ", "\n", "\n\n", "\n\n\n\n", "\t", "\t\t\t", " \t \n ", "\r\n", "\r\n\r\n",
              "a  b   c    d", "  leading", "trailing   ", "\n  \n  \n", " " * 40, "\t" * 9 + "x", "x\n" * 20]
NUMBERS = ["0", "12", "123", "1234", "12345678901234567890", "3.14159", "-42", "1e-9", "1,234,567.89",
           "2026-11-29T08:39:00Z", "0xDEADBEEF", "192.168.0.1", "$1,000", "50%", "1/2 + 3/4 = 5/4", "v1.2.3-rc4"]


def base_strings(specials: list[str]) -> list[str]:
    out = CODE + UNICODE + WHITESPACE + NUMBERS
    out += [f"{a}{s}{b}" for s in specials for a, b in (("", ""), ("text ", " more"), ("\n", "\n"))]
    out += [f" {s}" for s in CODE[:6] + UNICODE[:10]] + [f"{s}\n" for s in UNICODE[10:20]]
    # Source and prose from the standard library: code in bulk, documentation text.
    lib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(0)
    for name in ("json/decoder.py", "textwrap.py", "pydoc_data/topics.py", "heapq.py", "string.py"):
        text = (lib / name).read_text(encoding="utf-8")
        if name.endswith("topics.py"):
            text = "\n".join(ast.literal_eval(text.split("topics = ", 1)[1]).values())
        for _ in range(12):
            start = rng.randrange(0, max(1, len(text) - 600))
            out.append(text[start:start + rng.randrange(20, 600)])
    # Random mixtures of everything above, cut at odd places.
    pool = "".join(CODE + UNICODE + NUMBERS) + "".join(specials)
    for _ in range(40):
        start = rng.randrange(len(pool) - 80)
        out.append(pool[start:start + rng.randrange(1, 80)])
    return out


CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Comment ça va? 😀"}],
    [{"role": "user", "content": "def f(x):\n\treturn x"}, {"role": "assistant", "content": "Looks fine."},
     {"role": "user", "content": "日本語で説明して"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]


def reference_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    from thrifty.models import zoo

    return zoo.resolve("gemma-3-270m")


@pytest.fixture(scope="module")
def qwen(qwen05_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    return _pair(qwen05_gguf, tmp_path_factory)


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    return _pair(gemma_gguf, tmp_path_factory)


def _pair(path: Path, tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("THRIFTY_HOME", str(tmp_path_factory.mktemp("home")))
    try:
        ours = Tokenizer.from_gguf(GGUFFile(path))
    finally:
        mp.undo()
    return path, ours, reference_tokenizer(path)


def _specials(ours: Tokenizer, candidates: list[str]) -> list[str]:
    return [s for s in candidates if ours.token_to_id(s) is not None]


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>",
                 "<|fim_suffix|>", "<tool_call>", "</tool_call>", "<|file_sep|>"]
GEMMA_SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<pad>", "<start_of_image>", "<unused3>",
                  "[multimodal]", "<table>", "</td>"]


def _assert_parity(ours: Tokenizer, ref, texts: list[str]) -> None:
    assert len(texts) >= 200
    mismatches = []
    for text in texts:
        for special in (True, False):
            mine, theirs = ours.encode(text, add_special_tokens=special), ref.encode(text, add_special_tokens=special)
            if mine != theirs:
                mismatches.append((text, special, mine[:30], theirs[:30]))
    assert not mismatches, f"{len(mismatches)} of {2 * len(texts)} differ, e.g. {mismatches[:3]}"
    assert ours.encode_batch(texts[:50]) == [ref.encode(t) for t in texts[:50]]


def _assert_decode_parity(ours: Tokenizer, ref, texts: list[str]) -> None:
    for text in texts:
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), (text, skip)
        detok = IncrementalDetokenizer(ours)
        assert detok.add_many(ids) + detok.flush() == ours.decode(ids), text


def test_qwen_token_ids_match_transformers(qwen) -> None:
    _, ours, ref = qwen
    texts = base_strings(_specials(ours, QWEN_SPECIALS))
    rendered = [ours.apply_chat_template(c) for c in CONVERSATIONS]
    rendered += [ours.apply_chat_template(c, add_generation_prompt=False, tools=TOOLS) for c in CONVERSATIONS]
    _assert_parity(ours, ref, texts + rendered)
    _assert_decode_parity(ours, ref, texts + rendered)


def test_qwen_chat_template_matches_transformers(qwen) -> None:
    _, ours, ref = qwen
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(conversation, add_generation_prompt=gen) == \
                ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(conversation, tools=TOOLS) == \
            ref.apply_chat_template(conversation, tools=TOOLS, tokenize=False, add_generation_prompt=True)


def test_qwen_special_ids(qwen) -> None:
    _, ours, ref = qwen
    assert ours.vocab_size == 151936
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (151643, 151645, 151643)
    assert ours.eos_token_id == ref.eos_token_id and ours.pad_token_id == ref.pad_token_id
    assert set(ours.stop_token_ids) == {151643, 151645}
    assert not ours.add_bos_token


def test_gemma_token_ids_match_transformers(gemma) -> None:
    _, ours, ref = gemma
    texts = base_strings(_specials(ours, GEMMA_SPECIALS))
    texts += ["<start_of_turn>user\n" + c[-1]["content"] + "<end_of_turn>\n<start_of_turn>model\n"
              for c in CONVERSATIONS]
    _assert_parity(ours, ref, texts)
    _assert_decode_parity(ours, ref, texts)


def test_gemma_special_ids_and_fallback_template(gemma) -> None:
    _, ours, ref = gemma
    assert ours.vocab_size == 262144 and ours.add_bos_token
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (2, 1)
    assert ours.encode("hi")[0] == 2 and ours.encode("hi", add_special_tokens=False)[0] != 2
    assert set(ours.stop_token_ids) == {1, ours.token_to_id("<end_of_turn>")}
    # This GGUF carries no chat template: transformers refuses; thrifty falls back to Gemma 3's own turn format.
    with pytest.raises(ValueError):
        ref.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    text = ours.apply_chat_template(CONVERSATIONS[0])
    assert "<start_of_turn>user\n" in text and text.endswith("<start_of_turn>model\n")


@pytest.mark.parametrize("name", ["qwen05_gguf", "gemma_gguf"])
def test_second_load_reads_the_cache(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The first from_gguf builds the tokenizer and caches it; a second one reads the cache and builds nothing.
    The times are printed, not asserted: this shared machine's figures jump 10-40 % between runs."""
    from thrifty.models import tokenizer as tokenizer_module

    g = GGUFFile(request.getfixturevalue(name))
    monkeypatch.setenv("THRIFTY_HOME", str(tmp_path))
    builds = []
    build = tokenizer_module.build_from_metadata
    monkeypatch.setattr(tokenizer_module, "build_from_metadata", lambda md: builds.append(1) or build(md))
    cpu = time.process_time()
    first = Tokenizer.from_gguf(g)
    built = time.process_time() - cpu
    cpu = time.process_time()
    second = Tokenizer.from_gguf(g)
    loaded = time.process_time() - cpu
    print(f"\n{name}: uncached from_gguf {built:.2f} s CPU, cached {loaded:.2f} s CPU")
    assert len(builds) == 1 and list((tmp_path / "tokenizers").glob("*.json"))
    text = "def f(x):\n    return x  # héllo"
    assert second.encode(text) == first.encode(text) and second.vocab_size == first.vocab_size


def test_hf_folder_written_by_transformers_loads_the_same(qwen, tmp_path: Path) -> None:
    _, ours, ref = qwen
    ref.save_pretrained(tmp_path)
    hf = Tokenizer.from_hf_folder(tmp_path)
    texts = base_strings(QWEN_SPECIALS)
    assert [hf.encode(t) for t in texts] == [ours.encode(t) for t in texts]
    assert (hf.eos_token_id, hf.pad_token_id, hf.vocab_size) == (ours.eos_token_id, ours.pad_token_id, ours.vocab_size)
    assert set(hf.stop_token_ids) == set(ours.stop_token_ids)
    assert hf.apply_chat_template(CONVERSATIONS[2]) == ours.apply_chat_template(CONVERSATIONS[2])
