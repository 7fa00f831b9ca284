"""The draft-model proposer: a smaller model with the target's vocabulary guesses k tokens, one forward each.

The draft owns its own paged KV cache and block manager (its model has other layers and heads than the
target's), so both caches are kept in step by one rule: before proposing, the draft keeps the KV of the
longest prefix of what it computed that the request's tokens still agree with (its verified tokens, plus the
drafts the target kept) and trims the rest; then it catches up on the tokens it has not seen (the target's
bonus token, a kept last draft, or the whole prompt on the first step) in the same forward that yields its
first guess, and runs k - 1 one-token forwards for the rest. Only verified tokens are hashed into the draft's
prefix cache, as in the target's.

Greedy requests take the draft's argmax (the target checks its own argmax). Sampled requests draw from the
draft's distribution under the request's own parameters, and keep it in `seq.spec.draft_probs`: the
rejection rule needs q as well as p to keep the output distributed as the target's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from thrifty.engine.block_manager import BlockManager
from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache
from thrifty.engine.runner import Chunk, forward
from thrifty.engine.sampling import Sampler, TokenHistory, draw_from_probs
from thrifty.errors import InvalidRequestError

if TYPE_CHECKING:
    from thrifty.engine.sequence import Sequence
    from thrifty.models.loader import LoadedModel


@dataclass(slots=True)
class DraftKV:
    """What one request's KV in the draft cache holds: its first `num_verified` tokens, then `unverified`
    (drafts the draft model fed itself, which the target may have rejected)."""
    num_verified: int = 0
    unverified: list[int] = field(default_factory=list)

    def sync(self, token_ids: list[int]) -> int:
        """Keep the fed drafts the request's tokens now agree with; the number of tokens whose KV is valid."""
        n = 0
        while (n < len(self.unverified) and self.num_verified + n < len(token_ids)
               and self.unverified[n] == token_ids[self.num_verified + n]):
            n += 1
        self.num_verified += n
        self.unverified = []
        return self.num_verified


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel, name: str) -> None:
    """A draft proposes token ids, so its tokenizer must map every token to the target's id."""
    t, d = target.tokenizer, draft.tokenizer
    same = (t.backend.get_vocab(with_added_tokens=True) == d.backend.get_vocab(with_added_tokens=True)
            and t.eos_token_id == d.eos_token_id)
    if not same:
        raise InvalidRequestError(
            f"draft model {name!r} has another vocabulary than the target model (token ids differ)",
            "use a draft from the target's model family (same tokenizer), e.g. qwen2.5-coder-0.5b-instruct for "
            "qwen2.5-coder-1.5b-instruct", param="speculative.draft_model")


class DraftModelProposer:
    """Proposes with a draft model in its own KV cache; `release` frees a request's draft blocks."""

    def __init__(self, loaded: LoadedModel, kv_spec: KVCacheSpec, vocab_size: int, sampler: Sampler,
                 enable_prefix_caching: bool = True) -> None:
        self.loaded, self.model, self.device = loaded, loaded.model, loaded.device
        self.kv_cache = PagedKVCache(kv_spec, loaded.device)
        self.block_manager = BlockManager(kv_spec.num_blocks, kv_spec.block_size, enable_prefix_caching)
        self.vocab_size = vocab_size          # the target's: q rows must line up with p's
        self.sampler = sampler
        self._kv: dict[str, DraftKV] = {}

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, (seq, k) in enumerate(zip(seqs, num_tokens)) if self._reserve(seq, k)]
        chunks = {i: self._catch_up(seqs[i]) for i in active}
        while active:
            active.sort(key=lambda i: len(chunks[i].token_ids) != 1)   # one-token queries first
            hidden = forward(self.model, self.kv_cache, [chunks[i] for i in active], self.device)
            ends = torch.tensor([len(chunks[i].token_ids) for i in active]).cumsum(0) - 1
            logits = self._logits(hidden[ends.to(self.device)])
            for row, i in enumerate(active):
                token, q = self._pick(seqs[i], logits[row:row + 1], drafts[i])
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
            active = [i for i in active if len(drafts[i]) < num_tokens[i]]
            chunks = {i: self._feed(seqs[i], chunks[i], drafts[i][-1]) for i in active}
        for seq, q in zip(seqs, probs):
            seq.spec.draft_probs = torch.cat(q) if q else None
        return drafts

    def release(self, request_id: str) -> None:
        """The request finished, was aborted or preempted: its draft blocks go back."""
        self._kv.pop(request_id, None)
        self.block_manager.free(request_id)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ---- per request ---------------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, k: int) -> bool:
        """Roll the draft cache back to the verified tokens, then take blocks for the catch-up and k - 1 fed
        drafts (the last draft is never fed). False: the draft cache is full, no proposal this step."""
        rid, tokens = seq.request_id, seq.token_ids
        bm = self.block_manager
        state = self._kv.get(rid)
        if state is None or not bm.has_request(rid):
            hits = bm.get_prefix_hits(tokens, seq.extra_key)
            if bm.allocate(rid, tokens, len(tokens) - hits + k - 1, seq.extra_key) is None:
                return False
            self._kv[rid] = DraftKV(hits)
            return True
        valid = state.sync(tokens)
        bm.trim(rid, valid)
        bm.cache_full_blocks(rid, tokens, valid)
        return bm.allocate(rid, tokens, len(tokens) - valid + k - 1, num_computed_tokens=valid) is not None

    def _catch_up(self, seq: Sequence) -> Chunk:
        """The first forward's chunk: every token of the request the draft cache lacks (the forward runs
        next, so they count as computed from here on)."""
        state = self._kv[seq.request_id]
        start, state.num_verified = state.num_verified, seq.num_tokens
        return Chunk(seq.token_ids[start:], start, [self.block_manager.block_table(seq.request_id)])

    def _feed(self, seq: Sequence, last: Chunk, token: int) -> Chunk:
        """The next forward's one-token chunk: the draft just proposed, written after the previous chunk."""
        self._kv[seq.request_id].unverified.append(token)
        return Chunk([token], last.start + len(last.token_ids), last.block_tables)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's logits cut or padded to the target's vocabulary (padding rows of an embedding table)."""
        logits = self.model.compute_logits(hidden).float()
        width = logits.shape[1]
        if width > self.vocab_size:
            return logits[:, :self.vocab_size]
        if width < self.vocab_size:
            return torch.nn.functional.pad(logits, (0, self.vocab_size - width), value=float("-inf"))
        return logits

    def _pick(self, seq: Sequence, logits: torch.Tensor, drafts: list[int]) -> tuple[int, torch.Tensor | None]:
        """Greedy: the draft's argmax. Sampled: a draw from the draft's distribution under the request's
        parameters (drafts so far counted as output), and that distribution (q, for the rejection rule)."""
        p = seq.params
        if p.greedy:
            return int(logits.argmax(dim=1)[0]), None
        history = TokenHistory(seq.prompt_token_ids, seq.output_token_ids + drafts)
        q = self.sampler.distribution(logits, [p], [history])
        return int(draw_from_probs(q, [seq.generator])[0]), q
