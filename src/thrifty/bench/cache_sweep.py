"""`thrifty cache sweep`: what a verifier stage after the guard could reach, measured on labelled pairs.

For every pair, `features` computes once what each candidate design looks at: the MiniLM cosine (the cache's
own int8 embedder), the guard's decision and reason at its defaults, whether the guard refuses the pair for a
*hard* reason (numbers, negation, opposites, names, order / roles, symbol tokens, units, tools: what no embedder
is trusted to see) or only a *soft* one (a rewording, a word swapped, words added or removed), the cosine of a
second embedder (all-mpnet-base-v2 from the zoo) and the guard's decision on that cosine, and a pair
classifier's score when one is trained (`PairClassifier`, on labelled pairs that are neither evaluation set).

`operating_points` sweeps each design's threshold and keeps its best should-hit rate while every set's
false-hit rate stays <= `max_false` and every trap category's <= `max_false_category`. Designs
(`designs`): the guard with its `reworded` threshold swept; the guard's hard refusals kept and every soft
refusal decided by a score (MiniLM, the second embedder, the classifier); the guard's hits plus soft refusals
that are rewordings of more than one word (a one-for-one word swap and a narrower / wider question stay
refused) decided by a score; the second embedder as the guard's embedder; the second embedder alone; and a
perfect verifier of soft refusals (the ceiling of any verifier behind the guard's hard refusals). A pair whose
two questions land in different scopes (another system prompt or conversation) never hits, as in the cache.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from thrifty.bench.cache_eval import _pair_scope, load_pairs
from thrifty.errors import ThriftyError
from thrifty.gateway.cache.guard import SOFT_REFUSALS, Guard, GuardConfig

# the guard's reasons that a verifier may overrule (its soft refusals and the hits they sit beside): every other
# reason is a hard refusal
SOFT_REASONS = SOFT_REFUSALS | {"same content words", "no content words", "small edit", "reworded"}
REWORDED = frozenset({"reworded", "below reworded threshold", "reworded: off"})
GRID = np.round(np.arange(0.0, 1.0001, 0.01), 2)


def is_soft(reason: str) -> bool:
    return reason in SOFT_REASONS


# ---- features ------------------------------------------------------------------------------------------
def features(sets: list[str], half: str, minilm: Any, second: Callable[[list[str]], np.ndarray] | None = None
             ) -> list[dict[str, Any]]:
    """One row per pair: labels, scope agreement, cosines, the guard's reasons."""
    rows = []
    guard = Guard(GuardConfig())
    for name in sets:
        pairs = load_pairs(name, half)
        va, vb = minilm.embed([p["a"] for p in pairs]), minilm.embed([p["b"] for p in pairs])
        sa = sb = None
        if second is not None:
            sa, sb = second([p["a"] for p in pairs]), second([p["b"] for p in pairs])
        for i, p in enumerate(pairs):
            same_scope = _pair_scope("x", p["context_a"], p["a"]) == _pair_scope("x", p["context_b"], p["b"])
            cos = float(np.dot(va[i], vb[i]))
            d = guard.check(p["a"], p["b"], cos)
            row = {"set": name, "id": p["id"], "category": p["category"], "should_hit": p["should_hit"],
                   "a": p["a"], "b": p["b"], "same_scope": same_scope, "minilm": round(cos, 5),
                   "guard_hit": d.hit, "reason": d.reason, "soft": is_soft(d.reason),
                   "removed": len(d.removed), "added": len(d.added), "second": None, "guard_hit_second": None,
                   "reason_second": None}
            if sa is not None:
                cos2 = float(np.dot(sa[i], sb[i]))
                d2 = guard.check(p["a"], p["b"], cos2)
                row.update(second=round(cos2, 5), guard_hit_second=d2.hit, reason_second=d2.reason)
            rows.append(row)
    return rows


def _numeric(rows: list[dict[str, Any]]) -> np.ndarray:
    """The classifier's inputs: both cosines, the size of the edit, and its shape."""
    return np.array([[r["minilm"], r["second"] if r["second"] is not None else r["minilm"], min(r["removed"], 4),
                      min(r["added"], 4), float(r["removed"] == 1 and r["added"] == 1),
                      float(r["removed"] == 0 or r["added"] == 0)] for r in rows], dtype=np.float64)


@dataclass(slots=True)
class PairClassifier:
    """Logistic regression over `_numeric` features (standardised), fitted by Newton's method with an L2
    penalty: deterministic, no dependency, a few microseconds a pair."""
    l2: float = 1.0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=lambda: np.ones(0))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def fit(self, x: np.ndarray, y: np.ndarray, steps: int = 50) -> PairClassifier:
        if len(set(y.tolist())) != 2:
            raise ThriftyError("the classifier needs both labels among its training pairs")
        self.mean, self.scale = x.mean(0), x.std(0) + 1e-9
        z = np.hstack([(x - self.mean) / self.scale, np.ones((len(x), 1))])
        w = np.zeros(z.shape[1])
        reg = self.l2 * np.eye(len(w))
        reg[-1, -1] = 0.0  # the bias is not penalised
        for _ in range(steps):
            p = 1 / (1 + np.exp(-z @ w))
            grad = z.T @ (p - y) + reg @ w
            hess = z.T @ (z * (p * (1 - p))[:, None]) + reg
            w -= np.linalg.solve(hess, grad)
        self.weights = w
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        z = np.hstack([(x - self.mean) / self.scale, np.ones((len(x), 1))])
        return 1 / (1 + np.exp(-z @ self.weights))


def train_classifier(train_rows: list[dict[str, Any]]) -> PairClassifier:
    """Fitted on what the verifier would see: the training pairs the guard refuses softly, in one scope."""
    seen = [r for r in train_rows if r["soft"] and r["same_scope"]]
    return PairClassifier().fit(_numeric(seen), np.array([r["should_hit"] for r in seen], dtype=np.float64))


# ---- designs and operating points ----------------------------------------------------------------------
@dataclass(slots=True)
class Point:
    threshold: float | None
    hit_rate: float                      # over the should-hit pairs of all sets
    hit_rate_by_set: dict[str, float]
    false_by_set: dict[str, float]
    worst_category: tuple[str, float]    # the trap category with the most false hits


@dataclass(slots=True)
class Masks:
    """The label and group masks `rates` needs, computed once per row set."""
    should: np.ndarray
    sets: dict[str, np.ndarray]
    trap_categories: dict[str, np.ndarray]

    @classmethod
    def of(cls, rows: list[dict[str, Any]]) -> Masks:
        should = np.array([r["should_hit"] for r in rows], dtype=bool)
        sets = {s: np.array([r["set"] == s for r in rows]) for s in sorted({r["set"] for r in rows})}
        cats = {f"{s}:{c}": np.array([(r["set"], r["category"]) == (s, c) for r in rows]) & ~should
                for s, c in sorted({(r["set"], r["category"]) for r in rows if not r["should_hit"]})}
        return cls(should, sets, cats)


def rates(masks: Masks, hits: np.ndarray) -> Point:
    should = masks.should
    by_hit = {s: float(hits[m & should].mean()) if (m & should).any() else 0.0 for s, m in masks.sets.items()}
    by_false = {s: float(hits[m & ~should].mean()) if (m & ~should).any() else 0.0 for s, m in masks.sets.items()}
    worst = ("-", 0.0)
    for c, m in masks.trap_categories.items():
        rate = float(hits[m].mean())
        if rate > worst[1]:
            worst = (c, rate)
    return Point(None, float(hits[should].mean()) if should.any() else 0.0, by_hit, by_false, worst)


def designs(rows: list[dict[str, Any]], scores: dict[str, np.ndarray] | None = None
            ) -> dict[str, Callable[[float], np.ndarray]]:
    """Each design: threshold -> which pairs hit. `scores`: extra per-pair scores (a classifier's)."""
    col = lambda k: np.array([r[k] for r in rows])  # noqa: E731
    scope = col("same_scope")
    guard_hit, soft = col("guard_hit") & scope, col("soft") & scope
    removed, added = col("removed"), col("added")
    reworded = np.array([r["reason"] in REWORDED for r in rows]) & scope
    rewording = soft & (removed > 0) & (added > 0) & ~((removed == 1) & (added == 1))
    by: dict[str, np.ndarray] = {"minilm": col("minilm").astype(float)}
    if rows and rows[0]["second"] is not None:
        by["mpnet"] = col("second").astype(float)
        by["min(minilm, mpnet)"] = np.minimum(by["minilm"], by["mpnet"])
    by.update(scores or {})
    out: dict[str, Callable[[float], np.ndarray]] = {
        "guard as landed (reworded threshold swept, MiniLM)": lambda t: guard_hit | (reworded & (by["minilm"] >= t))}
    for name, s in by.items():
        out[f"guard hard refusals, soft ones by {name}"] = lambda t, s=s: soft & (s >= t)
        out[f"guard hits + soft ones by {name}"] = lambda t, s=s: guard_hit | (soft & (s >= t))
        out[f"guard hits + rewordings (>1 word) by {name}"] = lambda t, s=s: guard_hit | (rewording & (s >= t))
    if "mpnet" in by:
        hit2 = col("guard_hit_second") & scope
        reworded2 = np.array([r["reason_second"] in REWORDED for r in rows]) & scope
        out["guard on mpnet cosines (reworded swept)"] = lambda t: hit2 | (reworded2 & (by["mpnet"] >= t))
        out["mpnet alone (no guard)"] = lambda t: scope & (by["mpnet"] >= t)
    should = col("should_hit")
    out["ceiling: a perfect verifier of soft refusals"] = lambda t: guard_hit | (soft & should)
    return out


def operating_points(rows: list[dict[str, Any]], decide: Callable[[float], np.ndarray], max_false: float = 0.01,
                     max_false_category: float = 0.02, grid: np.ndarray = GRID) -> tuple[Point, list[Point]]:
    """The best point within the bounds (most should-hits among thresholds whose false hits stay inside
    them; ties: the highest threshold, the safest) and the whole curve over `grid`."""
    curve: list[Point] = []
    best: Point | None = None
    masks = Masks.of(rows)
    for t in grid:
        p = rates(masks, decide(float(t)))
        p.threshold = float(t)
        curve.append(p)
        ok = max(p.false_by_set.values(), default=0.0) <= max_false and p.worst_category[1] <= max_false_category
        if ok and (best is None or p.hit_rate >= best.hit_rate):
            best = p
    return best or Point(None, 0.0, {}, {}, ("-", 0.0)), curve


def table(rows: list[dict[str, Any]], scores: dict[str, np.ndarray] | None = None, max_false: float = 0.01,
          max_false_category: float = 0.02) -> list[dict[str, Any]]:
    out = []
    values = [np.asarray(v, dtype=float) for v in (scores or {}).values()]
    values += [np.array([r[k] for r in rows if r[k] is not None], dtype=float) for k in ("minilm", "second")]
    grid = np.unique(np.concatenate([GRID, *values]))  # every score a pair has: the exact curve
    coarse = set(GRID.tolist())                          # what the JSON keeps of it
    for name, decide in designs(rows, scores).items():
        best, curve = operating_points(rows, decide, max_false, max_false_category, grid)
        out.append({"design": name, "threshold": best.threshold, "hit_rate": round(best.hit_rate, 4),
                    "hit_rate_by_set": {k: round(v, 4) for k, v in best.hit_rate_by_set.items()},
                    "false_by_set": {k: round(v, 4) for k, v in best.false_by_set.items()},
                    "worst_category": [best.worst_category[0], round(best.worst_category[1], 4)],
                    "curve": [{"t": round(p.threshold, 5), "hit": round(p.hit_rate, 4),
                               "hit_by_set": {k: round(v, 4) for k, v in p.hit_rate_by_set.items()},
                               "false_by_set": {k: round(v, 4) for k, v in p.false_by_set.items()},
                               "worst_category": [p.worst_category[0], round(p.worst_category[1], 4)]}
                              for p in curve if p.threshold in coarse]})
    return out


def format_table(tab: list[dict[str, Any]], max_false: float = 0.01) -> str:
    sets = sorted({s for r in tab for s in r["hit_rate_by_set"]} or {"-"})
    lines = [f"best operating point with false hits <= {max_false:.0%} in every set and <= 2 % in every trap "
             "category (threshold: the design's score; ceiling: none)", "",
             "| design | threshold | should-hit answered, all | " + " | ".join(f"should-hit {s}" for s in sets)
             + " | " + " | ".join(f"false hits {s}" for s in sets) + " |", "|" + "---|" * (3 + 2 * len(sets))]
    for r in tab:
        t = "-" if r["threshold"] is None else f"{r['threshold']:.4f}"
        lines.append(f"| {r['design']} | {t} | {r['hit_rate']:.1%} | "
                     + " | ".join(f"{r['hit_rate_by_set'].get(s, 0):.1%}" for s in sets) + " | "
                     + " | ".join(f"{r['false_by_set'].get(s, 0):.1%}" for s in sets) + " |")
    return "\n".join(lines)


# ---- the second embedder (reference forward) and latency ------------------------------------------------
def second_embedder(name: str = "all-mpnet-base-v2", precision: str = "fp32") -> Callable[[list[str]], np.ndarray]:
    """A zoo sentence-transformers folder through transformers' forward, mean pooling over real tokens, L2
    normalised (what sentence-transformers computes for this model); "int8": dynamic int8 linear layers."""
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ThriftyError("the sweep's second embedder needs transformers",
                           "pip install transformers==5.23.0 (thrifty's test extra)") from None
    from thrifty.models import zoo

    folder = zoo.resolve(name)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    if precision == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), 32):
                enc = tok(texts[s:s + 32], padding=True, truncation=True, max_length=384, return_tensors="pt")
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"][..., None].float()
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 768), np.float32)
    return embed


def sentence_latency(embed_one: Callable[[str], Any], texts: list[str], warmup: int = 5) -> dict[str, float]:
    """p50 / p99 ms of embedding one text at a time (what a look-up does)."""
    for t in texts[:warmup]:
        embed_one(t)
    ms = []
    for t in texts:
        start = time.perf_counter()
        embed_one(t)
        ms.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def save(rows: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def load(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---- the command ---------------------------------------------------------------------------------------
def train_pairs() -> Path:
    """Labelled pairs written for the classifier (not from fow-cache, not from the trap set)."""
    return Path(__file__).parent / "data" / "cache_verifier_train.jsonl"


def run(sets: list[str], half: str = "tune", second: str | None = "all-mpnet-base-v2",
        train: str | Path | None = None, max_false: float = 0.01, timing_texts: int = 60) -> dict[str, Any]:
    """Features, the classifier, the table and each stage's one-sentence latency; the report as a dict."""
    from thrifty.bench.stats import hardware_info
    from thrifty.models.embedder import Embedder

    minilm = Embedder.from_zoo()
    embed2 = second_embedder(second) if second else None
    rows = features(sets, half, minilm, embed2)
    scores: dict[str, np.ndarray] = {}
    train_rows: list[dict[str, Any]] = []
    classifier = None
    if train is not None:
        train_rows = features([str(train)], "all", minilm, embed2)
        classifier = train_classifier(train_rows)
        scores["classifier"] = classifier.score(_numeric(rows))
        for r, s in zip(rows, scores["classifier"]):
            r["classifier"] = round(float(s), 5)
    tab = table(rows, scores, max_false)
    texts = [r["b"] for r in rows][:timing_texts]

    def minilm_one(t: str) -> Any:
        minilm.forget()
        return minilm.embed_one(t)

    latency = {"minilm int8 (the cache's embedder)": sentence_latency(minilm_one, texts)}
    if second:
        assert embed2 is not None
        latency[f"{second} fp32"] = sentence_latency(lambda t: embed2([t]), texts)
        int8 = second_embedder(second, "int8")
        latency[f"{second} int8 dynamic"] = sentence_latency(lambda t: int8([t]), texts)
    if classifier is not None:
        latency["classifier (features given)"] = sentence_latency(lambda t: classifier.score(_numeric(rows[:1])),
                                                                  texts)
    return {"half": half, "sets": sets, "second": second, "train": Path(train).name if train else None,
            "train_pairs": len(train_rows), "max_false": max_false, "hardware": hardware_info(), "table": tab,
            "latency": latency, "classifier": None if classifier is None else
            {"mean": classifier.mean.tolist(), "scale": classifier.scale.tolist(),
             "weights": classifier.weights.tolist(),
             "features": ["minilm", "mpnet", "removed", "added", "one-for-one swap", "only added or removed"]},
            "rows": rows}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"half: {r['half']}, sets: {', '.join(r['sets'])}, classifier trained on {r['train_pairs']} pairs",
             "", format_table(r["table"], r["max_false"]), "", "| stage, one sentence | p50 ms | p99 ms |",
             "|---|---|---|"]
    lines += [f"| {k} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} |" for k, v in r["latency"].items()]
    return "\n".join(lines)
