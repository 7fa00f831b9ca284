"""The continuous policy's fairness, on the scheduler alone: decodes first, a short prompt gets in while a long one
prefills, and prompt tokens beside decodes stay within the learned budget (engine/prefill_budget.py)."""
from __future__ import annotations

import pytest

from thrifty.engine.block_manager import BlockManager
from thrifty.engine.prefill_budget import REMEASURE_EVERY, PrefillBudget
from thrifty.engine.sampling import SamplingParams
from thrifty.engine.scheduler import Scheduler, SchedulerConfig
from thrifty.engine.sequence import Sequence
from thrifty.errors import InvalidRequestError


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, None, list(range(1, n + 1)), SamplingParams(max_tokens=100))


def advance(s: Scheduler, plan) -> None:
    """What the engine does after a step: the tokens are computed, a finished prompt samples one token."""
    for seq_ in s.running:
        n = plan.num_tokens.get(seq_.request_id, 0)
        seq_.num_computed_tokens += n
        if n and seq_.num_computed_tokens == seq_.num_tokens:
            seq_.output_token_ids.append(7)


def scheduler(**options) -> Scheduler:
    return Scheduler(SchedulerConfig(**options), BlockManager(4096, 16, enable_prefix_caching=False))


def test_a_short_prompt_gets_in_while_a_long_one_prefills():
    s = scheduler(max_num_batched_tokens=512, max_decode_slowdown=2.0)
    s.add(seq("long", 12_000))
    plan = s.schedule()
    assert plan.num_tokens == {"long": 512}        # alone: the whole budget
    advance(s, plan)
    s.add(seq("short", 4))
    plan = s.schedule()
    # admitted at once, before the long prompt's next chunk (nobody decodes yet: the step's whole budget)
    assert list(plan.num_tokens.items()) == [("short", 4), ("long", 508)]
    advance(s, plan)
    plan = s.schedule()                            # short decodes: first a step that measures decoding alone
    assert plan.num_tokens == {"short": 1}
    advance(s, plan)
    s.prefill_budget.observe(0.05, 0, decodes=1)
    plan = s.schedule()                            # then the long prompt progresses again, by what the budget allows
    assert plan.num_tokens["short"] == 1 and plan.num_tokens["long"] == 1


def test_the_budget_follows_measured_steps():
    s = scheduler(max_num_batched_tokens=2048, max_decode_slowdown=3.0)
    s.prefill_budget.observe(0.050, 0, decodes=4)                # a decode-only step: 50 ms
    s.prefill_budget.observe(0.050 + 0.0075 * 20, 20, decodes=4)  # 7.5 ms per prompt token beside them
    assert s.prefill_budget.tokens() == 10                       # 0.75 x (3 - 1) x 50 ms / 7.5 ms
    for i in range(3):
        s.add(seq(f"d{i}", 3))
    advance(s, s.schedule())
    s.add(seq("long", 5000))
    plan = s.schedule()
    assert [plan.num_tokens[f"d{i}"] for i in range(3)] == [1, 1, 1] and plan.num_tokens["long"] == 10


def test_decodes_go_before_a_prompt_admitted_earlier():
    for slowdown, long_chunk in ((None, 64 - 1), (2.0, 0)):
        s = scheduler(max_num_batched_tokens=64, max_decode_slowdown=slowdown)
        s.add(seq("long", 1000))
        advance(s, s.schedule())
        s.add(seq("short", 3))
        plan = s.schedule()
        assert plan.num_tokens["short"] == 3      # a new prompt before the rest of a started one
        advance(s, plan)
        plan = s.schedule()
        # the decode first; then the long prompt: the rest of the step's budget without a slowdown limit, nothing
        # in the step that first measures decoding alone with one
        assert list(plan.num_tokens)[0] == "short" and plan.num_tokens["short"] == 1
        assert plan.num_tokens.get("long", 0) == long_chunk


def test_prefill_budget_rules():
    b = PrefillBudget(2.0)
    assert b.tokens() == 0                             # first, a step that measures decoding alone
    b.observe(0.02, 0, decodes=1)
    assert b.tokens() == 1                             # measured decoding, not yet a prompt token
    b.observe(0.02 + 0.375, 100, decodes=1)            # 3.75 ms a token: 0.75 x one decode step's worth is 4 tokens
    assert b.tokens() == 4
    for _ in range(REMEASURE_EVERY - 1):
        b.observe(0.035, 4, decodes=1)
    assert b.tokens() == 0                             # time to re-measure the base
    b.observe(0.02, 0, decodes=1)
    assert b.tokens() > 0
    slow = PrefillBudget(2.0)
    slow.observe(0.02, 0, decodes=1)
    slow.observe(5.0, 10, decodes=1)                   # prompt tokens dearer than a decode step: still 1
    assert slow.tokens() == 1
    with pytest.raises(InvalidRequestError, match="max_decode_slowdown"):
        SchedulerConfig(max_decode_slowdown=1.0)
