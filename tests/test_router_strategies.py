"""Routing strategies: the classifier's model, calibration, the cascade's confidence, strategy outcomes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from thrifty.config import ConfigError, RouterSettings
from thrifty.errors import ThriftyError
from thrifty.gateway.calibration import calibrate, store_threshold, stored_threshold
from thrifty.gateway.cascade import CascadeRouter
from thrifty.gateway.classifier_router import ClassifierRouter
from thrifty.gateway.difficulty import DifficultyModel, out_of_fold
from thrifty.gateway.router import Answer, FixedRouter, RouteRequest, build_router


class HashEmbedder:
    """Deterministic stand-in for MiniLM: 'hard' texts point one way, 'easy' ones the other."""

    def embed(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            rng = np.random.default_rng(abs(hash(t)) % 2**32)
            v = rng.normal(size=16) * 0.3
            v[0] += 2.0 if "hard" in t else -2.0
            rows.append(v / np.linalg.norm(v))
        return np.array(rows)


def _data(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    texts = [f"{'hard' if rng.random() < 0.4 else 'easy'} problem {i}" for i in range(n)]
    y = np.array([1.0 if "hard" in t else 0.0 for t in texts])
    return texts, y


def test_difficulty_model_learns_and_round_trips(tmp_path):
    texts, y = _data()
    emb, cheap = DifficultyModel.raw_features(texts, HashEmbedder().embed)
    model = DifficultyModel.fit(emb, cheap, y, "hash")
    p = model.predict(emb, cheap)
    assert np.mean((p > 0.5) == (y > 0.5)) == 1.0
    oof = out_of_fold(emb, cheap, y, model.l2, "hash")          # unseen rows: still separable here
    assert np.mean((oof > 0.5) == (y > 0.5)) > 0.9
    model.threshold = 0.3
    model.save(tmp_path / "c.json")
    again = DifficultyModel.load(tmp_path / "c.json")
    assert again.threshold == 0.3 and np.allclose(again.predict(emb, cheap), p)


def test_difficulty_model_refuses_bad_labels_and_files(tmp_path):
    texts, _ = _data(20)
    emb, cheap = DifficultyModel.raw_features(texts, HashEmbedder().embed)
    with pytest.raises(ThriftyError, match="both outcomes"):
        DifficultyModel.fit(emb, cheap, np.zeros(20), "hash")
    with pytest.raises(ThriftyError, match="thrifty router train"):
        DifficultyModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ThriftyError, match="not a router classifier"):
        DifficultyModel.load(tmp_path / "bad.json")


def test_classifier_router_sends_hard_requests_up(tmp_path):
    texts, y = _data()
    emb, cheap = DifficultyModel.raw_features(texts, HashEmbedder().embed)
    DifficultyModel.fit(emb, cheap, y, "hash").save(tmp_path / "c.json")
    settings = RouterSettings(strategy="classifier", classifier_path=str(tmp_path / "c.json"), threshold=0.5)
    router = ClassifierRouter.from_settings(settings, ["small", "large"], embedder=HashEmbedder())
    hard, easy = router.choose(RouteRequest("hard new one")), router.choose(RouteRequest("easy new one"))
    assert hard.tier == "large" and easy.tier == "small"
    assert hard.reason.startswith("classifier p_hard=") and ">0.50" in hard.reason
    assert router.escalate(RouteRequest("x"), Answer("y"), "small") == (False, "classifier")


def test_build_router_checks_settings(tmp_path):
    assert isinstance(build_router(RouterSettings(), ["small", "large"]), FixedRouter)
    assert build_router(RouterSettings(tier="large"), ["small", "large"]).choose(RouteRequest("q")).tier == "large"
    with pytest.raises(ConfigError, match="not a tier"):
        build_router(RouterSettings(tier="medium"), ["small", "large"])
    with pytest.raises(ConfigError, match="at least two tiers"):
        build_router(RouterSettings(strategy="cascade"), ["small"])
    with pytest.raises(ThriftyError, match="no router classifier"):
        build_router(RouterSettings(strategy="classifier", classifier_path=str(tmp_path / "none.json")),
                     ["small", "large"])
    with pytest.raises(ConfigError, match="router.strategy"):
        RouterSettings(strategy="random")


def test_cascade_escalates_on_low_confidence_only_with_logprob_check():
    lo, hi = Answer("Paris.", [math.log(0.3)] * 4), Answer("Paris.", [math.log(0.9)] * 4)
    req = RouteRequest("What is the capital of France?")
    both = CascadeRouter(["small", "large"], "code+logprob", threshold=0.5)
    assert both.escalate(req, lo, "small") == (True, "cascade: confidence 0.30<0.50")
    assert both.escalate(req, hi, "small") == (False, "cascade: check passed")
    assert CascadeRouter(["small", "large"], "code", 0.5).escalate(req, lo, "small")[0] is False
    cut = Answer("Paris is", [math.log(0.9)], finish_reason="length")
    assert both.escalate(req, cut, "small") == (True, "cascade: answer cut at max_tokens")


def test_calibration_picks_the_cheapest_threshold_meeting_the_target(tmp_path):
    # threshold t -> (quality, cost): quality rises and cost rises with t
    table = {0.0: (0.60, 40.0), 0.3: (0.67, 55.0), 0.6: (0.69, 70.0), 1.0: (0.70, 100.0)}
    result = calibrate(list(table), table.__getitem__, large_quality=0.70, large_cost=100.0,
                       target_quality=0.95, problems=10)
    assert result.met and result.threshold == 0.3 and result.relative_cost == pytest.approx(0.55)
    unreachable = calibrate([0.0, 0.3], table.__getitem__, 0.70, 100.0, target_quality=1.2, problems=10)
    assert not unreachable.met and unreachable.threshold == 0.3       # the best quality there is
    path = tmp_path / "cal.json"
    store_threshold(path, "cascade", "code", result)
    assert stored_threshold(path, "cascade", "code") == 0.3
    assert stored_threshold(path, "cascade", "logprob") is None
    settings = RouterSettings(strategy="cascade", check="code", calibration_path=str(path))
    assert CascadeRouter.from_settings(settings, ["small", "large"]).threshold == 0.3


def test_outcomes_score_and_oracle():
    from thrifty.bench.humaneval import Outcomes

    o = Outcomes(["small", "large"],
                 passed=[{"small": True, "large": True}, {"small": False, "large": True},
                         {"small": False, "large": False}],
                 cost=[{"small": 1.0, "large": 3.0}, {"small": 2.0, "large": 5.0}, {"small": 1.0, "large": 4.0}])
    assert o.score([["large"]] * 3) == (pytest.approx(2 / 3), 12.0)
    # a cascade that escalated the last two pays both answers there
    assert o.score([["small"], ["small", "large"], ["small", "large"]]) == (pytest.approx(2 / 3), 1 + 7 + 5)
    assert o.oracle_paths() == [["small"], ["large"], ["small"]]
    assert o.score(o.oracle_paths()) == (pytest.approx(2 / 3), 1 + 5 + 1)
