"""The `CacheStore` protocol and the entry it keeps.

One store holds both caches: an entry is found by its exact key (`get`), and, when it has a vector, by
similarity inside its scope (`search`). The scope is a hash of everything that must be equal for two
requests to share an answer semantically (tenant, namespace, model, system prompt and earlier turns,
output-changing parameters); a store searches one scope's entries only and never returns another's.
Stores are synchronous and thread-safe. The server calls a remote store from worker threads under a time
budget; a store that says `in_process = True` (its reads are in memory and take well under a millisecond)
is read on the event loop's thread instead, which saves two thread hand-offs per look-up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from thrifty.errors import ThriftyError


class CacheStoreError(ThriftyError):
    """The store could not be reached or answered wrongly (the caller serves without the cache)."""


@dataclass(slots=True)
class CacheEntry:
    key: str                          # exact key: hash of the normalised request (scope included)
    scope: str                        # semantic scope: hard filter of `search`
    namespace: str
    text: str                         # what the semantic side compares: the last user message or the prompt
    response: dict[str, Any]          # {"text", "finish_reason", "prompt_tokens", "completion_tokens"}
    vector: np.ndarray | None = None  # unit-length float32 embedding of `text`; None: exact only
    created: float = field(default_factory=time.time)
    expires_at: float | None = None   # unix time; None: no TTL

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at


@runtime_checkable
class CacheStore(Protocol):
    """get / put / search / delete / clear. Errors of a remote store are CacheStoreError."""

    in_process: bool  # reads are local and quick: done on the caller's thread, without a time budget

    def get(self, key: str) -> CacheEntry | None: ...

    def put(self, entry: CacheEntry) -> None: ...

    def search(self, vector: np.ndarray, k: int, scope: str) -> list[tuple[CacheEntry, float]]:
        """Up to k live entries of `scope` with a vector, most similar first, as (entry, cosine)."""
        ...

    def delete(self, key: str) -> bool: ...

    def clear(self, namespace: str | None = None) -> int:
        """Remove every entry (of one namespace); returns how many."""
        ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...
