"""Speculative decoding (engine/speculative.py): the n-gram proposer, exact verification, KV roll-back, stops.

Greedy decoding with speculation must give token for token what plain decoding gives; sampled decoding must
draw from the target's distribution exactly (chi-square against a verifier that is known to be wrong); the
rejected drafts' KV slots go back to the block manager and never reach the prefix cache."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from thrifty.engine.block_manager import hash_block_tokens
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams, draw_from_probs
from thrifty.engine.speculative import NgramIndex, SpeculativeConfig, Speculator, verify_greedy, verify_sampled
from thrifty.errors import InvalidRequestError
from thrifty.models.loader import load

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
NGRAM = dict(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3, disable_by_batch_size=64)


def make_engine(path, speculative=None, **options) -> LLMEngine:
    options.setdefault("dtype", "float32")
    config = EngineConfig(speculative=speculative, **options)
    return LLMEngine(load(path, config.dtype), config)


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random phrase, so prompt lookup proposes; the random model's continuation
    sometimes follows the phrase and sometimes not, so drafts are both kept and rejected."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(1, 900) for _ in range(rng.randrange(5, 14))]
        noise = [rng.randrange(1, 900) for _ in range(rng.randrange(0, 20))]
        out.append(noise + phrase * rng.randrange(2, 5) + phrase[:rng.randrange(1, len(phrase))])
    return out


def run_ids(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    outputs = engine.run(prompts, [params] * len(prompts))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [out.token_ids for out in outputs]


def assert_kept_and_rejected(engine: LLMEngine) -> None:
    s = engine.speculator.stats
    assert s.num_accepted_tokens > 0, "no draft was ever kept: the test would pass vacuously"
    assert s.num_draft_tokens > s.num_accepted_tokens, "no draft was ever rejected: roll-back is untested"


@pytest.fixture(scope="module")
def plain(tiny_gguf):
    prompts = repetitive_prompts(12)
    return prompts, run_ids(make_engine(tiny_gguf), prompts)


# ---- the n-gram proposer ---------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_match():
    index = NgramIndex(1, 3)
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    assert index.lookup(tokens, 2) == [2, 3]          # (6, 7) last seen before the end at 6..7 -> 2, 3
    assert index.lookup(tokens + [2], 5) == [3, 6, 7, 2]  # (6, 7, 2) -> up to the end
    assert index.lookup([1, 2, 3], 4) == []            # nothing repeats
    assert NgramIndex(2, 3).lookup([4, 1, 9, 1], 3) == []  # only one-token matches, below ngram_min


def test_ngram_prefers_the_longest_match():
    index = NgramIndex(1, 3)
    tokens = [1, 2, 3, 40, 9, 3, 50, 2, 3]             # (3,) last -> 50; (2, 3) -> 40
    assert index.lookup(tokens, 1) == [40]


# ---- greedy: identical outputs -----------------------------------------------------------------------------


def test_greedy_single_requests_identical(tiny_gguf, plain):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, NGRAM)
    for prompt, want in list(zip(prompts, expected))[:4]:
        assert run_ids(engine, [prompt]) == [want]
    assert_kept_and_rejected(engine)


@pytest.mark.parametrize("options", [
    dict(),
    dict(enable_prefix_caching=True, block_size=4),
    dict(max_num_batched_tokens=24),                                   # chunked prefill beside drafts
    dict(num_kv_blocks=60, block_size=4),                              # forced preemption
    dict(scheduler_policy="static", max_num_seqs=4),
], ids=["batched", "prefix-cache", "chunked", "preemption", "static"])
def test_greedy_batched_identical(tiny_gguf, plain, options):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, NGRAM, **options)
    assert run_ids(engine, prompts) == expected
    assert_kept_and_rejected(engine)
    if options.get("num_kv_blocks"):
        assert engine.stats.preemptions > 0


def test_greedy_with_penalty_goes_through_the_sampler_distribution(tiny_gguf, plain):
    """A penalty makes verification read Sampler.distribution with the drafts counted as output (penalties
    that favour repeats, so that prompt lookup finds something)."""
    prompts, _ = plain
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=0.8,
                            frequency_penalty=-0.4)
    assert_same_as_plain(tiny_gguf, prompts[:6], params)


def assert_same_as_plain(path, prompts, params: SamplingParams) -> None:
    """With n-gram speculation the outputs are plain decoding's, and drafts were both kept and rejected."""
    expected = run_ids(make_engine(path), prompts, params)
    engine = make_engine(path, NGRAM)
    assert run_ids(engine, prompts, params) == expected
    assert_kept_and_rejected(engine)


def test_top_k_1_sampling_equals_plain(tiny_gguf, plain):
    """Sampled rows with top_k=1 are deterministic: rejection sampling must reproduce plain decoding."""
    prompts, _ = plain
    params = SamplingParams(temperature=0.8, top_k=1, max_tokens=30, ignore_eos=True, seed=7)
    assert_same_as_plain(tiny_gguf, prompts[:6], params)


def test_seeded_sampling_is_reproducible(tiny_gguf, plain):
    prompts, _ = plain
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30, ignore_eos=True, seed=1234)
    first = run_ids(make_engine(tiny_gguf, NGRAM), prompts[:4], params)
    assert run_ids(make_engine(tiny_gguf, NGRAM), prompts[:4], params) == first


def test_opt_outs_do_not_speculate(tiny_gguf, plain):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, NGRAM)
    outs = engine.run(prompts[:3], [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1),
                                    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, speculative=False),
                                    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, speculative=False)])
    assert [o.token_ids for o in outs] == expected[:3]
    assert len(outs[0].logprobs) == 40
    assert engine.speculator.stats.num_drafts == 0


def test_large_batch_turns_speculation_off(tiny_gguf, plain):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, {**NGRAM, "disable_by_batch_size": 4}, max_num_seqs=12)
    assert run_ids(engine, prompts) == expected
    assert engine.speculator.stats.num_drafts == 0      # 12 requests decode in lockstep until the end


def test_usage_and_snapshot_report_acceptance(tiny_gguf, plain):
    from thrifty.engine.snapshot import EngineSnapshot

    prompts, _ = plain
    engine = make_engine(tiny_gguf, NGRAM)
    outs = engine.run(prompts[:4], [GREEDY] * 4)
    snap = EngineSnapshot.of(engine)
    s = engine.speculator.stats
    assert sum(o.usage.accepted_tokens or 0 for o in outs) == s.num_accepted_tokens == snap.spec_num_accepted_tokens
    assert snap.spec_num_drafts == s.num_drafts and sum(snap.spec_accepted_per_pos) == s.num_accepted_tokens
    assert make_engine(tiny_gguf).run(prompts[:1], [GREEDY])[0].usage.accepted_tokens is None


# ---- KV roll-back and the prefix cache ---------------------------------------------------------------------


def chain_hashes(tokens: list[int], block_size: int) -> set[bytes]:
    hashes, parent = set(), None
    for i in range(len(tokens) // block_size):
        parent = hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size], None)
        hashes.add(parent)
    return hashes


def test_prefix_cache_holds_only_verified_tokens(tiny_gguf, plain):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, NGRAM, block_size=4)
    outs = engine.run(prompts, [GREEDY] * len(prompts))
    assert_kept_and_rejected(engine)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    valid = set().union(*(chain_hashes(o.prompt_token_ids + o.token_ids, 4) for o in outs))
    assert bm._index and set(bm._index) <= valid, "a cached block holds a token that is not in any output"

    # a request that shares a prompt and part of an output hits those blocks and still decodes correctly
    follow = [prompts[i] + expected[i][:17] for i in range(4)]
    want = run_ids(make_engine(tiny_gguf, enable_prefix_caching=False), follow)
    hits = bm.stats.hits
    assert run_ids(engine, follow) == want
    assert bm.stats.hits > hits


def test_trim_returns_blocks_and_keeps_cached_ones():
    from thrifty.engine.block_manager import BlockManager

    bm = BlockManager(8, block_size=4)
    tokens = list(range(1, 10))
    assert bm.allocate("r", tokens, 9) == 0
    bm.cache_full_blocks("r", tokens, 9)              # two full blocks hashed
    assert bm.allocate("r", tokens, 6) == 0           # 1 token + 5 drafts: 15 slots, 4 blocks
    assert bm.num_free_blocks == 4
    bm.trim("r", 10)                                  # one draft kept: 10 tokens, 3 blocks
    assert bm.num_free_blocks == 5 and bm.num_allocated_tokens("r") == 10
    with pytest.raises(ValueError):
        bm.trim("r", 7)                               # below the cached blocks
    bm.free("r")
    assert bm.num_free_blocks == 8


def test_abort_while_speculating_frees_every_block(tiny_gguf, plain):
    prompts, _ = plain
    engine = make_engine(tiny_gguf, NGRAM, block_size=4)
    for p in prompts[:5]:
        engine.add_request(p, GREEDY)
    while engine.speculator.stats.num_drafts < 5 and engine.has_unfinished():
        engine.step()
    assert engine.speculator.stats.num_drafts >= 5 and engine.has_unfinished()
    engine.speculator.propose(engine.scheduler.running, engine.max_model_len)  # drafts pending, then abort
    engine.abort_all()
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- stop conditions inside a kept run -----------------------------------------------------------------------


@dataclass(slots=True)
class OracleProposer:
    """Proposes the plain run's own next tokens (all kept), so a run of kept drafts crosses every position."""
    expected: dict[int, list[int]]               # prompt length -> plain greedy output

    def propose(self, seqs, num_tokens):
        out = []
        for seq, k in zip(seqs, num_tokens):
            want, done = self.expected[seq.num_prompt_tokens], len(seq.output_token_ids)
            out.append(want[done:done + k])
        return out

    def release(self, request_id):
        pass


def oracle_engine(tiny_gguf, prompts, expected) -> tuple[LLMEngine, list[list[int]]]:
    """An engine whose proposer knows the answers, and a list that collects what each verification kept."""
    engine = make_engine(tiny_gguf, NGRAM)
    engine.speculator = Speculator(engine.config.speculative,
                                   OracleProposer({len(p): e for p, e in zip(prompts, expected)}))
    kept: list[list[int]] = []
    execute = engine.runner.execute

    def spy(batch, watch):
        seqs, samples, verified = execute(batch, watch)
        kept.extend(v.token_ids for v in verified)
        return seqs, samples, verified
    engine.runner.execute = spy
    return engine, kept


def inside_a_run(expected: list[int]) -> int:
    """A position whose token appears there first and that a step of 1 + 4 kept drafts does not end on:
    steps emit positions [0], [1..5], [6..10], ..."""
    for pos in range(2, len(expected)):
        if (pos - 1) % 5 != 4 and expected[pos] not in expected[:pos]:
            return pos
    pytest.skip("every token repeats an earlier one")


def test_stop_token_inside_a_kept_run(tiny_gguf, plain):
    prompts, expected = plain
    i = 0
    pos = inside_a_run(expected[i])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[expected[i][pos]])
    engine, kept = oracle_engine(tiny_gguf, prompts[i:i + 1], expected[i:i + 1])
    got = engine.run([prompts[i]], [params])[0]
    assert got.token_ids == expected[i][:pos + 1] and got.finish_reason == "stop"
    assert len(got.delta_token_ids) < len(kept[-1]), "the stop did not cut a run of kept tokens"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_tokens_inside_a_kept_run(tiny_gguf, plain):
    prompts, expected = plain
    for n in (3, 4, 9):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        engine, kept = oracle_engine(tiny_gguf, prompts[:1], expected[:1])
        got = engine.run([prompts[0]], [params])[0]
        assert got.token_ids == expected[0][:n] and got.finish_reason == "length"


def test_stop_string_inside_a_kept_run(tiny_gguf, plain):
    prompts, expected = plain
    text = make_engine(tiny_gguf).run([prompts[0]], [GREEDY])[0].text
    pos = inside_a_run(expected[0])
    tok = make_engine(tiny_gguf).tokenizer
    stop = tok.decode(expected[0][:pos + 1])[-2:]
    if not stop.strip() or text.find(stop) < len(tok.decode(expected[0][:pos])) - 1:
        pytest.skip("no stop string that first appears at that token")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=stop)
    want = make_engine(tiny_gguf).run([prompts[0]], [params])[0]
    engine, kept = oracle_engine(tiny_gguf, prompts[:1], expected[:1])
    got = engine.run([prompts[0]], [params])[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    assert len(got.delta_token_ids) < len(kept[-1]), "the stop did not cut a run of kept tokens"


# ---- rejection sampling: the target's distribution exactly ----------------------------------------------------


P0 = torch.tensor([0.05, 0.30, 0.10, 0.20, 0.15, 0.02, 0.08, 0.10])
P1 = torch.tensor([0.25, 0.05, 0.05, 0.30, 0.05, 0.10, 0.10, 0.10])
P2 = torch.tensor([0.10, 0.10, 0.40, 0.10, 0.10, 0.05, 0.05, 0.10])
DRAWS = 20_000


def accept_everything(probs, draft, generator):
    return draft + [int(draw_from_probs(probs[len(draft):], [generator])[0])]


def resample_from_p(probs, draft, generator):
    """Wrong in a subtler way: on rejection it draws from p itself, not from p without the draft."""
    k = len(draft)
    u = torch.rand(k, dtype=torch.float64, generator=generator).tolist()
    for j in range(k):
        if u[j] >= float(probs[j, draft[j]]):
            return draft[:j] + [int(draw_from_probs(probs[j:j + 1], [generator])[0])]
    return draft + [int(draw_from_probs(probs[k:], [generator])[0])]


def first_and_second(verifier, draft) -> tuple[Counter, Counter]:
    probs = torch.stack([P0, P1, P2])
    gen = torch.Generator().manual_seed(0)
    first, second = Counter(), Counter()
    for _ in range(DRAWS):
        tokens = verifier(probs, draft, gen)
        first[tokens[0]] += 1
        if tokens[0] == draft[0] and len(tokens) > 1:
            second[tokens[1]] += 1
    return first, second


def p_value(counts: Counter, p: torch.Tensor) -> float:
    observed = [counts[i] for i in range(len(p))]
    total = sum(observed)
    expected = p.double() / p.double().sum() * total   # sums to total in float64, as chisquare checks
    return chisquare_pvalue(observed, expected.tolist())


def chisquare_pvalue(observed: list[float], expected: list[float]) -> float:
    """Pearson's chi-square test: P(X >= statistic) for X ~ chi2(k - 1), by the regularized upper incomplete
    gamma function Q(dof / 2, statistic / 2) (what scipy.stats.chisquare computes)."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_sampling_matches_the_target():
    first, second = first_and_second(verify_sampled, [3, 0])
    assert p_value(first, P0) > 0.01
    assert p_value(second, P1) > 0.01                 # given the first draft was kept, the next follows P1


@pytest.mark.parametrize("wrong", [accept_everything, resample_from_p])
def test_a_wrong_verifier_fails_the_same_test(wrong):
    first, second = first_and_second(wrong, [3, 0])
    assert min(p_value(first, P0), p_value(second, P1)) < 1e-6


def test_rejection_sampling_with_a_draft_distribution():
    """The draft-model form: keep x with min(1, p/q), else draw from norm(max(0, p - q))."""
    q = torch.tensor([[0.40, 0.05, 0.05, 0.20, 0.10, 0.10, 0.05, 0.05]])
    gen, draft_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    probs = torch.stack([P0, P1])
    counts = Counter()
    for _ in range(DRAWS):
        x = int(draw_from_probs(q, [draft_gen])[0])
        counts[verify_sampled(probs, [x], gen, draft_probs=q)[0]] += 1
    assert p_value(counts, P0) > 0.01


def test_verify_greedy():
    assert verify_greedy([4, 5, 6], [4, 5]) == [4, 5, 6]
    assert verify_greedy([4, 9, 6], [4, 5]) == [4, 9]
    assert verify_greedy([7, 5, 6], [4, 5]) == [7]


# ---- config ------------------------------------------------------------------------------------------------


def test_adaptive_draft_length():
    from thrifty.engine.speculative import next_num_tokens

    assert next_num_tokens(3, 3, 8) == 4          # all kept: one more
    assert next_num_tokens(8, 8, 8) == 8          # never past the configured most
    assert next_num_tokens(6, 2, 8) == 3          # a rejection: one more than kept
    assert next_num_tokens(4, 0, 8) == 1


def test_config_forms_and_errors(tiny_gguf):
    assert EngineConfig().speculative.method == "off"
    assert EngineConfig(speculative="ngram").speculative == SpeculativeConfig(method="ngram")
    assert EngineConfig(speculative={"method": "ngram", "num_tokens": 3}).speculative.num_tokens == 3
    with pytest.raises(InvalidRequestError, match="needs a draft_model"):
        EngineConfig(speculative={"method": "draft"})
    with pytest.raises(InvalidRequestError, match="unknown speculative method"):
        EngineConfig(speculative="eagle")
    with pytest.raises(InvalidRequestError, match="ngram_min"):
        SpeculativeConfig(method="ngram", ngram_min=3, ngram_max=2)
    assert make_engine(tiny_gguf).speculator is None


# ---- the real model ---------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_model_greedy_identical_on_humaneval(qwen05_gguf):
    """Qwen2.5-Coder-0.5B in float32 (as the other real-model equality tests: bf16 rounding differs between a
    one-token decode and a multi-token verification, which may flip a near-tie): 4 HumanEval chat prompts and
    2 code edits, 64 tokens, with and without n-gram speculation."""
    from thrifty.bench.spec import workload_messages

    loaded = load(qwen05_gguf, "float32")
    tok = loaded.tokenizer
    messages = workload_messages("chat", 4) + workload_messages("code-edit", 2)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True),
                          add_special_tokens=False) for m in messages]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = {}
    for method in ("off", "ngram"):
        engine = LLMEngine(loaded, EngineConfig(dtype="float32", kv_cache_memory=0.25,
                                                speculative={"method": method, "disable_by_batch_size": 16}))
        outs[method] = [o.token_ids for o in engine.run(prompts, [params] * len(prompts))]
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert outs["ngram"] == outs["off"]
    assert engine.speculator.stats.num_accepted_tokens > 0


def test_config_file_cli_flags_and_metrics():
    import argparse

    from thrifty.cli import _speculative_section, build_parser
    from thrifty.config import ThriftyConfig
    from thrifty.engine.snapshot import EngineSnapshot
    from thrifty.server.metrics import _spec_decode_metrics

    config = ThriftyConfig(engine={"speculative": {"method": "ngram", "num_tokens": 3}})
    assert config.engine_config().speculative == SpeculativeConfig(method="ngram", num_tokens=3)
    with pytest.raises(InvalidRequestError, match="needs a draft_model"):
        ThriftyConfig(engine={"speculative": "draft"}).engine_config()

    flags = argparse.Namespace(speculative="ngram", num_speculative_tokens=None, ngram_min=1, ngram_max=None,
                               draft_model=None)
    assert _speculative_section(flags, {"num_tokens": 6}) == {"num_tokens": 6, "method": "ngram", "ngram_min": 1}
    none = argparse.Namespace(speculative=None, num_speculative_tokens=None, ngram_min=None, ngram_max=None,
                              draft_model=None)
    assert _speculative_section(none, {"method": "ngram"}) is None
    args = build_parser().parse_args(["serve", "--speculative", "draft", "--draft-model", "d", "--no-ngram-first"])
    assert _speculative_section(args)["ngram_first"] is False
    args = build_parser().parse_args(["serve", "--speculative", "draft", "--draft-model", "d"])
    assert "ngram_first" not in _speculative_section(args)      # the config's (or the default) stands

    snaps = [EngineSnapshot(1, 0, 10, 5, 0, 0, 64, 3, 9, 5, (3, 2, 0)), EngineSnapshot(1, 0, 10, 5, 0, 0, 64)]
    families = {m.name: m for m in _spec_decode_metrics(snaps)}
    assert families["thrifty_spec_decode_num_accepted_tokens"].samples[0].value == 5
    per_pos = families["thrifty_spec_decode_num_accepted_tokens_per_pos"].samples
    assert [(s.labels["position"], s.value) for s in per_pos] == [("0", 3), ("1", 2), ("2", 0)]
