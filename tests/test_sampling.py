"""Sampler: parameter validation, greedy / top-k / top-p / min-p, penalties, seeds, logprobs, stop strings."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.engine.sampling import (
    Sampler,
    SamplingParams,
    TokenHistory,
    apply_penalties,
    make_generator,
)
from thrifty.engine.stop import StopChecker
from thrifty.errors import InvalidRequestError

V = 50


def _logits(b: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _hist(n: int, v: int = V, seed: int = 1) -> list[TokenHistory]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen, olen = int(torch.randint(0, 12, (1,), generator=g)), int(torch.randint(0, 12, (1,), generator=g))
        out.append(TokenHistory(torch.randint(0, v, (plen,), generator=g).tolist(),
                                torch.randint(0, v, (olen,), generator=g).tolist()))
    return out


# -- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.5),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", 5e-324),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1),
    ("logprobs", -1), ("logprobs", 21),
    ("stop", 5), ("stop", ["ok", 3]), ("stop", ""), ("stop", ["a", ""]),
    ("stop_token_ids", ["x"]), ("stop_token_ids", [1.5]), ("stop_token_ids", 7),
    ("seed", "abc"), ("seed", 1.5), ("seed", 2**64),
    ("min_tokens", -1), ("min_tokens", 100),
])
def test_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, InvalidRequestError)
    assert info.value.param == field


def test_valid_params_normalised() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b", "a")).stop == ["a", "b"]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy
    SamplingParams(top_k=-1, top_p=1.0, min_p=1.0, logprobs=0, seed=-5, presence_penalty=-2, frequency_penalty=2)


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


# -- greedy, top-k, top-p, min-p ---------------------------------------------------------------

def test_greedy_is_argmax_any_dtype() -> None:
    x = _logits(6)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dt)
        out = Sampler().sample(xd, [SamplingParams(temperature=0)] * 6)
        assert out.token_ids == xd.float().argmax(dim=1).tolist()
        assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_greedy_shortcut_picks_what_the_float32_path_picks() -> None:
    # plain greedy rows skip the float32 copy; asking for logprobs takes the full path: same tokens, ties included
    x = _logits(8).to(torch.bfloat16)
    x[0, 5] = x[0, 9] = x[0].max() + 1          # a tie: the first index wins on both paths
    fast = Sampler().sample(x, [SamplingParams(temperature=0)] * 8)
    full = Sampler().sample(x, [SamplingParams(temperature=0, logprobs=0)] * 8)
    assert fast.token_ids == full.token_ids and fast.token_ids[0] == 5


def test_non_contiguous_logits() -> None:
    big = _logits(6, v=2 * V)
    x = big[::2, :V]  # every other row, first half of the columns
    assert not x.is_contiguous()
    hist = _hist(3)
    out = Sampler().sample(x, [SamplingParams(temperature=0, repetition_penalty=1.5)] * 3, histories=hist)
    ref = [int(_reference_penalties(x[i], SamplingParams(repetition_penalty=1.5), hist[i]).argmax())
           for i in range(3)]
    assert out.token_ids == ref


def test_logits_not_modified() -> None:
    x = _logits(3)
    before = x.clone()
    hist = _hist(3)
    Sampler().sample(x, [SamplingParams(top_k=3, top_p=0.5, repetition_penalty=1.3, presence_penalty=1.0)] * 3,
                     histories=hist)
    assert torch.equal(x, before)


def test_top_k_1_is_greedy() -> None:
    x = _logits(8)
    out = Sampler().sample(x, [SamplingParams(temperature=1.3, top_k=1)] * 8)
    assert out.token_ids == x.argmax(dim=1).tolist()


def _support(probs: torch.Tensor) -> list[set[int]]:
    return [set((r > 0).nonzero().flatten().tolist()) for r in probs]


@pytest.mark.parametrize("vocab", [V, 3000])  # below and above the candidate width of top-k / top-p
def test_top_k_keeps_k_highest(vocab: int) -> None:
    x = _logits(4, v=vocab)
    ks = [5, 0, -1, 12]
    probs = Sampler().distribution(x, [SamplingParams(top_k=k) for k in ks])
    for row, k in enumerate([5, vocab, vocab, 12]):
        kept = x[row].topk(k).indices
        assert _support(probs[row:row + 1])[0] == set(kept.tolist())
        torch.testing.assert_close(probs[row, kept], torch.softmax(x[row, kept], 0))


def test_top_p_mass_on_hand_made_distribution() -> None:
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    params = [SamplingParams(top_p=0.3), SamplingParams(top_p=0.6), SamplingParams(top_p=0.9),
              SamplingParams(top_p=0.9, top_k=2), SamplingParams(top_p=0.5, temperature=0.5)]
    probs = Sampler().distribution(p.log().repeat(5, 1), params)
    assert _support(probs) == [
        {1},  # 0.4 >= 0.3
        {1, 3},  # 0.65 >= 0.6
        {1, 3, 4, 2},  # 0.95 >= 0.9
        {1, 3},  # top-k 2 first
        {1},  # at temperature 0.5 token 1 alone has 0.16 / 0.2675 = 0.6 >= 0.5
    ]
    assert probs[1, 1].item() == pytest.approx(0.4 / 0.65, rel=1e-5)
    assert probs[1, 3].item() == pytest.approx(0.25 / 0.65, rel=1e-5)
    assert probs[2].sum().item() == pytest.approx(1.0, rel=1e-6)
    # the sampler only ever draws from the nucleus
    out = Sampler().sample(p.log().repeat(500, 1), [SamplingParams(top_p=0.6)] * 500)
    assert set(out.token_ids) == {1, 3}


def test_top_p_large_vocab_and_fallback_to_full_sort() -> None:
    v = 5000
    peaked = torch.randn(1, v, generator=torch.Generator().manual_seed(2)) * 4
    flat = torch.randn(1, v, generator=torch.Generator().manual_seed(3)) * 0.1  # nucleus > 1024 tokens
    x = torch.cat([peaked, flat])
    for top_p in (0.5, 0.9, 0.99):
        probs = Sampler().distribution(x, [SamplingParams(top_p=top_p)] * 2)
        for row in range(2):
            full = torch.softmax(x[row].double(), 0)
            srt, order = full.sort(descending=True)
            n_keep = int(((srt.cumsum(0) - srt) < top_p).sum())
            assert _support(probs[row:row + 1])[0] == set(order[:n_keep].tolist())
            kept_mass = srt[:n_keep].sum().item()
            assert kept_mass >= top_p
            torch.testing.assert_close(probs[row, order[:n_keep]].double(), srt[:n_keep] / kept_mass,
                                       rtol=1e-4, atol=1e-7)
    assert len(_support(Sampler().distribution(flat, [SamplingParams(top_p=0.9)]))[0]) > 1024


def test_top_p_one_keeps_everything_even_tiny_tail() -> None:
    x = torch.cat([torch.tensor([[30.0]]), torch.zeros(1, 1000) - 20], dim=1)
    probs = Sampler().distribution(x, [SamplingParams(top_p=1.0, top_k=-1)])
    assert len(_support(probs)[0]) == 1001


def test_min_p() -> None:
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    probs = Sampler().distribution(p.log().repeat(4, 1),
                                   [SamplingParams(min_p=m) for m in (0.0, 0.1, 0.25)] + [
                                       SamplingParams(min_p=0.15, top_p=0.95)])
    assert _support(probs) == [{0, 1, 2, 3, 4}, {0, 1, 2, 3}, {0, 1}, {0, 1, 2}]
    out = Sampler().sample(p.log().repeat(400, 1), [SamplingParams(min_p=0.25)] * 400)
    assert set(out.token_ids) == {0, 1}


def test_greedy_distribution_is_one_hot() -> None:
    x = _logits(2)
    probs = Sampler().distribution(x, [SamplingParams(temperature=0), SamplingParams(temperature=0.5)])
    assert probs[0].sum() == 1.0 and probs[0, x[0].argmax()] == 1.0
    torch.testing.assert_close(probs[1], torch.softmax(x[1] / 0.5, 0))


def test_min_p_after_temperature() -> None:
    # At temperature 2 the ratio p_i / p_max is sqrt of the original: 0.04/0.5 = 0.08 -> 0.28 >= 0.25.
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    out = Sampler().sample(p.log().repeat(2000, 1), [SamplingParams(min_p=0.25, temperature=2.0)] * 2000)
    assert set(out.token_ids) == {0, 1, 2, 3, 4}


# -- penalties ---------------------------------------------------------------------------------

def _reference_penalties(x: torch.Tensor, p: SamplingParams, h: TokenHistory) -> torch.Tensor:
    x = x.clone().tolist()
    for t in set(h.prompt_token_ids) | set(h.output_token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(h.output_token_ids):
        c = list(h.output_token_ids).count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return torch.tensor(x)


def test_penalties_match_reference() -> None:
    n = 12
    x = _logits(n, seed=3)
    hist = _hist(n, seed=4)
    g = torch.Generator().manual_seed(5)
    params = []
    for i in range(n):
        r = torch.rand(3, generator=g).tolist()
        params.append(SamplingParams(
            repetition_penalty=1.0 if i % 4 == 0 else 0.5 + 1.5 * r[0],
            presence_penalty=0.0 if i % 3 == 0 else 4 * r[1] - 2,
            frequency_penalty=0.0 if i % 5 == 0 else 4 * r[2] - 2,
        ))
    y = x.clone()
    apply_penalties(y, params, hist)
    for i in range(n):
        torch.testing.assert_close(y[i], _reference_penalties(x[i], params[i], hist[i]), rtol=1e-6, atol=1e-6)


def test_penalties_change_greedy_choice_and_logprobs() -> None:
    x = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    h = [TokenHistory([0], [])]
    s = Sampler()
    assert s.sample(x, [SamplingParams(temperature=0)], histories=h).token_ids == [0]
    out = s.sample(x, [SamplingParams(temperature=0, repetition_penalty=1.2, logprobs=1)], histories=h)
    assert out.token_ids == [1]
    ref = torch.log_softmax(torch.tensor([2.0 / 1.2, 1.9, 0.0, -1.0]), 0)
    assert out.logprobs[0] == pytest.approx(ref[1].item(), abs=1e-6)
    # presence/frequency read output tokens only
    h2 = [TokenHistory([0, 0, 0], [1, 1])]
    out = s.sample(x, [SamplingParams(temperature=0, frequency_penalty=0.5)], histories=h2)
    assert out.token_ids == [0]


def test_histories_required_for_penalties() -> None:
    with pytest.raises(ValueError, match="histories"):
        Sampler().sample(_logits(1), [SamplingParams(presence_penalty=1.0)])


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    x = torch.zeros(2, 6)
    x[:, 5] = 50.0  # EOS
    x[:, 4] = 40.0  # a stop token id
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4], logprobs=0)
    s = Sampler(eos_token_ids={5})
    out = s.sample(x, [p, p], histories=[TokenHistory([1], [2, 2]), TokenHistory([1], [2, 2, 2])])
    assert out.token_ids[0] not in (4, 5) and out.token_ids[1] == 5
    assert math.isfinite(out.logprobs[0])


# -- seeds and distribution --------------------------------------------------------------------

@pytest.mark.parametrize("target_params", [
    SamplingParams(temperature=0.9, seed=1234),
    SamplingParams(temperature=0.9, top_p=0.95, seed=1234),
    SamplingParams(temperature=1.2, top_k=40, min_p=0.01, seed=99),
    SamplingParams(temperature=0.8, top_k=1500, top_p=0.99, seed=7),  # wider than the candidate set
])
def test_seeded_row_independent_of_batch(target_params: SamplingParams) -> None:
    v = 3000
    # coarse logits (many exact ties, as bf16 logits have) make tie-breaking order matter
    target = (torch.randn(1, v, generator=torch.Generator().manual_seed(11)) * 4).round() / 2
    s = Sampler()

    def run(batch_of: int, row: int, other_seed: int) -> list[int]:
        g_self = make_generator(target_params.seed)
        gen = torch.Generator().manual_seed(other_seed)
        others = torch.randn(batch_of, v, generator=gen) * 2
        other_params = [SamplingParams(temperature=[0.5, 1.0, 0.0][i % 3] + i * 0.1,
                                       top_k=[0, 5, 2000][i % 3], min_p=[0, 0.05][i % 2],
                                       top_p=[1.0, 0.8][i % 2], seed=None if i % 2 else 100 + i)
                        for i in range(batch_of)]
        other_gens = [make_generator(p.seed) for p in other_params]
        toks = []
        for _ in range(20):
            x = torch.cat([others[:row], target, others[row:]])
            params = other_params[:row] + [target_params] + other_params[row:]
            gens = other_gens[:row] + [g_self] + other_gens[row:]
            toks.append(s.sample(x, params, gens).token_ids[row])
        return toks

    alone = run(0, 0, 0)
    assert len(set(alone)) > 1  # actually random
    assert run(7, 3, 1) == alone
    assert run(7, 7, 2) == alone
    assert run(7, 0, 3) == alone


def test_seeded_needs_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        Sampler().sample(_logits(1), [SamplingParams(seed=3)])


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_one_matches_softmax() -> None:
    torch.manual_seed(0)
    v, n = 8, 40_000
    x = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    out = Sampler().sample(x.repeat(n, 1), [SamplingParams()] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=v).float()
    # df = 7: P(chi2 > 24.3) = 0.001
    assert _chi_square(counts, torch.softmax(x, 0)) < 24.3


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=6, temperature=0.8),  # candidate path (vocab > 1024)
    SamplingParams(top_p=0.5, min_p=0.02),  # candidate path, renormalised nucleus
    SamplingParams(top_k=1100, top_p=0.7, temperature=3.0),  # full sort
])
def test_truncated_sampling_matches_distribution(params: SamplingParams) -> None:
    torch.manual_seed(1)
    v, n = 1200, 6000
    x = torch.randn(1, v, generator=torch.Generator().manual_seed(8)) * 2
    x[0, :8] += torch.tensor([6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5])
    probs = Sampler().distribution(x, [params])[0]
    support = (probs > 0).nonzero().flatten()
    counts = torch.zeros(v)
    for _ in range(2):
        out = Sampler().sample(x.repeat(n, 1), [params] * n)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=v).float()
    assert set(counts.nonzero().flatten().tolist()) <= set(support.tolist())
    # lump the rare tokens so every bin expects >= 20
    big = probs[support] * 2 * n >= 20
    obs = torch.cat([counts[support][big], counts[support][~big].sum().view(1)])
    exp = torch.cat([probs[support][big], probs[support][~big].sum().view(1)])
    if exp[-1] * 2 * n < 20:
        obs, exp = obs[:-1], exp[:-1]
    dof = len(exp) - 1
    assert _chi_square(obs, exp / exp.sum()) < dof + 4 * math.sqrt(2 * dof) + 5  # p < ~0.001


def test_temperature_and_seeded_generator_distribution() -> None:
    v, steps = 6, 3000
    x = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0, -0.5]])
    p = SamplingParams(temperature=0.7, seed=42)
    g = make_generator(42)
    s = Sampler()
    toks = [s.sample(x, [p], [g]).token_ids[0] for _ in range(steps)]
    counts = torch.bincount(torch.tensor(toks), minlength=v).float()
    assert _chi_square(counts, torch.softmax(x[0] / 0.7, 0)) < 20.5  # df = 5, p = 0.001


# -- logprobs ----------------------------------------------------------------------------------

def test_logprobs() -> None:
    x = _logits(5, seed=9).to(torch.bfloat16)
    params = [SamplingParams(logprobs=3), SamplingParams(logprobs=0, temperature=0), SamplingParams(),
              SamplingParams(logprobs=20, top_k=2, temperature=0.3), SamplingParams(logprobs=1, seed=1)]
    gens = [make_generator(p.seed) for p in params]
    out = Sampler().sample(x, params, gens)
    ref = torch.log_softmax(x.float(), dim=1)
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(ref[i, out.token_ids[i]].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert len(top) == p.logprobs
        vals = [lp for _, lp in top]
        assert vals == sorted(vals, reverse=True)
        for tok, lp in top:
            assert isinstance(tok, int) and lp == pytest.approx(ref[i, tok].item(), abs=1e-5)
        if top:
            assert top[0][0] == int(ref[i].argmax())


def test_empty_batch() -> None:
    out = Sampler().sample(torch.zeros(0, V), [])
    assert out.token_ids == [] and out.logprobs == []


# -- stop strings ------------------------------------------------------------------------------

def test_stop_straddles_boundary() -> None:
    c = StopChecker(["###"])
    r = c.check("hello #", "## world")
    assert r.finished and r.text == "hello " and r.stop == "###"
    r = c.check("hello #", "# world")
    assert not r.finished and r.text == "hello ## world"


def test_first_completed_stop_wins() -> None:
    c = StopChecker(["world", "lo w", "o"])
    r = c.check("hel", "lo world")
    assert r.finished and r.stop == "o" and r.text == "hell"
    # "c" completes before "abcd" does, whatever the chunking
    c = StopChecker(["abcd", "c"])
    assert c.check("x", "abcd").text == "xab"
    assert c.check("xab", "cd").text == "xab"
    # both end at the same character: the longest wins
    c = StopChecker(["bc", "abc"])
    r = c.check("x", "abcd")
    assert r.stop == "abc" and r.text == "x"
    c = StopChecker(["ab", "abc"], include_stop_str_in_output=True)
    r = c.check("x", "abcd")
    assert r.stop == "ab" and r.text == "xab"


def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), True
    return text, False


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=12),
    include=st.booleans(),
)
def test_streaming_stop_matches_reference(text: str, stops: list[str], cuts: list[int], include: bool) -> None:
    """Feed text in arbitrary pieces, stream what holdback allows: the stream never sends a character
    that a later stop removes, and the final text equals the one-character-at-a-time reference."""
    c = StopChecker(stops, include)
    bounds = sorted({0, len(text), *[min(x, len(text)) for x in cuts]})
    acc, sent, finished = "", "", False
    for lo, hi in zip(bounds, bounds[1:]):
        r = c.check(acc, text[lo:hi])
        acc = r.text
        if r.finished:
            finished = True
            break
        sent = acc[: c.streamable(acc)]
    ref, ref_finished = _reference_stop(text, stops, include)
    assert finished == ref_finished
    assert acc == ref
    assert ref.startswith(sent)


def test_include_stop_str_in_output() -> None:
    c = StopChecker(["END"], include_stop_str_in_output=True)
    r = c.check("abc E", "ND tail")
    assert r.finished and r.text == "abc END"
    assert c.holdback("abc EN") == 0


def test_no_stop_and_empty_new_text() -> None:
    assert not StopChecker([]).check("a", "b").finished
    r = StopChecker(["x"]).check("abc", "")
    assert not r.finished and r.text == "abc"


def test_holdback() -> None:
    c = StopChecker(["</s>", "\n\n", "STOP"])
    assert c.holdback("hello") == 0
    assert c.holdback("hello <") == 1
    assert c.holdback("hello </") == 2
    assert c.holdback("hello </s") == 3
    assert c.holdback("line\n") == 1
    assert c.holdback("ST") == 2
    assert c.holdback("S") == 1
    assert c.streamable("text </") == len("text ")
    # a stop held back across steps is found when it completes
    text = "text </"
    r = c.check(text, "s> more")
    assert r.finished and r.text == "text "


def test_from_params() -> None:
    c = StopChecker.from_params(SamplingParams(stop=["a"], include_stop_str_in_output=True))
    assert c.stops == ["a"] and c.include_stop
