"""`thrifty router label | train | calibrate`: labelled HumanEval runs -> the classifier -> the thresholds.

    thrifty router label --problems 0-99 --out labels.json     # both tiers answer, unit tests label them
    thrifty router train --labels labels.json                  # -> $THRIFTY_HOME/router/classifier.json
    thrifty router calibrate --labels labels.json --target-quality 0.95 [--strategy cascade]

Problems 0-99 train and calibrate; 100-163 stay held out for `thrifty bench router`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from thrifty.config import CASCADE_CHECKS, DEFAULT_TIERS, RouterSettings
from thrifty.errors import ThriftyError

TRAIN_PROBLEMS = "0-99"


def parse_problems(text: str) -> tuple[int, int]:
    """'100-163' -> (100, 163); '7' -> (7, 7). HumanEval problem numbers, inclusive."""
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range like 0-99, got {text!r}") from None
    if a > b:
        raise argparse.ArgumentTypeError(f"empty range {text!r}")
    return a, b


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="label HumanEval on the tiers, train the classifier, calibrate thresholds")
    rsub = p.add_subparsers(dest="router_command", required=True)
    lab = rsub.add_parser("label", help="answer HumanEval problems on the small and large tier; label by unit tests")
    add_run_args(lab, TRAIN_PROBLEMS)
    lab.add_argument("--out", required=True, help="labels JSON file")
    tr = rsub.add_parser("train", help="fit the classifier router on labels")
    tr.add_argument("--labels", required=True)
    tr.add_argument("--out", default=None, help="default $THRIFTY_HOME/router/classifier.json")
    cal = rsub.add_parser("calibrate", help="set the threshold that keeps --target-quality of the large tier's "
                                            "pass rate at the lowest cost")
    cal.add_argument("--labels", required=True)
    cal.add_argument("--target-quality", type=float, default=0.95)
    cal.add_argument("--strategy", choices=["classifier", "cascade", "all"], default="all")
    add_router_args(cal)


def add_run_args(p: argparse.ArgumentParser, problems: str) -> None:
    """What answers HumanEval on the two tiers (`router label`, `bench router`)."""
    p.add_argument("--problems", type=parse_problems, default=parse_problems(problems), help=f"default {problems}")
    p.add_argument("--small", default=DEFAULT_TIERS[0][1])
    p.add_argument("--large", default=DEFAULT_TIERS[1][1])
    p.add_argument("--max-tokens", type=int, default=512)


def add_router_args(p: argparse.ArgumentParser) -> None:
    """The router's files, check and machine price (`router calibrate`, `bench router`)."""
    p.add_argument("--check", choices=CASCADE_CHECKS, default=RouterSettings().check, help="the cascade's check")
    p.add_argument("--machine-usd-per-hour", type=float, default=RouterSettings().machine_usd_per_hour)
    p.add_argument("--classifier", default=None, help="default $THRIFTY_HOME/router/classifier.json")
    p.add_argument("--calibration", default=None, help="default $THRIFTY_HOME/router/calibration.json")


def run(args: argparse.Namespace) -> None:
    {"label": _label, "train": _train, "calibrate": _calibrate}[args.router_command](args)


def _label(args: argparse.Namespace) -> None:
    import json

    from thrifty.bench.humaneval import label, load_problems

    problems = load_problems(*args.problems)
    data = label(problems, [("small", args.small), ("large", args.large)], args.max_tokens)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    for t in data["tiers"]:
        passed = sum(a["passed"] for a in t["attempts"])
        print(f"{t['tier']:6s} {t['model']}: pass@1 {passed}/{len(t['attempts'])}, prefill "
              f"{t['prefill_tokens_per_s']:.0f} tok/s, decode {t['decode_tokens_per_s']:.1f} tok/s")
    print(f"wrote {args.out}")


def _texts_and_labels(labels_path: str):
    from thrifty.bench.humaneval import load_labels, load_problems

    runs = load_labels(labels_path)
    small = runs[0]
    index = [a.index for a in small.attempts]
    problems = {p.index: p for p in load_problems(min(index), max(index))}
    texts = [problems[i].request_text() for i in index]
    y = np.array([0.0 if a.passed else 1.0 for a in small.attempts])
    return runs, texts, y


def _embedder():
    from thrifty.models.embedder import DEFAULT_EMBEDDER, Embedder

    return DEFAULT_EMBEDDER, Embedder.from_zoo(DEFAULT_EMBEDDER)


def _train(args: argparse.Namespace) -> None:
    from thrifty.gateway.calibration import default_classifier_path
    from thrifty.gateway.difficulty import DifficultyModel, out_of_fold

    _, texts, y = _texts_and_labels(args.labels)
    name, embedder = _embedder()
    emb, cheap = DifficultyModel.raw_features(texts, embedder.embed)
    model = DifficultyModel.fit(emb, cheap, y, name)
    oof = out_of_fold(emb, cheap, y, model.l2, name)
    out = Path(args.out) if args.out else default_classifier_path()
    model.save(out)
    print(f"trained on {len(y)} problems ({int(y.sum())} the small tier fails), l2 {model.l2}; "
          f"cross-validated AUC {auc(oof, y):.3f}, accuracy at 0.5 {np.mean((oof > 0.5) == (y > 0.5)):.3f}")
    print(f"wrote {out}")


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (probability a failing problem scores above a passing one; ties half)."""
    pos, neg = scores[y > 0.5], scores[y <= 0.5]
    if not len(pos) or not len(neg):
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def label_prices(runs, machine_usd_per_hour: float, cached_fraction: float) -> dict:
    """auto prices from the throughput each tier's labelling run measured."""
    from thrifty.gateway.costs import auto_price

    return {r.tier: auto_price(machine_usd_per_hour, r.prefill_tokens_per_s, r.decode_tokens_per_s, cached_fraction)
            for r in runs}


def _calibrate(args: argparse.Namespace) -> None:
    from thrifty.bench.humaneval import Outcomes
    from thrifty.gateway.calibration import calibrate, store_threshold

    runs, texts, y = _texts_and_labels(args.labels)
    if not 0 < args.target_quality <= 1.5:
        raise ThriftyError(f"--target-quality must be in (0, 1.5], got {args.target_quality}")
    prices = label_prices(runs, args.machine_usd_per_hour, RouterSettings().cached_input_fraction)
    outcomes = Outcomes.from_runs(runs, prices)
    small, large = outcomes.tiers[0], outcomes.tiers[1]
    large_q, large_c = outcomes.score([[large]] * len(texts))
    strategies = ["classifier", "cascade"] if args.strategy == "all" else [args.strategy]
    for strategy in strategies:
        if strategy == "classifier":
            candidates, outcome, check = _classifier_sweep(args, texts, y, outcomes, small, large)
        else:
            candidates, outcome, check = _cascade_sweep(args, runs, texts, outcomes, small, large)
        result = calibrate(candidates, outcome, large_q, large_c, args.target_quality, len(texts))
        # the classifier's threshold belongs to that trained model; the cascade's to the config's check
        path = (_store_in_classifier(args.classifier, result.threshold) if strategy == "classifier"
                else store_threshold(args.calibration, strategy, check, result))
        verdict = "meets" if result.met else "MISSES"
        print(f"{strategy}{'/' + check if check else ''}: threshold {result.threshold:.4f} -> pass@1 "
              f"{result.quality:.3f} ({result.relative_quality:.1%} of large) at {result.relative_cost:.1%} of "
              f"large's cost; {verdict} the target {args.target_quality:.0%} (on {len(texts)} labelled problems)")
        print(f"wrote {path}")


def _classifier_sweep(args, texts, y, outcomes, small, large):
    from thrifty.gateway.calibration import default_classifier_path
    from thrifty.gateway.difficulty import DifficultyModel, out_of_fold

    model = DifficultyModel.load(args.classifier or default_classifier_path())
    _, embedder = _embedder()
    emb, cheap = DifficultyModel.raw_features(texts, embedder.embed)
    p = out_of_fold(emb, cheap, y, model.l2, model.embedder)  # calibrating on seen labels would flatter it
    candidates = [0.0, 1.0, *p.tolist()]
    return candidates, lambda t: outcomes.score([[large] if pi > t else [small] for pi in p]), None


def _cascade_sweep(args, runs, texts, outcomes, small, large):
    from thrifty.gateway.cascade import CascadeRouter, confidence_of
    from thrifty.gateway.router import RouteRequest

    router = CascadeRouter([small, large], args.check)
    attempts = runs[0].attempts
    answers = [a.answer() for a in attempts]
    code = [router.code_verdict(RouteRequest(t), ans) for t, ans in zip(texts, answers)]
    conf = [confidence_of(ans) for ans in answers]
    candidates = [0.0, 1.01, *(c + 1e-9 for c in conf if c is not None)] if "logprob" in args.check else [0.0]

    def outcome(t: float):
        return outcomes.score([[small, large] if router.verdict(cv, c, t) else [small]
                               for cv, c in zip(code, conf)])
    return candidates, outcome, args.check


def _store_in_classifier(path: str | None, threshold: float) -> Path:
    from thrifty.gateway.calibration import default_classifier_path
    from thrifty.gateway.difficulty import DifficultyModel

    p = Path(path) if path else default_classifier_path()
    model = DifficultyModel.load(p)
    model.threshold = threshold
    model.save(p)
    return p
