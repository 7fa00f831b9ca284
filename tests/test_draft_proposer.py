"""The draft-model proposer (engine/draft_proposer.py) on tiny random GGUF models that share a vocabulary.

Three drafts for one target: the target itself (every draft kept), a near copy (kept and rejected) and another
random model (almost nothing kept). Greedy outputs must be plain decoding's, sampled tokens the target's
distribution (chi-square, and an accept-everything verifier must fail it), and both KV caches must end empty
whatever happened in between (preemption, abort).
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter

import pytest
import torch

from test_speculative import assert_kept_and_rejected, chain_hashes, p_value, repetitive_prompts
from thrifty.engine import runner as runner_module
from thrifty.engine.draft_proposer import DraftKV
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.kv_cache import block_bytes
from thrifty.engine.sampling import SamplingParams, TokenHistory, draw_from_probs
from thrifty.engine.speculative import SpeculativeConfig, verify_sequences
from thrifty.errors import InvalidRequestError
from thrifty.models.loader import load
from tiny_gguf import TinySpec, write_tiny_gguf

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def drafts(tiny_gguf, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("drafts")
    return {"same": str(tiny_gguf),
            "near": str(write_tiny_gguf(folder / "near.gguf", TinySpec(perturb=0.6))),
            "other": str(write_tiny_gguf(folder / "other.gguf", TinySpec(seed=5)))}


def draft_spec(path: str, **extra) -> dict:
    """The draft model alone (its n-gram-first default off, so every step drafts with the model)."""
    return {"method": "draft", "draft_model": path, "num_tokens": 4, "disable_by_batch_size": 64,
            "ngram_first": False, **extra}


def make_engine(path, speculative=None, **options) -> LLMEngine:
    options.setdefault("dtype", "float32")
    config = EngineConfig(speculative=speculative, **options)
    return LLMEngine(load(path, config.dtype), config)


def assert_all_free(engine: LLMEngine) -> None:
    """Both caches: every block back, nothing left on the draft's books."""
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    if engine.speculator is not None:
        proposer = getattr(engine.speculator.proposer, "draft", engine.speculator.proposer)  # under n-gram first
        assert proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks
        assert not proposer._kv


def run_ids(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    outputs = engine.run(prompts, [params] * len(prompts))
    assert_all_free(engine)
    return [out.token_ids for out in outputs]


@pytest.fixture(scope="module")
def plain(tiny_gguf):
    prompts = repetitive_prompts(10, seed=3)
    return prompts, run_ids(make_engine(tiny_gguf), prompts)


# ---- greedy: identical outputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["same", "near", "other"])
def test_greedy_identical_with_any_draft(tiny_gguf, plain, drafts, which):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, draft_spec(drafts[which]))
    assert run_ids(engine, prompts) == expected
    s = engine.speculator.stats
    rate = s.num_accepted_tokens / s.num_draft_tokens
    if which == "same":
        assert rate > 0.99                  # float32 on both sides: the draft is the target
    elif which == "near":
        assert_kept_and_rejected(engine)
    else:
        assert rate < 0.3


@pytest.mark.parametrize("options", [
    dict(enable_prefix_caching=True, block_size=4),
    dict(max_num_batched_tokens=24),                                   # chunked prefill beside drafts
    dict(num_kv_blocks=60, block_size=4),                              # forced preemption
    dict(scheduler_policy="static", max_num_seqs=4),
    dict(max_num_seqs=3),                                              # requests join while others draft
], ids=["prefix-cache", "chunked", "preemption", "static", "joining"])
def test_greedy_batched_identical(tiny_gguf, plain, drafts, options):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, draft_spec(drafts["near"]), **options)
    assert run_ids(engine, prompts) == expected
    assert_kept_and_rejected(engine)
    if options.get("num_kv_blocks"):
        assert engine.stats.preemptions > 0


def test_small_draft_cache_proposes_less_and_stays_exact(tiny_gguf, plain, drafts):
    """A draft cache too small for every request: the ones that do not fit decode without drafts."""
    prompts, expected = plain
    block = block_bytes(2, 2, 16, 16, torch.float32)    # one 16-token block of the tiny model
    engine = make_engine(tiny_gguf, draft_spec(drafts["same"], draft_kv_cache_memory=12 * block / 1024 ** 3))
    assert engine.speculator.proposer.block_manager.num_blocks == 12
    assert run_ids(engine, prompts) == expected
    assert engine.speculator.stats.num_drafts > 0


def test_drafts_follow_penalties_and_opt_outs(tiny_gguf, plain, drafts):
    prompts, _ = plain
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=0.8,
                            frequency_penalty=-0.4)
    want = run_ids(make_engine(tiny_gguf), prompts[:4], params)
    assert run_ids(make_engine(tiny_gguf, draft_spec(drafts["near"])), prompts[:4], params) == want
    engine = make_engine(tiny_gguf, draft_spec(drafts["same"]))
    off = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, speculative=False)
    assert run_ids(engine, prompts[:2], off) == plain[1][:2]
    assert engine.speculator.stats.num_drafts == 0


# ---- n-gram first, the draft model where the lookup finds nothing (method draft's default) ----------------------


class RecordingDraft:
    """A stand-in draft model: proposes [99] * k and remembers whom it was asked for."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def propose(self, seqs, num_tokens):
        self.asked.append([s.request_id for s in seqs])
        for seq in seqs:
            seq.spec.draft_probs = torch.ones(1, 4)
        return [[99] * k for k in num_tokens]

    def release(self, request_id: str) -> None:
        pass


def _seq(request_id: str, tokens: list[int]):
    from thrifty.engine.sequence import Sequence
    from thrifty.engine.speculative import SpecState

    seq = Sequence(request_id, None, tokens, SamplingParams(temperature=0.0, max_tokens=8))
    seq.spec = SpecState(3, draft_probs=torch.zeros(1, 4))   # stale q from an earlier step
    return seq


def test_ngram_first_drafts_only_where_the_lookup_misses():
    from thrifty.engine.speculative import NgramFirstProposer, NgramProposer

    draft = RecordingDraft()
    proposer = NgramFirstProposer(NgramProposer(2, 3), draft, draft_batch_limit=3)
    hit, miss = _seq("hit", [5, 6, 7, 8, 5, 6]), _seq("miss", [1, 2, 3, 4])
    assert proposer.propose([hit, miss], [3, 3]) == [[7, 8, 5], [99, 99, 99]]
    assert draft.asked == [["miss"]]
    assert hit.spec.draft_probs is None                  # a looked-up draft is one-hot: no stale q
    assert miss.spec.draft_probs is not None
    crowd = [_seq(f"m{i}", [1, 2, 3, 4]) for i in range(3)]   # as many as the limit: the lookup alone
    assert proposer.propose(crowd, [3, 3, 3]) == [[], [], []]
    assert draft.asked == [["miss"]]


def test_ngram_first_config():
    assert SpeculativeConfig(method="draft", draft_model="d").ngram_first is True
    assert SpeculativeConfig(method="draft", draft_model="d").disable_by_batch_size == 16   # the lookup's limit
    assert SpeculativeConfig(method="draft", draft_model="d", ngram_first=False).disable_by_batch_size == 2
    assert SpeculativeConfig(method="ngram").ngram_first is False
    with pytest.raises(InvalidRequestError, match="ngram_first needs method 'draft'"):
        SpeculativeConfig(method="ngram", ngram_first=True)


@pytest.mark.parametrize("which", ["near", "other"])
def test_ngram_first_greedy_identical(tiny_gguf, plain, drafts, which):
    """Both proposers in one engine (the lookup on the repetitive prompts, the draft elsewhere): plain output,
    both caches empty at the end, and the draft model did propose."""
    prompts, expected = plain
    engine = make_engine(tiny_gguf, draft_spec(drafts[which], ngram_first=True), max_num_seqs=1)
    assert engine.speculator.proposer.draft_batch_limit == 2     # the draft model only for a request alone
    calls = []
    draft = engine.speculator.proposer.draft
    original = draft.propose
    draft.propose = lambda seqs, k: calls.append(len(seqs)) or original(seqs, k)
    assert run_ids(engine, prompts) == expected
    assert calls and engine.speculator.stats.num_accepted_tokens > 0


def test_ngram_first_batched_with_preemption_identical(tiny_gguf, plain, drafts):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, draft_spec(drafts["near"], ngram_first=True), num_kv_blocks=60, block_size=4)
    assert run_ids(engine, prompts) == expected
    assert engine.stats.preemptions > 0


# ---- the KV books of both caches ------------------------------------------------------------------------------


def test_draft_kv_sync_keeps_kept_drafts_only():
    state = DraftKV(num_verified=5, unverified=[7, 8, 9])
    assert state.sync([0, 1, 2, 3, 4, 7, 8, 2, 6]) == 7    # 7, 8 kept; 9 rejected (the target said 2)
    assert state.unverified == []
    assert DraftKV(3, [4]).sync([0, 1, 2]) == 3             # nothing new yet


def test_prefix_caches_hold_only_verified_tokens(tiny_gguf, plain, drafts):
    prompts, _ = plain
    engine = make_engine(tiny_gguf, draft_spec(drafts["near"]), block_size=4)
    outs = engine.run(prompts, [GREEDY] * len(prompts))
    assert_kept_and_rejected(engine)
    assert_all_free(engine)
    valid = set().union(*(chain_hashes(o.prompt_token_ids + o.token_ids, 4) for o in outs))
    for bm in (engine.block_manager, engine.speculator.proposer.block_manager):
        assert bm._index and set(bm._index) <= valid, "a cached block holds a token that is not in any output"


def test_abort_while_drafting_frees_both_caches(tiny_gguf, plain, drafts):
    prompts, _ = plain
    engine = make_engine(tiny_gguf, draft_spec(drafts["near"]), block_size=4)
    for p in prompts[:5]:
        engine.add_request(p, GREEDY)
    while engine.speculator.stats.num_drafts < 5 and engine.has_unfinished():
        engine.step()
    assert engine.speculator.stats.num_drafts >= 5 and engine.has_unfinished()
    proposer = engine.speculator.proposer
    assert proposer.block_manager.num_free_blocks < proposer.block_manager.num_blocks
    engine.speculator.propose(engine.scheduler.running, engine.max_model_len)  # drafts pending, then abort
    engine.abort_all()
    assert not engine.has_unfinished()
    assert_all_free(engine)


def test_preemption_frees_the_draft_blocks(tiny_gguf, plain, drafts):
    prompts, expected = plain
    engine = make_engine(tiny_gguf, draft_spec(drafts["near"]), num_kv_blocks=40, block_size=4)
    proposer = engine.speculator.proposer
    released = []
    release = proposer.release
    proposer.release = lambda rid: (released.append(rid), release(rid))
    for p in prompts:
        engine.add_request(p, GREEDY)
    preempted = set()
    while engine.has_unfinished():
        engine.step()
        if engine.stats.preemptions > len(preempted):
            waiting = {s.request_id for s in engine.scheduler.waiting}
            preempted |= waiting & set(released)
            assert all(not proposer.block_manager.has_request(r) for r in waiting)
    assert engine.stats.preemptions > 0 and preempted
    assert_all_free(engine)


# ---- sampling: the target's distribution -------------------------------------------------------------------


def accept_everything(probs, draft, generator, draft_probs=None):
    return draft + [int(draw_from_probs(probs[len(draft):], [generator])[0])]


def second_tokens(tiny_gguf, draft, params: SamplingParams, n: int) -> tuple[list[int], int, Counter]:
    """n seeded requests of one prompt: the most common first token (sampled plainly, from the prefill) and
    the second tokens that followed it (each from a verification of one draft)."""
    engine = make_engine(tiny_gguf, draft_spec(draft, num_tokens=1, adaptive=False), max_num_seqs=256)
    prompt = repetitive_prompts(1, seed=11)[0]
    outs = engine.run([prompt] * n, [dataclasses.replace(params, seed=i) for i in range(n)])
    assert_all_free(engine)
    assert engine.speculator.stats.num_drafts > 0
    first = Counter(o.token_ids[0] for o in outs).most_common(1)[0][0]
    return prompt, first, Counter(o.token_ids[1] for o in outs if o.token_ids[0] == first)


def target_probs(tiny_gguf, prompt: list[int], first: int, params: SamplingParams) -> torch.Tensor:
    engine = make_engine(tiny_gguf)
    loaded = engine.loaded
    ids = prompt + [first]
    from thrifty.engine.runner import Chunk, forward
    engine.block_manager.allocate("probe", ids, len(ids))
    hidden = forward(loaded.model, engine.kv_cache, [Chunk(ids, 0, [engine.block_manager.block_table("probe")])],
                     loaded.device)
    logits = loaded.model.compute_logits(hidden[-1:])
    return engine.runner.sampler.distribution(logits, [params], [TokenHistory(prompt, [first])])[0]


SAMPLED = SamplingParams(temperature=1.0, top_k=6, max_tokens=3, ignore_eos=True)


def test_sampled_tokens_follow_the_target(tiny_gguf, drafts, monkeypatch):
    """The draft (another random model) mostly disagrees, so both the kept and the corrected paths count."""
    prompt, first, counts = second_tokens(tiny_gguf, drafts["other"], SAMPLED, 3000)
    p = target_probs(tiny_gguf, prompt, first, SAMPLED)
    support = sorted(int(i) for i in torch.nonzero(p))
    assert set(counts) <= set(support)
    assert sum(counts.values()) > 500
    assert p_value(Counter({support.index(t): c for t, c in counts.items()}), p[support]) > 0.01

    monkeypatch.setattr(runner_module, "verify_sequences",
                        functools.partial(verify_sequences, verifier=accept_everything))
    _, first_bad, bad = second_tokens(tiny_gguf, drafts["other"], SAMPLED, 3000)
    p_bad = target_probs(tiny_gguf, prompt, first_bad, SAMPLED)
    support_bad = sorted(int(i) for i in torch.nonzero(p_bad))
    observed = Counter({support_bad.index(t): c for t, c in bad.items() if t in support_bad})
    outside = sum(c for t, c in bad.items() if t not in support_bad)
    assert outside > 0 or p_value(observed, p_bad[support_bad]) < 1e-6


def test_seeded_sampling_is_reproducible(tiny_gguf, plain, drafts):
    prompts, _ = plain
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30, ignore_eos=True, seed=1234)
    first = run_ids(make_engine(tiny_gguf, draft_spec(drafts["near"])), prompts[:4], params)
    assert run_ids(make_engine(tiny_gguf, draft_spec(drafts["near"])), prompts[:4], params) == first


# ---- config and refusals -------------------------------------------------------------------------------------


def test_another_vocabulary_is_refused(tiny_gguf, tmp_path):
    other = write_tiny_gguf(tmp_path / "other-vocab.gguf", TinySpec(num_merges=40))
    with pytest.raises(InvalidRequestError, match="another vocabulary"):
        make_engine(tiny_gguf, draft_spec(str(other)))


def test_config_needs_a_draft_model():
    with pytest.raises(InvalidRequestError, match="needs a draft_model"):
        SpeculativeConfig(method="draft")
    spec = EngineConfig(speculative={"method": "draft", "draft_model": "x", "draft_weights": "int4"}).speculative
    assert (spec.draft_model, spec.draft_weights) == ("x", "int4")
    assert spec.disable_by_batch_size == 16            # n-gram first: the lookup goes on in batches of 2-15
    assert SpeculativeConfig(method="ngram").disable_by_batch_size == 16


# ---- the real models ------------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_int4_draft_for_the_float32_model_is_exact(qwen05_gguf):
    """Qwen2.5-Coder-0.5B in float32 (one-token and multi-token forwards round alike) with its own int4 copy as
    the draft (same tokenizer, other weights): 3 HumanEval chat prompts, 32 tokens, outputs as plain decoding's."""
    from thrifty.bench.spec import workload_messages

    loaded = load(qwen05_gguf, "float32")
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True),
                          add_special_tokens=False) for m in workload_messages("chat", 3)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = {}
    for method in ("off", "draft"):
        spec = draft_spec(str(qwen05_gguf), draft_weights="int4") if method == "draft" else None
        engine = LLMEngine(loaded, EngineConfig(dtype="float32", kv_cache_memory=0.1, speculative=spec))
        outs[method] = [o.token_ids for o in engine.run(prompts, [params] * len(prompts))]
        assert_all_free(engine)
    assert outs["draft"] == outs["off"]
    assert engine.speculator.stats.num_accepted_tokens > 0
