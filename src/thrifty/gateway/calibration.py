"""`thrifty router calibrate`: the one threshold that trades cost for quality, and where it is kept.

Given labelled outcomes (which tier passes each request, what each costs) and a strategy's decision as a
function of the threshold, pick the cheapest threshold whose pass rate reaches `target_quality` x the
largest tier's pass rate. The chosen values live in one small JSON file under $THRIFTY_HOME/router/, keyed
by strategy (and cascade check), and a router uses them when the config gives no threshold.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from thrifty.errors import ThriftyError
from thrifty.paths import atomic_write, home

DEFAULT_THRESHOLD = 0.5


def router_dir() -> Path:
    return home() / "router"


def default_classifier_path() -> Path:
    return router_dir() / "classifier.json"


def default_calibration_path() -> Path:
    return router_dir() / "calibration.json"


def key(strategy: str, check: str | None = None) -> str:
    return f"{strategy}:{check}" if strategy == "cascade" else strategy


def stored_threshold(path: str | Path | None, strategy: str, check: str | None = None) -> float | None:
    p = Path(path) if path else default_calibration_path()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ThriftyError(f"{p} is not a router calibration file: {e}", "run `thrifty router calibrate` again")
    entry = data.get(key(strategy, check))
    return float(entry["threshold"]) if entry else None


def store_threshold(path: str | Path | None, strategy: str, check: str | None, result: Calibration) -> Path:
    p = Path(path) if path else default_calibration_path()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        data = {}
    data[key(strategy, check)] = {"threshold": result.threshold, "quality": result.quality,
                                  "relative_quality": result.relative_quality, "relative_cost": result.relative_cost,
                                  "target_quality": result.target_quality, "problems": result.problems}
    with atomic_write(p) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())
    return p


@dataclass(slots=True)
class Calibration:
    threshold: float
    quality: float             # pass rate at the threshold
    relative_quality: float    # / the largest tier's pass rate
    relative_cost: float       # / the largest tier's cost
    target_quality: float
    met: bool                  # False: no threshold reached the target; the best quality one is returned
    problems: int


def calibrate(candidates: list[float], outcome: Callable[[float], tuple[float, float]], large_quality: float,
              large_cost: float, target_quality: float, problems: int) -> Calibration:
    """`outcome(threshold) -> (pass rate, cost)`; the cheapest candidate that meets the target."""
    if not candidates:
        raise ThriftyError("no thresholds to calibrate over")
    scored = [(t, *outcome(t)) for t in sorted(set(candidates))]
    need = target_quality * large_quality
    ok = [s for s in scored if s[1] >= need - 1e-12]
    met = bool(ok)
    t, q, c = min(ok, key=lambda s: (s[2], -s[1])) if ok else max(scored, key=lambda s: (s[1], -s[2]))
    return Calibration(t, q, q / large_quality if large_quality else 0.0, c / large_cost if large_cost else 0.0,
                       target_quality, met, problems)
