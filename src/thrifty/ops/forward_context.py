"""The forward context: the step's attention metadata, set by the model runner around one model forward.

Models take token ids and positions only; their attention layers read the metadata here, so models/ needs
nothing from engine/ (as vLLM's `set_forward_context`). A context variable, so each thread (and each asyncio
task) sees only the forward it runs.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from thrifty.ops.attention_metadata import AttentionMetadata

_current: ContextVar[AttentionMetadata | Sequence[AttentionMetadata] | None] = ContextVar(
    "thrifty_forward_context", default=None)


@contextmanager
def set_forward_context(meta: AttentionMetadata | Sequence[AttentionMetadata]) -> Iterator[None]:
    """One metadata for every layer, or one per layer (layers in different KV groups have different block
    tables: engine/kv_groups.py)."""
    token = _current.set(meta)
    try:
        yield
    finally:
        _current.reset(token)


def current(layer: int = 0) -> AttentionMetadata:
    meta = _current.get()
    if meta is None:
        raise RuntimeError("attention ran outside a forward context: wrap the model call in set_forward_context(meta)")
    return meta if isinstance(meta, AttentionMetadata) else meta[layer]
