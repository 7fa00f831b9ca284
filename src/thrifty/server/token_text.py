"""Token text for logprobs: the exact bytes of one token of a byte-level BPE or SentencePiece vocabulary."""
from __future__ import annotations

import re


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE writes each byte as one printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _gpt2_byte_decoder()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int, byte_level: bool) -> bytes:
    """The exact bytes of one token (byte-level BPE or SentencePiece vocabularies)."""
    tok = tokenizer.id_to_token(token_id) or ""
    if byte_level and all(c in _BYTE_DECODER for c in tok):
        return bytes(_BYTE_DECODER[c] for c in tok)
    if m := _SP_BYTE.fullmatch(tok):
        return bytes([int(m.group(1), 16)])
    return tok.replace("\u2581", " ").encode()
