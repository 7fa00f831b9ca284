"""The verifier sweep (`thrifty cache sweep`): operating points against a slow obvious count, the pair
classifier, the soft / hard split of the guard's reasons, and the training pairs' independence."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from thrifty.bench import cache_sweep as cs
from thrifty.bench.cache_eval import fow_cache_pairs, load_pairs, trap_pairs


def row(set_: str, cat: str, should: bool, minilm: float, *, soft: bool = True, guard_hit: bool = False,
        removed: int = 2, added: int = 2, second: float | None = None) -> dict:
    return {"set": set_, "id": "x", "category": cat, "should_hit": should, "a": "a", "b": "b", "same_scope": True,
            "minilm": minilm, "guard_hit": guard_hit, "reason": "reworded: off" if soft else "numbers differ",
            "soft": soft, "removed": removed, "added": added, "second": second, "guard_hit_second": guard_hit,
            "reason_second": "reworded: off" if soft else "numbers differ"}


def slow_best(rows: list[dict], scores: np.ndarray, max_false: float, max_cat: float) -> tuple[float, float]:
    """Try every threshold; count by hand."""
    best: tuple[float | None, float] = (None, 0.0)
    for t in sorted(set(scores.tolist()) | {0.0, 1.0}):
        hits = [r["soft"] and s >= t for r, s in zip(rows, scores)]
        ok = True
        for set_ in {r["set"] for r in rows}:
            traps = [h for r, h in zip(rows, hits) if r["set"] == set_ and not r["should_hit"]]
            ok &= not traps or sum(traps) / len(traps) <= max_false
        for c in {(r["set"], r["category"]) for r in rows if not r["should_hit"]}:
            cat = [h for r, h in zip(rows, hits) if (r["set"], r["category"]) == c]
            ok &= sum(cat) / len(cat) <= max_cat
        should = [h for r, h in zip(rows, hits) if r["should_hit"]]
        rate = sum(should) / len(should)
        if ok and rate >= best[1]:
            best = (t, rate)
    return best


def test_operating_point_matches_a_slow_count() -> None:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(300):
        should = bool(i % 3)
        score = float(np.clip(rng.normal(0.85 if should else 0.75, 0.08), 0, 1))
        rows.append(row(f"s{i % 2}", "para" if should else f"trap{i % 4}", should, round(score, 4),
                        soft=bool(i % 7)))
    scores = np.array([r["minilm"] for r in rows])
    for max_false, max_cat in ((0.01, 0.02), (0.05, 0.1), (0.0, 0.0)):
        decide = lambda t: np.array([r["soft"] for r in rows]) & (scores >= t)  # noqa: E731
        grid = np.unique(np.concatenate([cs.GRID, scores]))
        best, curve = cs.operating_points(rows, decide, max_false, max_cat, grid)
        t, rate = slow_best(rows, scores, max_false, max_cat)
        assert best.hit_rate == pytest.approx(rate)
        assert best.threshold == (None if t is None else pytest.approx(t))
        assert len(curve) == len(grid)


def test_a_single_trap_in_a_small_category_breaks_the_category_bound() -> None:
    rows = [row("s", "para", True, 0.9)] * 10 + [row("s", "trap", False, 0.95)] + [row("s", "t2", False, 0.1)] * 99
    table = {r["design"]: r for r in cs.table(rows)}
    soft = table["guard hard refusals, soft ones by minilm"]
    assert soft["false_by_set"]["s"] == 0.0  # the trap at 0.95 must stay out: 1/1 in its category
    assert soft["threshold"] > 0.95 and soft["hit_rate"] == 0.0
    loose = cs.table(rows, max_false=0.01)  # 1 % of 100 traps in the set, but the category bound still holds
    assert {r["design"]: r for r in loose}["guard hard refusals, soft ones by minilm"]["hit_rate"] == 0.0
    assert table["ceiling: a perfect verifier of soft refusals"]["hit_rate"] == 1.0


def test_hard_refusals_stay_refused_whatever_the_score() -> None:
    rows = [row("s", "para", True, 0.99), row("s", "neg", False, 0.999, soft=False)]
    for name, decide in cs.designs(rows).items():
        if "alone" not in name:
            assert not decide(0.0)[1], name


def test_pair_classifier_learns_a_separable_rule_and_refuses_one_label() -> None:
    x = np.array([[0.9, 0.9, 2, 2, 0, 0], [0.95, 0.92, 1, 1, 1, 0], [0.6, 0.7, 3, 3, 0, 0],
                  [0.92, 0.9, 0, 1, 0, 1], [0.85, 0.88, 2, 3, 0, 0], [0.97, 0.95, 1, 1, 1, 0]])
    y = np.array([1, 0, 1, 0, 1, 0], dtype=float)  # hits: rewordings; traps: one-word swaps and additions
    clf = cs.PairClassifier(l2=0.1).fit(x, y)
    p = clf.score(x)
    assert (p[y == 1].min() > p[y == 0].max())
    assert np.array_equal(p, cs.PairClassifier(l2=0.1).fit(x, y).score(x))  # deterministic
    with pytest.raises(Exception, match="both labels"):
        cs.PairClassifier().fit(x, np.ones(6))


def test_soft_reasons_are_reasons_the_guard_gives() -> None:
    src = (Path(cs.__file__).parents[1] / "gateway" / "cache" / "guard.py").read_text()
    for reason in cs.SOFT_REASONS:
        kind = re.sub(r"^below |(: off)$", "", reason).removesuffix(" threshold")
        assert kind in src, reason


def test_training_pairs_are_not_evaluation_pairs() -> None:
    train = load_pairs(cs.train_pairs())
    assert len(train) >= 100 and {p["should_hit"] for p in train} == {True, False}
    texts = {t.lower() for p in train for t in (p["a"], p["b"])}
    evaluation = load_pairs(trap_pairs())
    try:
        evaluation += load_pairs(fow_cache_pairs())
    except Exception:
        pass  # fow-cache not installed: the trap set alone
    assert not texts & {t.lower() for p in evaluation for t in (p["a"], p["b"])}
    for line in cs.train_pairs().read_text().splitlines():
        assert json.loads(line)["split"] == "train"
