"""Streaming detokenization: token ids in one at a time, newly completed text out.

Decoding each new token on its own is wrong (byte-level and byte-fallback tokens can split one UTF-8
character over several tokens, and a SentencePiece '▁' only becomes a space in context), and decoding the
whole sequence every step is O(n) per token. As vLLM does, we decode a short window twice: the tokens
already emitted since `prefix_offset` (the context), and the same window with the new tokens; the text
beyond the context is new. While that text ends in U+FFFD, a character is still incomplete and nothing
is emitted; the window then grows until it completes. `flush()` gives out whatever is held back at the end.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from thrifty.models.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens kept as left context for the first generated tokens


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas that never split a character.

    Without `prompt_ids`, the deltas joined equal `tokenizer.decode(all_ids)` once `flush()` is called.
    With them, the last few prompt tokens serve as context, so the first generated token decodes as it
    would inside the sequence (a leading space, the rest of a split character).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True):
        self._decode = tokenizer.backend.decode
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in prompt_ids][-CONTEXT_TOKENS:]
        self.ids: list[int] = list(context)   # context + generated ids since the window start are enough,
        self._base = len(context)             # but we keep all generated ids for `output_ids`
        self.prefix_offset = 0                # window start
        self.read_offset = len(context)       # end of what has been emitted
        self._prefix_text = self._text(0, self.read_offset)
        self.text = ""                        # everything emitted so far

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self._base:]

    def _text(self, start: int, end: int | None = None) -> str:
        return self._decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text it completes ("" while a character is still open)."""
        self.ids.append(int(token_id))
        full = self._text(self.prefix_offset)
        if len(full) <= len(self._prefix_text) or full.endswith(REPLACEMENT):
            return ""
        delta = full[len(self._prefix_text):]
        # Slide the window: the tokens just emitted become the context of the next step.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = self._text(self.prefix_offset, self.read_offset)
        self.text += delta
        return delta

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes to U+FFFD, as `decode` would)."""
        if self.read_offset == len(self.ids):
            return ""
        full = self._text(self.prefix_offset)
        delta = full[len(self._prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = self._text(self.prefix_offset, self.read_offset)
        self.text += delta
        return delta
