"""Admission by deadline: a prompt that cannot prefill within the tier's timeout at the measured rate is refused
(400 naming the largest prompt that fits), one that could but not behind the work queued ahead gets 429 with
Retry-After, and everything else is admitted with its estimate; other requests are unaffected."""
from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest

from thrifty.config import ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.engine.prefill_rate import MIN_TOKENS, PrefillRate
from thrifty.engine.sampling import SamplingParams
from thrifty.engine.snapshot import EngineSnapshot
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread
from thrifty.server.deadline import ESTIMATE_HEADER, INFLOW_WINDOW_S, DeadlineAdmission
from thrifty.server.errors import PromptOverDeadlineError, ServerBusyError

RATE = 40.0      # tokens/s: the seeded rate; the tests' prompts stay under MIN_TOKENS or are refused, so it stays
TIMEOUT = 1.0    # so the largest prompt that fits is 40 x 1.0 x HEADROOM (0.6) = 24 tokens


@pytest.fixture()
def server(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=256)
    engine.prefill_rate.seed(RATE)
    app = create_app(AsyncEngine(engine), "tiny", ServerSettings(max_output_tokens=64), timeout_s=TIMEOUT)
    with ServerThread(app) as srv:
        yield srv


def _client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_prompt_past_the_deadline_is_refused_naming_the_limit(server):
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=list(range(5, 65)), max_tokens=2)
    body = err.value.body
    assert err.value.status_code == 400
    assert body["code"] == "prompt_over_deadline" and body["param"] == "prompt"
    assert "60 tokens" in body["message"] and "is 24 tokens" in body["message"]


def test_prompt_within_the_deadline_is_admitted_with_its_estimate(server):
    raw = _client(server).completions.with_raw_response.create(model="tiny", prompt=list(range(5, 13)), max_tokens=3)
    assert float(raw.headers[ESTIMATE_HEADER]) == pytest.approx(8 / RATE, abs=0.01)
    assert raw.parse().choices[0].finish_reason in ("length", "stop")


def test_a_refusal_leaves_a_running_stream_alone(server):
    client = _client(server)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=12, stream=True)
    chunks = iter(stream)
    next(chunks)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 200}],
                                       max_tokens=2)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason in ("length", "stop")
    after = client.completions.create(model="tiny", prompt=[7, 8, 9], max_tokens=2)
    assert after.usage.completion_tokens >= 1


def _state(prefilling: dict[str, int] | None = None, rate: float | None = 100.0):
    snap = SimpleNamespace(prefill_tokens_per_s=rate, prefilling=prefilling or {})
    return lambda tier: (snap, 10.0) if tier == "local" else None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_work_queued_ahead_and_the_inflow_defer_with_retry_after():
    clock = Clock()
    d = DeadlineAdmission(_state(), clock=clock, headroom=0.8)   # 100 tokens/s, 10 s x 0.8: 800 tokens fit
    assert d.admit("a", "local", 600) == pytest.approx(6.0)
    with pytest.raises(ServerBusyError) as err:       # 600 ahead + 600, at 100 - 600/60 tokens/s: 13.3 s
        d.admit("b", "local", 600)
    assert err.value.retry_after_s == 6
    # shortest first: 'a' delays a 50-token prompt by 50 tokens, and its inflow by 50/60 tokens/s
    assert d.admit("c", "local", 50) == pytest.approx(100 / (100 - 50 / 60))
    d.started("a")                                    # a's prefill is done: no longer ahead
    clock.now = INFLOW_WINDOW_S + 1                   # and the arrivals left the window
    assert d.admit("b", "local", 600) == pytest.approx(6.5)
    d.release("b"), d.release("c")
    clock.now = 3 * INFLOW_WINDOW_S
    assert d.admit("e", "local", 800) == pytest.approx(8.0)


def test_a_stream_of_shorter_prompts_leaves_a_long_one_only_the_rate_they_leave_over():
    clock = Clock()
    d = DeadlineAdmission(_state(), clock=clock, headroom=0.8)
    for i in range(60):                               # 60 x 50 tokens over the window: 50 tokens/s
        clock.now = i
        d.admit(f"s{i}", "local", 50)
        d.started(f"s{i}"), d.release(f"s{i}")
    assert d.admit("long", "local", 300) == pytest.approx(300 / 50)
    for i in range(40):                               # 40 more: 83 tokens/s of the 100
        d.admit(f"t{i}", "local", 50)
        d.started(f"t{i}"), d.release(f"t{i}")
    with pytest.raises(ServerBusyError):
        d.admit("long2", "local", 300)


def test_the_engine_count_replaces_the_prompt_length_once_it_prefills():
    clock = Clock()
    d = DeadlineAdmission(_state({"a": 100}), clock=clock, headroom=0.8)
    d.admit("a", "local", 700)
    clock.now = 2 * INFLOW_WINDOW_S
    assert d.admit("b", "local", 700) == pytest.approx(8.0)  # 100 left of a's 700, plus b's own 700


def test_unknown_rate_and_remote_tiers_are_not_judged():
    assert DeadlineAdmission(_state(rate=None)).admit("a", "local", 10 ** 6) is None
    assert DeadlineAdmission(_state()).admit("a", "remote", 10 ** 6) is None
    with pytest.raises(PromptOverDeadlineError):
        DeadlineAdmission(_state(), headroom=0.8).admit("a", "local", 801)


def test_prefill_rate_counts_prefilling_steps_only():
    rate = PrefillRate()
    assert rate.tokens_per_s() is None
    rate.seed(50.0)
    assert rate.tokens_per_s() == 50.0
    rate.observe(MIN_TOKENS - 1, 0.5)                 # a decode step with a few prompt tokens: ignored
    assert rate.tokens_per_s() == 50.0
    rate.observe(100, 1.0), rate.observe(300, 1.0)
    assert rate.tokens_per_s() == pytest.approx(200.0)
    with pytest.raises(ValueError):
        rate.seed(0.0)


def test_engine_snapshot_counts_prompt_tokens_left_and_measures_the_rate(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=256)
    engine.add_request(list(range(3, 103)), SamplingParams(max_tokens=1), "r1")
    assert EngineSnapshot.of(engine).prefilling == {"r1": 100}
    assert EngineSnapshot.of(engine).prefill_tokens_per_s is None
    while engine.has_unfinished():
        engine.step()
    snap = EngineSnapshot.of(engine)
    assert snap.prefilling == {} and snap.prefill_tokens_per_s > 0
