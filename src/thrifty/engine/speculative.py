"""Speculative decoding: a proposer guesses a request's next tokens, the target model checks them all in one step.

Per step (LLMEngine.step): `Speculator.propose` sets `seq.draft_token_ids` on running requests that decode;
the scheduler schedules the request's last token plus its drafts like a short prefill chunk; the runner
returns the target's logits at each of those positions and `verify` keeps the longest run of drafts the
target agrees with plus one token of its own; the engine rolls back the rejected drafts' KV slots.

Verification is exact. Greedy rows keep a draft while it equals the target's argmax, so the output is the one
plain decoding gives. Sampled rows use the rejection rule of Leviathan et al. / Chen et al.: keep draft x with
probability min(1, p(x) / q(x)), else draw from norm(max(0, p - q)); q is one-hot for a deterministic
proposer (n-gram), so x is kept with probability p(x), else the token is drawn from p without x. p is what
`Sampler.distribution` gives for that position (penalties, temperature, top-k, top-p, min-p, min_tokens),
with the earlier drafts counted as output, so the tokens follow the target's distribution exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from thrifty.engine.sampling import Sampler, TokenHistory, draw_from_probs
from thrifty.errors import InvalidRequestError

if TYPE_CHECKING:
    from thrifty.engine.sequence import Sequence

METHODS = ("off", "ngram", "draft")
# bench spec on 2 Zen 3 cores: n-gram still pays at batch 4 (1.04-1.66x) and breaks even at 16; a 0.5B draft for
# the 1.5B loses at batch 4 (0.77x: four requests' draft forwards and a 16-token verification), so it drafts
# only for a request that runs alone
DISABLE_BY_BATCH_SIZE = {"off": 16, "ngram": 16, "draft": 2}


@dataclass(slots=True, frozen=True)
class SpeculativeConfig:
    """`speculative:` in the engine config. method off (default), ngram (prompt lookup) or draft (a model)."""
    method: str = "off"
    num_tokens: int = 4                 # most tokens proposed per request and step
    ngram_min: int = 2                  # n-gram lookup: the shortest suffix that may match
    ngram_max: int = 4                  # ... and the longest (tried first)
    draft_model: str | None = None      # method draft: the proposing model (same tokenizer as the target)
    draft_weights: str | None = None    # ... its weight format (None: the target's, or auto when that is a DIR)
    draft_kv_cache_memory: float | None = None  # ... GiB for its KV cache (None: as many tokens as the target's)
    disable_by_batch_size: int | None = None  # no speculation in a step with this many running requests or more
                                              # (None: DISABLE_BY_BATCH_SIZE's measured value for the method)
    adaptive: bool = True               # per request, the number of proposed tokens follows its acceptance
    ngram_first: bool | None = None     # method draft: an n-gram lookup proposes first, the draft model only for
                                        # requests whose lookup finds nothing (a lookup costs no forward); None:
                                        # on for method draft (bench spec: faster than the draft alone on every
                                        # workload at batch 1, and the lookup goes on at batch 2-15)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown speculative method {self.method!r}", f"use one of {', '.join(METHODS)}",
                                      param="speculative.method")
        if self.method == "draft" and not self.draft_model:
            raise InvalidRequestError("speculative method 'draft' needs a draft_model",
                                      "name one with the target's tokenizer, e.g. qwen2.5-coder-0.5b-instruct",
                                      param="speculative.draft_model")
        if not 1 <= self.num_tokens <= 16:
            raise InvalidRequestError(f"speculative.num_tokens must be in [1, 16], got {self.num_tokens}", "",
                                      param="speculative.num_tokens")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidRequestError(
                f"speculative n-gram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}",
                "", param="speculative.ngram_min")
        if self.ngram_first is None:
            object.__setattr__(self, "ngram_first", self.method == "draft")
        if self.ngram_first and self.method != "draft":
            raise InvalidRequestError("speculative.ngram_first needs method 'draft'",
                                      "method ngram already proposes by lookup alone", param="speculative.ngram_first")
        if self.disable_by_batch_size is None:   # with ngram_first the lookup goes on where the draft stops
            limit = DISABLE_BY_BATCH_SIZE["ngram" if self.ngram_first else self.method]
            object.__setattr__(self, "disable_by_batch_size", limit)
        if self.disable_by_batch_size < 1:
            raise InvalidRequestError("speculative.disable_by_batch_size must be >= 1", "",
                                      param="speculative.disable_by_batch_size")

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    @classmethod
    def of(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig:
        """From the config's mapping, a method name, None (off) or an instance."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as e:
                raise InvalidRequestError(f"bad speculative section: {e}", "known keys: method, num_tokens, "
                                          "ngram_min, ngram_max, draft_model, draft_weights, "
                                          "draft_kv_cache_memory, disable_by_batch_size, adaptive, ngram_first",
                                          param="speculative") from None
        raise InvalidRequestError(f"speculative must be a mapping or a method name, got {value!r}", "",
                                  param="speculative")


# ---- proposers ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class NgramIndex:
    """Where each n-gram (ngram_min..ngram_max tokens) of one request last ended, grown as tokens arrive.

    Only n-grams that end before the request's last token are indexed, so a look-up of the request's own
    suffix finds an earlier occurrence, never itself.
    """
    ngram_min: int
    ngram_max: int
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)
    upto: int = 1                       # n-grams ending at positions 1 .. upto-1 are indexed

    def extend(self, tokens: list[int]) -> None:
        for end in range(self.upto, len(tokens)):
            for n in range(self.ngram_min, min(self.ngram_max, end) + 1):
                self.last_end[tuple(tokens[end - n:end])] = end
        self.upto = max(self.upto, len(tokens))

    def lookup(self, tokens: list[int], num_tokens: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the longest matching suffix."""
        self.extend(tokens)
        size = len(tokens)
        for n in range(min(self.ngram_max, size - 1), self.ngram_min - 1, -1):
            end = self.last_end.get(tuple(tokens[size - n:]))
            if end is not None:
                return tokens[end:end + num_tokens]
        return []


class Proposer(Protocol):
    """Guesses up to num_tokens[i] next tokens for each sequence (fewer or none is fine). A proposer with
    state per request (the draft model's KV) frees it in `release` (finish, abort, preemption)."""

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]: ...

    def release(self, request_id: str) -> None: ...


@dataclass(slots=True)
class NgramProposer:
    """Prompt lookup: match the request's last n tokens (n from ngram_max down to ngram_min) earlier in its
    prompt and output, and propose what followed. Model-free; pays where outputs copy their input."""
    ngram_min: int
    ngram_max: int

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        out = []
        for seq, k in zip(seqs, num_tokens):
            state = seq.spec
            if state.index is None:
                state.index = NgramIndex(self.ngram_min, self.ngram_max)
            out.append(state.index.lookup(seq.token_ids, k))
        return out

    def release(self, request_id: str) -> None:
        """The index lives on the request (seq.spec) and goes with it."""


@dataclass(slots=True)
class NgramFirstProposer:
    """An n-gram lookup first, the draft model only for the requests it finds nothing for. On a CPU a 0.5B draft's
    k forwards cost about half a 1.5B verification, while a lookup costs nothing; the draft's KV catches up on
    the tokens it skipped in its next forward (DraftModelProposer keeps it in step)."""
    ngram: NgramProposer
    draft: Proposer
    draft_batch_limit: int = DISABLE_BY_BATCH_SIZE["draft"]   # the draft model only in steps with fewer requests

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        out = self.ngram.propose(seqs, num_tokens)
        drafting = len(seqs) < self.draft_batch_limit
        misses = [i for i, found in enumerate(out) if not found] if drafting else []
        for seq in seqs:
            seq.spec.draft_probs = None          # one-hot q for looked-up drafts; the draft model sets its own
        if misses:
            drafted = self.draft.propose([seqs[i] for i in misses], [num_tokens[i] for i in misses])
            for i, draft in zip(misses, drafted):
                out[i] = draft
        return out

    def release(self, request_id: str) -> None:
        self.draft.release(request_id)


# ---- per request state, statistics -----------------------------------------------------------------


@dataclass(slots=True)
class SpecState:
    """One request's speculation: how many tokens to propose next (adaptive), the proposer's index, its books."""
    num_tokens: int
    index: NgramIndex | None = None
    draft_probs: torch.Tensor | None = None   # [k, V]: the draft model's q for sampled drafts (None: one-hot)
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass(slots=True)
class SpecDecodeStats:
    """vLLM's spec_decode counters: verification steps with drafts, draft tokens, accepted ones, per position."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification step yields on average: accepted drafts plus the target's own one."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def acceptance_per_pos(self) -> list[float]:
        return [a / self.num_drafts for a in self.accepted_per_pos] if self.num_drafts else []


# ---- verification --------------------------------------------------------------------------------------


def verify_greedy(target: list[int], draft: list[int]) -> list[int]:
    """target[j]: the target's argmax after draft[:j]. Drafts while they agree, then the target's own token."""
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return draft[:n] + [target[n]]


def _uniforms(n: int, generator: torch.Generator | None) -> list[float]:
    if generator is None:
        return torch.rand(n, dtype=torch.float64).tolist()
    return torch.rand(n, dtype=torch.float64, generator=generator, device=generator.device).tolist()


def verify_sampled(probs: torch.Tensor, draft: list[int], generator: torch.Generator | None,
                   draft_probs: torch.Tensor | None = None) -> list[int]:
    """Rejection sampling. probs [k+1, V]: the target's distribution at each draft position and after the last;
    draft_probs [k, V]: the proposer's (None: one-hot at the drafts, a deterministic proposer). Returns the kept
    drafts and one token drawn by the target (the correction, or a bonus token when every draft was kept)."""
    k = len(draft)
    rows = torch.arange(k, device=probs.device)
    cols = torch.tensor(draft, device=probs.device)
    p = probs[rows, cols].to(torch.float64)
    q = torch.ones_like(p) if draft_probs is None else draft_probs[rows, cols].to(torch.float64)
    ratio = torch.where(q > 0, p / q.clamp_min(1e-300), torch.ones_like(p)).tolist()
    for j, u in enumerate(_uniforms(k, generator)):
        if u < ratio[j]:
            continue
        residual = probs[j].to(torch.float64, copy=True)
        if draft_probs is None:
            residual[draft[j]] = 0.0
        else:
            residual = (residual - draft_probs[j].to(torch.float64)).clamp_min_(0.0)
        if not float(residual.sum()) > 0.0:     # rounding only: p has no mass outside the draft
            continue
        return draft[:j] + [int(draw_from_probs(residual.unsqueeze(0), [generator])[0])]
    return draft + [int(draw_from_probs(probs[k:k + 1], [generator])[0])]


Verifier = Callable[[torch.Tensor, list[int], "torch.Generator | None", "torch.Tensor | None"], list[int]]


def verify_sequences(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence],
                     verifier: Verifier = verify_sampled) -> list[list[int]]:
    """logits [sum(k_i + 1), V]: each sequence's rows at its last token and its k_i drafts, in order.
    The tokens each sequence gets this step (kept drafts, then one more)."""
    out, start = [], 0
    for seq in seqs:
        draft = seq.draft_token_ids
        rows = logits[start:start + len(draft) + 1]
        start += len(draft) + 1
        p = seq.params
        if p.greedy and not p.uses_penalties and not p.min_tokens:
            out.append(verify_greedy(rows.max(dim=1).indices.tolist(), draft))  # as Sampler.sample's argmax
            continue
        histories = [TokenHistory(seq.prompt_token_ids, seq.output_token_ids + draft[:j])
                     for j in range(len(draft) + 1)]
        probs = sampler.distribution(rows, [p] * len(histories), histories)
        if p.greedy:
            out.append(verify_greedy(probs.max(dim=1).indices.tolist(), draft))
        else:
            q = seq.spec.draft_probs
            out.append(verifier(probs, draft, seq.generator, None if q is None else q[:len(draft)]))
    return out


# ---- the policy: who proposes, how many ------------------------------------------------------------------


class Speculator:
    """Decides, before each step, which running requests propose and how many tokens, asks the proposer, and
    books each verification. Adaptive: a request proposes one token more after a fully kept draft and one
    more than it got kept after a rejection (next_num_tokens); the whole step goes without speculation when the
    batch is large (verifying k+1 tokens of many requests costs more than the steps it saves on a CPU)."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        self.proposer = proposer or NgramProposer(config.ngram_min, config.ngram_max)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * self.config.num_tokens)

    def release(self, request_id: str) -> None:
        """The request left the running set (finished, aborted, preempted): the proposer frees its state."""
        self.proposer.release(request_id)

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Set `draft_token_ids` on the running requests that speculate this step (cleared on the others)."""
        for seq in running:
            seq.draft_token_ids = []
        if len(running) >= self.config.disable_by_batch_size:
            return
        chosen, sizes = [], []
        for seq in running:
            k = self._budget(seq, max_model_len)
            if k > 0:
                chosen.append(seq)
                sizes.append(k)
        if chosen:
            for seq, draft in zip(chosen, self.proposer.propose(chosen, sizes)):
                seq.draft_token_ids = list(draft)

    def _budget(self, seq: Sequence, max_model_len: int) -> int:
        """Tokens this request may propose now: 0 while it prefills, asks for logprobs or opted out; never past
        max_tokens (the target adds one token of its own) or the context."""
        p = seq.params
        if seq.num_uncomputed_tokens != 1 or p.logprobs is not None or not p.speculative:
            return 0
        if seq.spec is None:
            seq.spec = SpecState(self.config.num_tokens)
        room = min(p.max_tokens - len(seq.output_token_ids) - 1, max_model_len - seq.num_tokens)
        return max(0, min(seq.spec.num_tokens, room))

    def record(self, seq: Sequence, num_draft: int, num_accepted: int) -> None:
        """Book one verification of `num_draft` tokens of which the first `num_accepted` were kept."""
        s, state = self.stats, seq.spec
        s.num_drafts += 1
        s.num_draft_tokens += num_draft
        s.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            s.accepted_per_pos[pos] += 1
        state.num_drafts += 1
        state.num_draft_tokens += num_draft
        state.num_accepted_tokens += num_accepted
        if self.config.adaptive:
            state.num_tokens = next_num_tokens(num_draft, num_accepted, self.config.num_tokens)


def next_num_tokens(num_draft: int, num_accepted: int, most: int) -> int:
    """Adaptive draft length: one more after a fully kept draft, else one more than the target kept. (Doubling
    after a full draft kept longer runs on code-edit and summarize but was no faster: verifying k + 1 tokens costs
    ~0.3 of a forward each on a CPU.)"""
    if num_accepted == num_draft:
        return min(num_draft + 1, most)
    return max(1, num_accepted + 1)

