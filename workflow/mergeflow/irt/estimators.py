"""Full-split accuracy from a model's responses on the anchors alone (MERGE³'s Estimate step).

Methods (N items in the split, A anchors with responses yₐ and weights wₐ):

* ``mean``: Σ wₐ yₐ, the anchor-weighted mean.
* ``pirt`` (tinyBenchmarks' p-IRT): fit θ̂ on the anchors (MAP, item parameters fixed), then
  (Σₐ yₐ + Σ_{i not an anchor} P(correctᵢ | θ̂)) / N.
* ``gpirt`` (gp-IRT): λ·mean + (1 − λ)·pirt. λ = b² / (b² + v) minimises the mean squared
  error of the blend when the anchor mean is unbiased with variance v and p-IRT has squared
  bias b²; both are measured on calibration models when those are given, otherwise λ weights
  the two estimators by their predictive precisions. ``lambda_rule="fitted"`` instead picks the
  λ that minimises the blend's error on the calibration models directly (see
  :func:`blend_weight`). The calibration models were part of the IRT fit, so their p-IRT errors
  are somewhat optimistic, which pushes λ towards p-IRT.
* ``mpirt`` (MERGE³): as p-IRT, but θ̂ = θ₀ + Σⱼ λⱼ (θⱼ − θ₀): the endpoint models' abilities
  as directions from an origin θ₀ (the base model's ability when given, else the endpoints'
  mean), with λ fitted by MAP on the anchor responses under a N(1/E, 1) prior per weight. As in
  MERGE³'s code the weights are not confined to the simplex, so a merge better than both parents
  is not capped at the better one's ability; θ is linear in λ, so its Laplace sd stays honest
  where a convex combination's would collapse at the simplex's edge.
* ``gmpirt``: gp-IRT's blend with mp-IRT in place of p-IRT.

Calibration models, when given, are estimated from their own anchor answers too: the IRT
estimate's error variance beyond its predicted sd² there is added to every IRT sd (misfit the
model does not know of), and the blends take λ from both estimators' errors (``lambda_rule``)
and combine their sds with the correlation ρ of those errors (both come from the same anchor
answers). Without calibration λ weights the two by their predictive precisions and ρ = 1, the
conservative bound.

Every estimate carries an sd: the posterior predictive sd of the full-split accuracy, combining
the uncertainty of θ̂ (Laplace), of the item parameters (samples from the variational
posterior), the Bernoulli noise of the items not seen, and the IRT model's own misfit (the
fit's ``accuracy_misfit_sd``: how far its accuracy curve misses the calibration models at their
own θ̂), scaled to the share of items not seen.

An :class:`Estimator` precomputes everything that depends only on (fit, anchors, method); its
``__call__`` costs one small Newton solve and an (S × N) sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from mergeflow.errors import MergeflowError
from mergeflow.irt import ESTIMATORS, LAMBDA_RULES
from mergeflow.irt.anchors import validate_anchors
from mergeflow.irt.fit import IRTFit, item_key, map_ability, sigmoid
from mergeflow.irt.responses import ResponseMatrix

ENDPOINT_WEIGHT_PRIOR_SD = 1.0
MAX_CALIBRATION_MODELS = 100


@dataclass(frozen=True)
class Estimate:
    """An accuracy estimate with its posterior predictive sd (and, for IRT methods, θ̂ and λ)."""

    value: float
    sd: float
    theta: tuple[float, ...] | None = None
    lam: float | None = None


class Estimator:
    """Estimate full-split accuracy from anchor responses; build once, call many times."""

    def __init__(
        self,
        method: str,
        anchors: pd.DataFrame,
        fit: IRTFit | None = None,
        endpoint_thetas=None,
        calibration: ResponseMatrix | None = None,
        lam: float | None = None,
        lambda_rule: str = "variance",
        n_samples: int = 64,
        seed: int = 0,
        prior_sd: float = 1.0,
        origin_theta=None,
    ):
        if method not in ESTIMATORS:
            raise MergeflowError(f"estimator {method!r}: expected one of {ESTIMATORS}")
        validate_anchors(anchors)
        if lam is not None and not 0.0 <= lam <= 1.0:
            raise MergeflowError(f"lam={lam}: must be in [0, 1]")
        if lambda_rule not in LAMBDA_RULES:
            raise MergeflowError(f"lambda_rule={lambda_rule!r}: expected one of {LAMBDA_RULES}")
        self.lambda_rule = lambda_rule
        self.method = method
        self.anchor_ids = [item_key(item) for item in anchors["item_id"].tolist()]
        weights = anchors["weight"].to_numpy(dtype=float)
        self.weights = weights / weights.sum()
        # stratum variances from the anchor selection, where it recorded them
        self.stratum_variance = anchors["variance"].to_numpy(dtype=float) if "variance" in anchors else None
        self.prior_sd = prior_sd
        self.lam = lam
        self.rho = 1.0  # correlation of the blend's two errors: conservative without calibration
        self.excess_variance = 0.0  # IRT error variance the calibration models show beyond the sd
        if method == "mean":
            return
        if fit is None:
            raise MergeflowError(f"estimator {method!r} needs an IRT fit")
        self.fit = fit
        self._prepare_items(fit, n_samples, np.random.default_rng(seed))
        self.endpoints = self.origin = None
        if method in ("mpirt", "gmpirt"):
            self.endpoints = _endpoint_matrix(fit, endpoint_thetas)
            if origin_theta is not None:
                self.origin = _endpoint_matrix(fit, [origin_theta])[0]
        if calibration is not None:
            calibrated, self.rho, self.excess_variance = self._calibrate(calibration, np.random.default_rng(seed))
            self.lam = calibrated if lam is None else lam

    # -- set-up ------------------------------------------------------------------------------

    def _prepare_items(self, fit: IRTFit, n_samples: int, rng: np.random.Generator) -> None:
        anchor_index = fit.item_index(self.anchor_ids)
        unseen = np.ones(fit.n_items, dtype=bool)
        unseen[anchor_index] = False
        alpha, beta = fit.alpha_mean(), fit.beta_mean()
        self.n_items = fit.n_items
        self.anchor_alpha, self.anchor_beta = alpha[anchor_index], beta[anchor_index]
        self.unseen_alpha, self.unseen_beta = alpha[unseen], beta[unseen]
        alpha_draws, beta_draws = fit.sample_items(n_samples, rng)
        self.draw_alpha, self.draw_beta = alpha_draws[:, unseen], beta_draws[:, unseen]
        self.standard_normals = rng.standard_normal((n_samples, fit.dim))
        # fits written before the misfit was recorded carry none
        self.misfit_sd = float(fit.info.get("accuracy_misfit_sd", 0.0)) * unseen.sum() / fit.n_items

    def _calibrate(self, calibration: ResponseMatrix, rng: np.random.Generator) -> tuple[float, float, float]:
        """From both estimators' errors on (up to 100) calibration models: the blend's λ (see
        blend_weight), the correlation ρ of the two errors, and the IRT estimate's error variance
        beyond its predicted sd² (misfit the model does not know of; 0 when the sd covers it)."""
        columns = pd.Index([item_key(item) for item in calibration.items]).get_indexer(self.anchor_ids)
        if (columns < 0).any():
            missing = [item for item, col in zip(self.anchor_ids, columns) if col < 0]
            raise MergeflowError(f"calibration responses lack anchor items {missing[:5]}")
        rows = np.arange(len(calibration.models))
        if rows.size > MAX_CALIBRATION_MODELS:
            rows = np.sort(rng.choice(rows, MAX_CALIBRATION_MODELS, replace=False))
        anchor_errors, irt_errors, irt_variances = [], [], []
        for row in rows:
            y = calibration.matrix[row, columns]
            if np.isnan(y).any():
                continue
            truth = np.nanmean(calibration.matrix[row])
            theta, covariance = self._ability(y)
            anchor_errors.append(self.weights @ y - truth)
            irt_errors.append(self._irt_value(y, theta) - truth)
            irt_variances.append(self._irt_sd(y, theta, covariance) ** 2)
        if not anchor_errors:
            raise MergeflowError("no calibration model answered every anchor item; cannot set λ")
        anchor_errors, irt_errors = np.array(anchor_errors), np.array(irt_errors)
        rho = np.corrcoef(anchor_errors, irt_errors)[0, 1] if len(anchor_errors) > 2 else np.nan
        excess = max(0.0, float(np.mean(irt_errors**2) - np.mean(irt_variances)))
        return (blend_weight(anchor_errors, irt_errors, self.lambda_rule), float(rho) if np.isfinite(rho) else 1.0,
                excess)

    # -- estimation --------------------------------------------------------------------------

    def __call__(self, anchor_responses) -> Estimate:
        y = self.anchor_vector(anchor_responses)
        anchor_value = float(self.weights @ y)
        if self.method == "mean":
            if self.stratum_variance is not None:  # stratified: Σ w² (y − p̄_stratum)²
                return Estimate(anchor_value, float(np.sqrt(np.sum(self.weights**2 * self.stratum_variance))))
            # binomial sd with the effective sample size 1/Σw², at a Jeffreys-smoothed
            # proportion so that all-right or all-wrong anchors do not claim certainty
            squared = float(np.sum(self.weights**2))
            n_effective = 1.0 / squared
            smoothed = (anchor_value * n_effective + 0.5) / (n_effective + 1.0)
            return Estimate(anchor_value, float(np.sqrt(smoothed * (1 - smoothed) * squared)))
        theta, covariance = self._ability(y)
        irt_value = self._irt_value(y, theta)
        irt_sd = float(np.sqrt(self._irt_sd(y, theta, covariance) ** 2 + self.excess_variance))
        if self.method in ("pirt", "mpirt"):
            return Estimate(irt_value, irt_sd, tuple(float(t) for t in theta))
        p_anchor = sigmoid(self.anchor_alpha @ theta - self.anchor_beta)
        anchor_variance = float(np.sum(self.weights**2 * p_anchor * (1 - p_anchor)))
        lam = self.lam
        if lam is None:  # precision weighting of the two estimators
            total = irt_sd**2 + anchor_variance
            lam = irt_sd**2 / total if total > 0 else 0.5
        value = lam * anchor_value + (1 - lam) * irt_value
        covariance = self.rho * np.sqrt(anchor_variance) * irt_sd
        sd = np.sqrt(max(lam**2 * anchor_variance + (1 - lam) ** 2 * irt_sd**2 + 2 * lam * (1 - lam) * covariance, 0.0))
        return Estimate(float(value), float(sd), tuple(float(t) for t in theta), float(lam))

    def anchor_vector(self, anchor_responses) -> np.ndarray:
        """The responses in anchor order as floats; every anchor must have a 0/1 response."""
        lookup = _response_lookup(anchor_responses)
        missing = [item for item in self.anchor_ids if item not in lookup]
        if missing:
            raise MergeflowError(f"no response for anchor items {missing[:5]}")
        y = np.array([lookup[item] for item in self.anchor_ids], dtype=float)
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            item = self.anchor_ids[int(np.flatnonzero(bad)[0])]
            raise MergeflowError(f"response to anchor item {item!r} is {y[bad][0]}, not 0 or 1")
        return y

    def _ability(self, y: np.ndarray, with_covariance: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        if self.endpoints is None:
            return map_ability(self.anchor_alpha, self.anchor_beta, y, self.prior_sd)
        return combine_endpoint_abilities(self.endpoints, self.anchor_alpha, self.anchor_beta, y,
                                          with_covariance, self.origin)

    def _irt_value(self, y: np.ndarray, theta: np.ndarray) -> float:
        unseen = sigmoid(self.unseen_alpha @ theta - self.unseen_beta)
        return float((y.sum() + unseen.sum()) / self.n_items)

    def _irt_sd(self, y: np.ndarray, theta: np.ndarray, covariance: np.ndarray) -> float:
        """Predictive sd over θ (Laplace), item parameters (posterior draws), unseen items' noise
        and the model's misfit."""
        root = np.linalg.cholesky(covariance + 1e-12 * np.eye(covariance.shape[0]))
        thetas = theta + self.standard_normals @ root.T
        if self.draw_alpha.shape[-1] == 1:
            logits = self.draw_alpha[..., 0] * thetas[:, :1]
        else:
            logits = np.einsum("sud,sd->su", self.draw_alpha, thetas)
        p = sigmoid(logits - self.draw_beta)
        accuracy = (y.sum() + p.sum(axis=1)) / self.n_items
        bernoulli = np.mean(np.sum(p * (1 - p), axis=1)) / self.n_items**2
        return float(np.sqrt(np.var(accuracy) + bernoulli + self.misfit_sd**2))


def estimate_accuracy(
    method: str,
    anchors_df: pd.DataFrame,
    anchor_responses,
    fit: IRTFit | None = None,
    endpoint_thetas=None,
    **options,
) -> Estimate:
    """One-off estimate; for many candidates build an :class:`Estimator` once and call it."""
    return Estimator(method, anchors_df, fit, endpoint_thetas, **options)(anchor_responses)


def blend_weight(anchor_errors: np.ndarray, irt_errors: np.ndarray, rule: str = "variance") -> float:
    """λ for λ·anchor-mean + (1 − λ)·IRT from both estimators' errors on calibration models.

    ``variance`` (tinyBenchmarks' heuristic): λ = b² / (b² + v) with b² and v the mean squared
    errors of the IRT and anchor estimators, optimal when the two errors are independent.
    ``fitted``: the λ in [0, 1] that minimises the blend's calibration MSE, which accounts for
    the two errors being correlated (both come from the same anchor responses).
    """
    bias2, variance = np.mean(irt_errors**2), np.mean(anchor_errors**2)
    if rule == "variance":
        return float(bias2 / (bias2 + variance)) if bias2 + variance > 0 else 0.5
    gap = anchor_errors - irt_errors
    denominator = np.sum(gap**2)
    if denominator <= 0:
        return 0.5
    return float(np.clip(-np.sum(irt_errors * gap) / denominator, 0.0, 1.0))


def combine_endpoint_abilities(
    endpoints: np.ndarray, alpha: np.ndarray, beta: np.ndarray, y: np.ndarray,
    with_covariance: bool = True, origin: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """mp-IRT's θ = θ₀ + Σⱼ λⱼ dⱼ with dⱼ = θⱼ − θ₀, λ fitted by MAP.

    ``origin`` θ₀ defaults to the endpoints' mean. The prior λⱼ ~ N(1/E, (s / |dⱼ|)²) centres θ
    on the endpoints' mean with sd s (the population's ability scale) along every direction,
    however close the endpoints are to the origin, so the weights are free to leave the simplex
    as far as the anchors ask. Returns θ and its covariance from the exact Laplace covariance of
    λ (θ is linear in λ).
    """
    n_endpoints = endpoints.shape[0]
    theta0 = endpoints.mean(axis=0) if origin is None else np.asarray(origin, dtype=float)
    directions = endpoints - theta0  # (E, d)
    prior_mean = np.full(n_endpoints, 1.0 / n_endpoints)
    # per-weight prior precision |dⱼ|²/s², floored so that a direction of length 0 stays identified
    precision = np.maximum(np.sum(directions**2, axis=1), 1e-6) / ENDPOINT_WEIGHT_PRIOR_SD**2

    def negative_objective(lam: np.ndarray) -> tuple[float, np.ndarray]:
        z = alpha @ (theta0 + lam @ directions) - beta
        loglik = np.sum(y * z - np.logaddexp(0.0, z))
        gradient = directions @ (alpha.T @ (y - sigmoid(z)))
        offset = lam - prior_mean
        return -(loglik - 0.5 * offset @ (precision * offset)), -(gradient - precision * offset)

    lam = minimize(negative_objective, prior_mean, jac=True, method="L-BFGS-B").x
    theta = theta0 + lam @ directions
    if not with_covariance:
        return theta, None
    p = sigmoid(alpha @ theta - beta)
    projected = alpha @ directions.T  # (A, E)
    hessian = projected.T @ (projected * (p * (1 - p))[:, None]) + np.diag(precision)
    return theta, directions.T @ np.linalg.inv(hessian) @ directions


def _endpoint_matrix(fit: IRTFit, endpoint_thetas) -> np.ndarray:
    """Endpoint abilities as an (E, dim) array from names in the fit, a mapping, or arrays."""
    if endpoint_thetas is None:
        raise MergeflowError("mp-IRT estimators (mpirt, gmpirt) need the endpoint models: name them in the IRT "
                             "fit with `--endpoints NAME ...` (mergeflow estimate), endpoint_thetas (Python)")
    if isinstance(endpoint_thetas, Mapping):
        endpoint_thetas = list(endpoint_thetas.values())
    rows = [fit.theta_of(entry) if isinstance(entry, str) else np.atleast_1d(np.asarray(entry, float))
            for entry in endpoint_thetas]
    if not rows:
        raise MergeflowError("no endpoint models given: `--endpoints` names none (mergeflow estimate), "
                             "endpoint_thetas is empty (Python)")
    thetas = np.vstack(rows)
    if thetas.shape[1] != fit.dim:
        raise MergeflowError(f"endpoint abilities have dimension {thetas.shape[1]}, the fit {fit.dim}")
    return thetas


def _response_lookup(anchor_responses) -> dict:
    if isinstance(anchor_responses, pd.DataFrame):
        if not {"item_id", "correct"} <= set(anchor_responses.columns):
            raise MergeflowError("anchor responses frame needs columns 'item_id' and 'correct'")
        anchor_responses = pd.Series(anchor_responses["correct"].to_numpy(),
                                     index=anchor_responses["item_id"].to_numpy())
    if isinstance(anchor_responses, pd.Series):
        return {item_key(item): value for item, value in anchor_responses.items()}
    if isinstance(anchor_responses, Mapping):
        return {item_key(item): value for item, value in anchor_responses.items()}
    raise MergeflowError(
        f"anchor responses must be a dict, Series or frame, not {type(anchor_responses).__name__}"
    )
