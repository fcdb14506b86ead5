"""Synthetic response data from known IRT parameters (for tests and the estimator bench)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mergeflow.irt.responses import ResponseMatrix


@dataclass
class SimulatedResponses:
    matrix: ResponseMatrix
    theta: np.ndarray  # (n_models, dim)
    alpha: np.ndarray  # (n_items, dim)
    beta: np.ndarray  # (n_items,)

    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.theta @ self.alpha.T - self.beta)))


def simulate_irt(
    n_models: int,
    n_items: int,
    seed: int = 0,
    dim: int = 1,
    theta: np.ndarray | None = None,
    log_alpha_sd: float = 0.5,
    beta_sd: float = 1.0,
    model_prefix: str = "model",
) -> SimulatedResponses:
    """Responses from logit P = αᵢ·θⱼ − βᵢ with α ~ LogNormal(0, log_alpha_sd) per dimension
    (scaled by 1/√dim), β ~ N(0, beta_sd), θ ~ N(0, I) unless given."""
    rng = np.random.default_rng(seed)
    if theta is None:
        theta = rng.standard_normal((n_models, dim))
    theta = np.asarray(theta, dtype=float).reshape(n_models, dim)
    alpha = np.exp(rng.normal(0.0, log_alpha_sd, (n_items, dim))) / np.sqrt(dim)
    beta = rng.normal(0.0, beta_sd, n_items)
    sim = SimulatedResponses(None, theta, alpha, beta)  # type: ignore[arg-type]
    values = (rng.random((n_models, n_items)) < sim.probabilities()).astype(float)
    models = [f"{model_prefix}{j:04d}" for j in range(n_models)]
    sim.matrix = ResponseMatrix(values, models, list(range(n_items)))
    return sim
