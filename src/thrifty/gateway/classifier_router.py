"""The `classifier` strategy: a light model predicts whether the cheapest tier would fail; if so, the request
goes one tier up. No request pays for two answers, unlike the cascade; it is only as good as its model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thrifty.config import RouterSettings
from thrifty.gateway.calibration import DEFAULT_THRESHOLD, default_classifier_path
from thrifty.gateway.difficulty import DifficultyModel
from thrifty.gateway.router import Answer, Route, RouteRequest


@dataclass(slots=True)
class ClassifierRouter:
    tiers: list[str]
    model: DifficultyModel
    embedder: Any                      # thrifty.models.embedder.Embedder (anything with embed(texts))
    threshold: float
    strategy: str = "classifier"

    @classmethod
    def from_settings(cls, settings: RouterSettings, tiers: list[str], embedder: Any = None) -> ClassifierRouter:
        model = DifficultyModel.load(settings.classifier_path or default_classifier_path())
        if embedder is None:
            from thrifty.models.embedder import Embedder

            embedder = Embedder.from_zoo(model.embedder)
        threshold = settings.threshold if settings.threshold is not None else (
            model.threshold if model.threshold is not None else DEFAULT_THRESHOLD)
        return cls(tiers, model, embedder, threshold)

    def p_hard(self, texts: list[str]) -> list[float]:
        emb, cheap = DifficultyModel.raw_features(texts, self.embedder.embed)
        return self.model.predict(emb, cheap).tolist()

    def choose(self, request: RouteRequest) -> Route:
        p = self.p_hard([request.text])[0]
        if p > self.threshold:
            return Route(self.tiers[1], f"classifier p_hard={p:.2f}>{self.threshold:.2f}")
        return Route(self.tiers[0], f"classifier p_hard={p:.2f}<={self.threshold:.2f}")

    def escalate(self, request: RouteRequest, answer: Answer, tier: str) -> tuple[bool, str]:
        return False, "classifier"
