"""Calibration and evaluation text from what every machine has: the Python standard library.

code:  every `Lib/**/*.py` under sysconfig's stdlib path (site-/dist-packages and pydoc_data left out)
prose: the documentation topics in `pydoc_data/topics.py` (one document per topic)

The split is by document, fixed: a document is held out for evaluation when the first byte of
sha256("thrifty-eval:" + its key) is below 52 (about 20 %), where the key is the file's path relative to the
stdlib folder or the topic's name. Calibration never sees an evaluation document. Evaluation text is the held-out
documents in key-hash order, joined by blank lines, tokenized and cut into consecutive windows; calibration
windows are drawn at seeded random offsets from the calibration documents, half code, half prose.
The text depends on the Python version; reports record it.
"""
from __future__ import annotations

import hashlib
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EVAL_BYTE = 52


@dataclass(slots=True, frozen=True)
class Document:
    key: str
    domain: str          # "code" or "prose"
    text: str

    @property
    def held_out(self) -> bool:
        return is_held_out(self.key)

    @property
    def order(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()


def is_held_out(key: str) -> bool:
    return hashlib.sha256(f"thrifty-eval:{key}".encode()).digest()[0] < EVAL_BYTE


def code_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "pydoc_data/")):
            continue
        try:
            docs.append(Document(rel, "code", path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return docs


def prose_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"topic:{name}", "prose", text) for name, text in sorted(topics.items())]


def documents(domain: str, held_out: bool) -> list[Document]:
    docs = code_documents() if domain == "code" else prose_documents()
    return sorted((d for d in docs if d.held_out == held_out), key=lambda d: d.order)


def _stream(tokenizer, docs: list[Document], needed: int) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc.text + "\n\n", add_special_tokens=False))
        if len(ids) >= needed:
            break
    return ids


def eval_windows(tokenizer, domain: str, max_tokens: int, seq_len: int = 512) -> list[list[int]]:
    """Consecutive windows of the held-out text of one domain, `max_tokens` tokens in all (at least one window)."""
    seq_len = min(seq_len, max_tokens)
    ids = _stream(tokenizer, documents(domain, held_out=True), max_tokens)
    n = max(1, min(len(ids), max_tokens) // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def calibration_windows(tokenizer, samples: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """`samples` windows of `seq_len` tokens from the calibration documents (never the held-out ones)."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    for domain, count in (("code", (samples + 1) // 2), ("prose", samples // 2)):
        docs = documents(domain, held_out=False)
        rng.shuffle(docs)
        ids = _stream(tokenizer, docs, max(4 * count * seq_len, seq_len + 1))
        for _ in range(count):
            start = rng.randrange(0, max(1, len(ids) - seq_len))
            out.append(ids[start:start + seq_len])
    return out


def describe() -> dict:
    # the Python version names the stdlib text; its folder is this machine's business and stays out of reports
    return {"python": sys.version.split()[0], "stdlib": "Lib/**/*.py of that Python",
            "split": f"sha256('thrifty-eval:'+key)[0] < {EVAL_BYTE} -> evaluation"}
