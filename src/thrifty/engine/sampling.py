"""Sampling: request parameters and the batched sampler (stop strings live in stop.py).

Pipeline per step, for a batch of rows that share nothing but the tensor:

    penalties (repetition, presence, frequency) and the min_tokens mask of EOS / stop ids
      -> logprobs are read here (see below)
      -> greedy rows: argmax
      -> temperature -> top-k -> top-p -> min-p -> sample (inverse CDF, one float64 uniform per row)

Logprobs are the log-softmax of the logits after the penalties and the min_tokens mask, but before
temperature, top-k, top-p and min-p: they describe the model's (penalised) distribution, not the
truncated one the token was drawn from, so they stay comparable across sampling settings. (vLLM
returns the raw log-softmax by default; ours differs only when a penalty or min_tokens is in use.)

Seeded requests: the engine makes one `torch.Generator` per request (`make_generator(seed)`) and passes
the same object every step. A seeded row draws its noise from its own generator only, and every
operation on a row reads that row alone, so its tokens do not depend on the batch around it.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from thrifty.errors import InvalidRequestError

GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _bad(param: str, message: str, fix: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param} {message}", fix, param=param)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(slots=True)
class SamplingParams:
    """How to pick the tokens of one request. Validated on construction (InvalidRequestError)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top logprobs per token, 0..20; 0: only the chosen token's
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    skip_special_tokens: bool = True
    speculative: bool = True  # False: never speculate for this request (when the engine does)

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise _bad("max_tokens", f"must be an integer > 0, got {self.max_tokens!r}",
                       "ask for at least one token")
        if not _is_real(self.temperature) or not (0.0 <= self.temperature < math.inf):
            raise _bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}",
                       "use 0 for greedy decoding or a positive value such as 0.7")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p!r}", "use 1.0 to turn top-p off")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", f"must be an integer >= -1, got {self.top_k!r}",
                       "use 0 or -1 to turn top-k off")
        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p!r}", "use 0 to turn min-p off")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise _bad("seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}",
                       "pass an integer seed or none")
        self.stop = self._normalise_stop(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise _bad("stop_token_ids", f"must be a list of token ids (ints >= 0), got {self.stop_token_ids!r}",
                       "pass a list such as [151645]")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, f"must be true or false, got {getattr(self, name)!r}", "pass a boolean")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise _bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
                       "ask for at most 20 top logprobs, or none")
        # Bounded so that logits / penalty stays finite in float32 (a subnormal penalty divides by zero).
        if not _is_real(self.repetition_penalty) or not (0.01 <= self.repetition_penalty <= 100.0):
            raise _bad("repetition_penalty", f"must be in [0.01, 100], got {self.repetition_penalty!r}",
                       "use 1.0 to turn it off")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not (-2.0 <= v <= 2.0):
                raise _bad(name, f"must be in [-2, 2], got {v!r}", "use 0 to turn it off")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}], "
                       f"got {self.min_tokens!r}", "lower min_tokens or raise max_tokens")

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise _bad("stop", f"must be a string or a list of strings, got {stop!r}",
                       'pass e.g. "\\n" or ["###", "</s>"]')
        if any(s == "" for s in items):
            raise _bad("stop", "must not contain an empty string", "remove the empty stop string")
        return list(dict.fromkeys(items))  # drop duplicates, keep order

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p < 1.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """The per-request generator for a seeded request (None for an unseeded one). Make it once per request."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(slots=True)
class TokenHistory:
    """The token ids the penalties and min_tokens read. The engine may pass its live lists (no copies).

    The prompt's tensor is cached on first use, so keep one TokenHistory per request across steps.
    """

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    _prompt_tensor: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def prompt_tensor(self) -> torch.Tensor:
        if self._prompt_tensor is None or self._prompt_tensor.numel() != len(self.prompt_token_ids):
            self._prompt_tensor = torch.as_tensor(list(self.prompt_token_ids), dtype=torch.long)
        return self._prompt_tensor


@dataclass(slots=True)
class SamplerOutput:
    """One entry per row. logprobs[i] / top_logprobs[i] are None where the row did not ask for them."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


# ---------------------------------------------------------------------------------------------
# Logit processors. Each takes float32 logits [n, V] and per-row settings, and works in place.


def _flat_keys(logits: torch.Tensor, rows: list[int], ids: list[list[torch.Tensor]]) -> torch.Tensor:
    """Distinct positions row * V + token in logits.view(-1) for each row's token ids."""
    vocab = logits.shape[1]
    keys = torch.cat([t.to(torch.long) + r * vocab for r, ts in zip(rows, ids) for t in ts])
    return keys.to(logits.device)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    histories: Sequence[TokenHistory]) -> None:
    """Repetition (prompt + output, CTRL/HF style: positive logits divided, negative multiplied), then
    frequency (times the count) and presence (once), both on output tokens only. In place; the work is
    proportional to the history lengths, not to the vocabulary."""
    flat = logits.view(-1)
    dev = logits.device

    def output_ids(i: int) -> torch.Tensor:
        return torch.as_tensor(list(histories[i].output_token_ids), dtype=torch.long)

    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        keys = torch.unique(_flat_keys(logits, rep_rows,
                                       [[histories[i].prompt_tensor(), output_ids(i)] for i in rep_rows]))
        rp = torch.ones(logits.shape[0], dtype=logits.dtype)
        rp[rep_rows] = torch.tensor([params[i].repetition_penalty for i in rep_rows], dtype=logits.dtype)
        rp = rp.to(dev)[keys // logits.shape[1]]
        vals = flat[keys]
        flat[keys] = torch.where(vals > 0, vals / rp, vals * rp)
    fp_rows = [i for i, p in enumerate(params)
               if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and len(histories[i].output_token_ids)]
    if fp_rows:
        keys, counts = torch.unique(_flat_keys(logits, fp_rows, [[output_ids(i)] for i in fp_rows]),
                                    return_counts=True)
        freq = torch.zeros(logits.shape[0], dtype=logits.dtype)
        pres = torch.zeros(logits.shape[0], dtype=logits.dtype)
        freq[fp_rows] = torch.tensor([params[i].frequency_penalty for i in fp_rows], dtype=logits.dtype)
        pres[fp_rows] = torch.tensor([params[i].presence_penalty for i in fp_rows], dtype=logits.dtype)
        row = keys // logits.shape[1]
        flat[keys] -= freq.to(dev)[row] * counts.to(logits.dtype) + pres.to(dev)[row]


def apply_min_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                     histories: Sequence[TokenHistory], eos_token_ids: Collection[int]) -> None:
    """Forbid EOS and the stop token ids while a row has fewer than min_tokens output tokens."""
    vocab = logits.shape[1]
    for i, p in enumerate(params):
        if p.min_tokens and len(histories[i].output_token_ids) < p.min_tokens:
            banned = [t for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab]
            if banned:
                logits[i, banned] = -math.inf


CANDIDATES = 1024  # top-k / top-p first look at this many highest logits per row; a full sort only if too few


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax; `max(dim)` returns the same first index on ties and is 2-4x faster than `argmax` on CPU
    (bf16 [32, 152k]: 1.9 vs 8.9 ms)."""
    return x.max(dim=1).indices


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows]; t itself when rows are all of its rows in order (no copy)."""
    if len(rows) == t.shape[0] and rows == list(range(len(rows))):
        return t
    return t[torch.tensor(rows, dtype=torch.long, device=t.device)]


@dataclass(slots=True)
class _Group:
    """Rows of the sampling batch that share a candidate width. scores [m, W] carry -inf for dropped
    tokens; index [m, W] maps a column to its token id (None: the column is the token id)."""

    rows: list[int]
    scores: torch.Tensor
    index: torch.Tensor | None


def _top_k_top_p(vals: torch.Tensor, params: Sequence[SamplingParams], logits: torch.Tensor) -> torch.Tensor:
    """Mask candidates sorted high to low (in place): top-k by position, then the top-p nucleus (the
    fewest tokens whose mass reaches top_p). Returns which rows the candidates provably cover."""
    width, vocab = vals.shape[1], logits.shape[1]
    dev = vals.device
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    vals.masked_fill_(torch.arange(width, device=dev) >= ks.unsqueeze(1), -math.inf)
    covered = (ks <= width) | (width >= vocab)
    if any(p.uses_top_p for p in params):
        # top-p reads the distribution after top-k: renormalise over the top-k set where top-k is on
        lse = torch.logsumexp(vals if bool((ks < vocab).all()) else logits, dim=1)
        if bool((ks < vocab).any()):
            lse = torch.where(ks < vocab, torch.logsumexp(vals, dim=1), lse)
        probs = torch.exp(vals - lse.unsqueeze(1))
        cum = torch.cumsum(probs, dim=1)
        pp = torch.tensor([p.top_p if p.uses_top_p else 2.0 for p in params], dtype=vals.dtype, device=dev)
        drop = (cum - probs) >= pp.unsqueeze(1)  # the mass of the higher-ranked tokens already reaches top_p
        drop[:, 0] = False
        vals.masked_fill_(drop, -math.inf)
        covered |= cum[:, -1] >= pp
    return covered


def _min_p(scores: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Drop tokens whose probability is below min_p times the row's highest (in place)."""
    if any(p.min_p > 0.0 for p in params):
        mp = torch.tensor([p.min_p for p in params], dtype=scores.dtype, device=scores.device)
        thresh = scores.amax(dim=1) + torch.log(mp)  # log(0) = -inf leaves a row untouched
        scores.masked_fill_(scores < thresh.unsqueeze(1), -math.inf)


def _warp(sub: torch.Tensor, params: Sequence[SamplingParams]) -> list[_Group]:
    """Temperature-scaled logits [m, V] -> groups with top-k, top-p and min-p applied.

    Rows with top-k or top-p work on their CANDIDATES highest logits (torch.topk, far cheaper than a
    sort of a 150k vocabulary); a row whose nucleus does not fit goes to a full sort. The candidate
    width of a row depends on its own parameters and logits only, so seeded rows stay batch-invariant.
    """
    vocab = sub.shape[1]
    plain = [j for j, p in enumerate(params) if not (p.uses_top_k or p.uses_top_p)]
    narrow = [j for j, p in enumerate(params) if (p.uses_top_k or p.uses_top_p) and p.top_k <= CANDIDATES]
    wide = [j for j, p in enumerate(params) if (p.uses_top_k or p.uses_top_p) and p.top_k > CANDIDATES]
    groups: list[_Group] = []
    if plain:
        groups.append(_Group(plain, _take(sub, plain), None))

    def truncate(rows: list[int], width: int) -> list[int]:
        """Add the group of rows whose nucleus fits in width candidates; return the others."""
        rsub = _take(sub, rows)
        if width < vocab:
            vals, idx = torch.topk(rsub, width, dim=1)
        else:
            vals, idx = torch.sort(rsub, dim=1, descending=True, stable=True)
        covered = _top_k_top_p(vals, [params[j] for j in rows], rsub).tolist()
        keep = [r for r, ok in enumerate(covered) if ok]
        if keep:
            groups.append(_Group([rows[r] for r in keep], _take(vals, keep), _take(idx, keep)))
        return [rows[r] for r, ok in enumerate(covered) if not ok]

    if narrow:
        wide += truncate(narrow, min(CANDIDATES, vocab))
    if wide:
        truncate(wide, vocab)  # a full sort covers every row
    for g in groups:
        _min_p(g.scores, [params[j] for j in g.rows])
    return groups


def _draw(scores: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One column per row, with probability softmax(scores): inverse CDF in float64 with one uniform
    per row, drawn from the row's own generator where it has one (else from torch's default one)."""
    return draw_from_probs(torch.softmax(scores, dim=1), generators)


def draw_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One column per row of probs [m, V] (non-negative, need not sum to 1), by the same inverse CDF as
    sampling: the speculative verifier draws its corrections with it."""
    m = probs.shape[0]
    cdf = probs.to(torch.float64, copy=True).cumsum_(dim=1)  # never the caller's tensor
    u = torch.empty(m, dtype=torch.float64)
    shared = [j for j, g in enumerate(generators) if g is None]
    if shared:
        u[shared] = torch.rand(len(shared), dtype=torch.float64)
    for j, g in enumerate(generators):
        if g is not None:
            u[j] = torch.rand(1, dtype=torch.float64, generator=g, device=g.device).item()
    total = cdf[:, -1]
    # u * total < total, so the first cdf entry above it has mass (capped against rounding up)
    target = torch.minimum(u.to(cdf.device) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)


class Sampler:
    """Picks one token per row of a batch of logits. Stateless between calls."""

    def __init__(self, eos_token_ids: Collection[int] = ()) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)

    def _check(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None] | None,
               histories: Sequence[TokenHistory] | None,
               seeded_need_generators: bool = True) -> list[torch.Generator | None]:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        n = logits.shape[0]
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling params for {n} rows of logits")
        gens = [None] * n if generators is None else list(generators)
        if len(gens) != n:
            raise ValueError(f"{len(gens)} generators for {n} rows of logits")
        if histories is not None and len(histories) != n:
            raise ValueError(f"{len(histories)} token histories for {n} rows of logits")
        if histories is None and any(p.uses_penalties or p.min_tokens for p in params):
            raise ValueError("penalties and min_tokens need the token histories")
        for p, g in zip(params, gens):
            if seeded_need_generators and p.seed is not None and g is None and not p.greedy:
                raise ValueError("a seeded request needs its generator (make_generator(seed))")
        return gens

    def _process(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 histories: Sequence[TokenHistory] | None) -> torch.Tensor:
        """float32 copy of logits with the penalties and the min_tokens mask applied."""
        x = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        x.copy_(logits)  # our own contiguous float32 copy, whatever the input's dtype and strides
        if histories is not None:
            if any(p.uses_penalties for p in params):
                apply_penalties(x, params, histories)
            apply_min_tokens(x, params, histories, self.eos_token_ids)
        return x

    def _scaled(self, x: torch.Tensor, params: Sequence[SamplingParams], rows: list[int]) -> torch.Tensor:
        sub = _take(x, rows)  # x itself when all rows sample: scaled in place
        temps = torch.tensor([params[i].temperature for i in rows], dtype=sub.dtype, device=x.device)
        return sub.div_(temps.unsqueeze(1))

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        histories: Sequence[TokenHistory] | None = None,
    ) -> SamplerOutput:
        """logits [B, V] (any float dtype, not modified); one params / generator / history per row.

        generators may be None when no row is seeded; histories may be None when no row uses a
        penalty or min_tokens. A seeded row must come with its generator.
        """
        gens = self._check(logits, params, generators, histories)
        n = logits.shape[0]
        if n == 0:
            return SamplerOutput([], [], [])
        if all(p.greedy and p.logprobs is None and not p.uses_penalties and not p.min_tokens for p in params):
            # nothing to adjust or report: the argmax of the logits as they are (bf16 -> float32 is exact,
            # so this is the same token), without a float32 copy of [B, vocab]
            return SamplerOutput(_argmax(logits).tolist(), [None] * n, [None] * n)
        x = self._process(logits, params, histories)
        dev = x.device

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs_all = None
        if lp_rows:
            logprobs_all = torch.log_softmax(_take(x, lp_rows), dim=1)

        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if not rand:
            chosen = _argmax(x)
        else:
            chosen = torch.empty(n, dtype=torch.long, device=dev)
            if greedy:
                gi = torch.tensor(greedy, device=dev)
                chosen.index_copy_(0, gi, _argmax(_take(x, greedy)))
            sub_params = [params[i] for i in rand]
            for g in _warp(self._scaled(x, params, rand), sub_params):
                col = _draw(g.scores, [gens[rand[j]] for j in g.rows])
                tok = col if g.index is None else g.index.gather(1, col.unsqueeze(1)).squeeze(1)
                chosen.index_copy_(0, torch.tensor([rand[j] for j in g.rows], device=dev), tok)

        token_ids = chosen.tolist()
        out_lp: list[float | None] = [None] * n
        out_top: list[list[tuple[int, float]] | None] = [None] * n
        if logprobs_all is not None:
            li = torch.tensor([token_ids[i] for i in lp_rows], device=dev).unsqueeze(1)
            chosen_lp = logprobs_all.gather(1, li).squeeze(1).tolist()
            kmax = max(params[i].logprobs or 0 for i in lp_rows)
            if kmax:
                tv, ti = torch.topk(logprobs_all, min(kmax, x.shape[1]), dim=1)
                tv, ti = tv.tolist(), ti.tolist()
            for j, i in enumerate(lp_rows):
                k = params[i].logprobs or 0
                out_lp[i] = chosen_lp[j]
                out_top[i] = list(zip(ti[j][:k], tv[j][:k])) if k else []
        return SamplerOutput(token_ids, out_lp, out_top)

    def distribution(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                     histories: Sequence[TokenHistory] | None = None) -> torch.Tensor:
        """The probabilities [B, V] (float32) that `sample` draws from: penalties, temperature, top-k,
        top-p and min-p applied; one-hot at the argmax for greedy rows. For tests and for verifying
        speculative tokens."""
        self._check(logits, params, None, histories, seeded_need_generators=False)
        x = self._process(logits, params, histories)
        out = torch.zeros_like(x)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            gi = torch.tensor(greedy, device=x.device)
            out[gi, _take(x, greedy).argmax(dim=1)] = 1.0
        if rand:
            for g in _warp(self._scaled(x, params, rand), [params[i] for i in rand]):
                probs = torch.softmax(g.scores, dim=1)
                rows = torch.tensor([rand[j] for j in g.rows], device=x.device)
                dense = probs if g.index is None else \
                    torch.zeros(len(g.rows), x.shape[1], device=x.device).scatter_(1, g.index, probs)
                out.index_copy_(0, rows, dense)
        return out
