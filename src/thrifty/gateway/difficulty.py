"""The classifier router's model: P(the cheapest tier fails this request), from the request text alone.

Features: the MiniLM sentence embedding (384 numbers) and a few cheap counts (length, lines, examples
in the prompt), standardised. The model is an L2-regularised logistic regression fitted by Newton's method
in numpy (a hundred labelled requests is too little for anything bigger); the regularisation strength
is picked by cross-validated log loss. It is saved as one small JSON file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thrifty.errors import ThriftyError
from thrifty.gateway.code_check import prompt_examples

FORMAT = "thrifty-difficulty-v1"
L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def cheap_features(text: str) -> np.ndarray:
    return np.array([math.log1p(len(text)), math.log1p(text.count("\n")), math.log1p(len(text.split())),
                     float(len(prompt_examples(text)))], dtype=np.float64)


@dataclass(slots=True)
class DifficultyModel:
    weights: np.ndarray           # (d,) over [embedding, standardised cheap features]
    bias: float
    cheap_mean: np.ndarray
    cheap_std: np.ndarray
    embedder: str
    l2: float
    trained_on: int               # labelled requests
    threshold: float | None = None   # set by `thrifty router calibrate`

    # ---- features ----------------------------------------------------------------------------------
    @staticmethod
    def raw_features(texts: list[str], embed) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (n, 384), cheap features (n, 4)); `embed(texts) -> (n, dim)` array."""
        return np.asarray(embed(texts), dtype=np.float64), np.stack([cheap_features(t) for t in texts])

    def _design(self, emb: np.ndarray, cheap: np.ndarray) -> np.ndarray:
        return np.concatenate([emb, (cheap - self.cheap_mean) / self.cheap_std], axis=1)

    def predict(self, emb: np.ndarray, cheap: np.ndarray) -> np.ndarray:
        """P(the cheap tier fails) per row."""
        return _sigmoid(self._design(emb, cheap) @ self.weights + self.bias)

    # ---- training ----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, emb: np.ndarray, cheap: np.ndarray, y: np.ndarray, embedder: str,
            l2: float | None = None, seed: int = 0) -> DifficultyModel:
        """Fit on labels y (1: the cheap tier failed); l2 None: chosen by 5-fold cross-validation."""
        y = np.asarray(y, dtype=np.float64)
        if len(y) < 4 or y.min() == y.max():
            raise ThriftyError(f"cannot train a router on {len(y)} labels with {int(y.sum())} failures",
                               "label more problems (both outcomes must occur)")
        if l2 is None:
            l2 = min(L2_GRID, key=lambda lam: _cv_log_loss(emb, cheap, y, lam, seed, embedder))
        mean, std = cheap.mean(axis=0), cheap.std(axis=0) + 1e-9
        model = cls(np.zeros(emb.shape[1] + cheap.shape[1]), 0.0, mean, std, embedder, float(l2), len(y))
        model.weights, model.bias = _newton(model._design(emb, cheap), y, l2)
        return model

    # ---- file --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from thrifty.paths import atomic_write

        data = {"format": FORMAT, "weights": self.weights.tolist(), "bias": self.bias,
                "cheap_mean": self.cheap_mean.tolist(), "cheap_std": self.cheap_std.tolist(),
                "embedder": self.embedder, "l2": self.l2, "trained_on": self.trained_on, "threshold": self.threshold}
        with atomic_write(Path(path)) as f:
            f.write(json.dumps(data).encode())

    @classmethod
    def load(cls, path: str | Path) -> DifficultyModel:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            return cls(np.array(data["weights"]), float(data["bias"]), np.array(data["cheap_mean"]),
                       np.array(data["cheap_std"]), data["embedder"], float(data["l2"]), int(data["trained_on"]),
                       data.get("threshold"))
        except FileNotFoundError:
            raise ThriftyError(f"no router classifier at {path}",
                               "train one: `thrifty router label` then `thrifty router train`") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ThriftyError(f"{path} is not a router classifier: {e}", "train it again") from None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _newton(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 50) -> tuple[np.ndarray, float]:
    """Minimise mean log loss + l2/(2n) |w|^2 (bias not penalised) by Newton's method."""
    n, d = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(steps):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (p - y) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def folds(n: int, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def out_of_fold(emb: np.ndarray, cheap: np.ndarray, y: np.ndarray, l2: float, embedder: str,
                seed: int = 0) -> np.ndarray:
    """Each row's prediction from a model that did not see it (for honest calibration on training data)."""
    p = np.zeros(len(y))
    for test in folds(len(y), seed=seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        if y[train].min() == y[train].max():
            p[test] = y[train].mean()
            continue
        m = DifficultyModel.fit(emb[train], cheap[train], y[train], embedder, l2=l2)
        p[test] = m.predict(emb[test], cheap[test])
    return p


def _cv_log_loss(emb, cheap, y, l2, seed, embedder) -> float:
    p = np.clip(out_of_fold(emb, cheap, y, l2, embedder, seed), 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
