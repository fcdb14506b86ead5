"""Bayesian IRT in Pyro: 1PL, 2PL and multidimensional 2PL, fitted by SVI.

The response of model ``j`` to item ``i`` is Bernoulli with

    logit P(correct) = αᵢ · θⱼ − βᵢ          (tinyBenchmarks' form; θⱼ, αᵢ ∈ R^d)

* ``1pl``: αᵢ = 1, d = 1;
* ``2pl``: αᵢ = exp(log αᵢ) > 0, d = 1;
* ``m2pl``: αᵢ ∈ R^d unconstrained, d ≥ 1.

Priors: θⱼ ~ N(0, I) (fixes location and scale); βᵢ ~ N(μ_β, σ_β); log αᵢ ~ N(μ_logα, σ_logα)
(2PL) or αᵢₖ ~ N(μ_αₖ, σ_αₖ) (m2PL), with hyperpriors μ ~ N(0, 1) or N(0, 2) and
log σ ~ N(0, 1). Every latent is real-valued, so the variational posterior is a mean-field
Normal over all of them (a hand-written guide whose locs and scales are exactly what
``posterior.safetensors`` stores). Missing responses are masked out of the likelihood.

:func:`fit_irt` returns an :class:`~mergeflow.irt.fit.IRTFit`; saving, loading and using a fit
(abilities of new models included) live in :mod:`mergeflow.irt.fit`, which needs no Pyro.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from mergeflow.errors import MergeflowError
from mergeflow.irt import KINDS
from mergeflow.irt.fit import IRTFit, logit, sigmoid
from mergeflow.irt.responses import ResponseMatrix
from mergeflow.progress import Progress

log = logging.getLogger(__name__)

INIT_SCALE = 0.05

# Each hyperparameter site: (prior mean, prior sd).
HYPER_PRIORS = {
    "mu_beta": (0.0, 2.0),
    "log_sigma_beta": (0.0, 1.0),
    "mu_log_alpha": (0.0, 1.0),
    "log_sigma_log_alpha": (-1.0, 1.0),
    "mu_alpha": (0.0, 1.0),
    "log_sigma_alpha": (0.0, 1.0),
}


def fit_irt(
    matrix: ResponseMatrix,
    kind: str = "2pl",
    dim: int = 1,
    steps: int = 1000,
    lr: float = 0.05,
    batch_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    holdout_fraction: float = 0.05,
    min_steps: int = 200,
    tol: float = 1e-4,
    check_every: int = 50,
    log_every: int | None = None,
) -> IRTFit:
    """Fit an IRT model to ``matrix`` by SVI (Adam) and return its variational posterior.

    ``batch_size`` mini-batches over items (None: full batch). A random ``holdout_fraction`` of
    the observed responses is left out of training and scored at the end (held-out
    log-likelihood under the posterior predictive). Training stops after ``steps`` or, after
    ``min_steps``, once the mean loss of the last ``check_every`` steps changed by less than
    ``tol`` (relative) from the window before.
    """
    _check_fit_arguments(matrix, kind, dim, steps, batch_size, holdout_fraction)
    _warn_uninformative(matrix)
    dim = 1 if kind in ("1pl", "2pl") else dim
    rng = np.random.default_rng(seed)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    torch_device = torch.device(device)

    observed = matrix.observed
    holdout = _holdout_mask(observed, holdout_fraction, rng)
    train = observed & ~holdout
    data = _Responses(matrix.matrix, train, torch_device)
    init = _initial_values(matrix.matrix, train, kind, dim, rng)
    irt = _PyroIRT(kind, dim, len(matrix.models), len(matrix.items), batch_size, init, torch_device)

    svi = SVI(irt.model, irt.guide, Adam({"lr": lr}), loss=Trace_ELBO())
    trace: list[float] = []
    converged = False
    started = time.perf_counter()
    meter = Progress(f"IRT fit ({kind}, {dim}-d)", steps, "step")
    for step in range(steps):
        with pyro.validation_enabled(False):
            loss = svi.step(data)
        trace.append(loss / max(int(train.sum()), 1))
        meter.update(postfix=f"loss/response {trace[-1]:.4f}")
        if log_every and step % log_every == 0:
            print(f"step {step}: loss/response {trace[-1]:.5f}", flush=True)
        if step + 1 >= max(min_steps, 2 * check_every) and (step + 1) % check_every == 0:
            recent = np.mean(trace[-check_every:])
            before = np.mean(trace[-2 * check_every:-check_every])
            if abs(before - recent) <= tol * abs(before):
                converged = True
                break
    # the wall time goes to the log, not into fit.json: the same fit must give the same files
    log.info("IRT fit: %d steps (%s) in %.1fs", len(trace), "converged" if converged else "not converged",
             time.perf_counter() - started)

    params = {name: value.detach().cpu().numpy().astype(np.float64)
              for name, value in irt.posterior().items()}
    fit = IRTFit(kind, dim, list(matrix.items), list(matrix.models), params)
    fit.info = {
        "elbo_trace": [-loss for loss in trace],
        "elbo_unit": "per training response",
        "steps": len(trace),
        "converged": converged,
        "tol": tol,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "device": device,
        "n_models": len(matrix.models),
        "n_train_responses": int(train.sum()),
        "n_heldout_responses": int(holdout.sum()),
        "heldout_loglik": _heldout_loglik(fit, matrix.matrix, holdout, rng),
        "accuracy_misfit_sd": accuracy_misfit_sd(fit, matrix),
        "threshold": matrix.threshold,
        "posterior": {
            "family": "mean-field Normal over every latent site (unconstrained space); "
                      "posterior.safetensors holds '<site>.loc' and '<site>.scale'",
            "sites": {name: list(value.shape) for name, value in params.items()
                      if name.endswith(".loc")},
            "alpha": {"1pl": "fixed at 1", "2pl": "alpha = exp(log_alpha)",
                      "m2pl": "alpha per dimension"}[kind],
            "likelihood": "logit P(correct) = alpha . theta - beta",
        },
    }
    return fit


def accuracy_misfit_sd(fit: IRTFit, matrix: ResponseMatrix) -> float:
    """How far the fit's accuracy curve misses the calibration models' accuracies at their own θ.

    For each model, the residual observed accuracy − mean P(correctᵢ | θ̂) over the items it
    answered holds the model's misfit plus the Bernoulli noise of its items; the noise's expected
    square is subtracted. What is left (as an sd) is the error a full-split estimate carries even
    when θ is known exactly, which the estimators add to their predictive sd. In-sample: a
    slight underestimate for models outside the calibration set.
    """
    p = sigmoid(fit.theta_mean() @ fit.alpha_mean().T - fit.beta_mean())
    observed = matrix.observed
    squares = []
    for row in range(len(matrix.models)):
        seen = observed[row]
        if not seen.any():
            continue
        q = p[row, seen]
        residual = np.mean(matrix.matrix[row, seen]) - np.mean(q)
        squares.append(residual**2 - np.sum(q * (1 - q)) / seen.sum() ** 2)
    return float(np.sqrt(max(float(np.mean(squares)), 0.0))) if squares else 0.0


def _check_fit_arguments(matrix: ResponseMatrix, kind: str, dim: int, steps: int,
                         batch_size: int | None, holdout_fraction: float) -> None:
    if kind not in KINDS:
        raise MergeflowError(f"kind={kind!r}: expected one of {KINDS}")
    if dim < 1:
        raise MergeflowError(f"dim={dim}: must be at least 1")
    if steps < 1:
        raise MergeflowError(f"steps={steps}: must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise MergeflowError(f"batch_size={batch_size}: must be positive or None")
    if not 0.0 <= holdout_fraction < 1.0:
        raise MergeflowError(f"holdout_fraction={holdout_fraction}: must be in [0, 1)")
    if len(matrix.models) < 2 or len(matrix.items) < 2:
        raise MergeflowError(
            f"an IRT fit needs at least 2 models and 2 items, got {matrix.matrix.shape}"
        )
    values = matrix.matrix[matrix.observed]
    if not np.isin(values, (0.0, 1.0)).all():
        raise MergeflowError("the response matrix is not binary; load it with load_response_matrix")


def _warn_uninformative(matrix: ResponseMatrix) -> None:
    """Warn when no item tells the models apart (every model answers each item alike, e.g. an
    all-correct matrix): the fit then runs, but its abilities and difficulties are the priors'."""
    values = np.where(matrix.observed, matrix.matrix, np.nan)
    with np.errstate(invalid="ignore"):
        low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    if np.all(low == high):
        correct = int(np.sum(high == 1.0))
        log.warning("every item is answered alike by all %d models (%d items all correct, %d all wrong): the IRT "
                    "fit cannot tell models or items apart, and estimates from it carry no information; add "
                    "models that differ (irt.calibration) or harder items", len(matrix.models), correct,
                    len(matrix.items) - correct)


def _holdout_mask(observed: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    holdout = np.zeros_like(observed)
    if fraction <= 0:
        return holdout
    rows, cols = np.nonzero(observed)
    chosen = rng.choice(rows.size, size=int(round(fraction * rows.size)), replace=False)
    holdout[rows[chosen], cols[chosen]] = True
    return holdout


def _initial_values(values: np.ndarray, train: np.ndarray, kind: str, dim: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Data-driven starting locs: abilities from model accuracy, difficulties from item accuracy."""
    counts_models = np.maximum(train.sum(axis=1), 1)
    counts_items = np.maximum(train.sum(axis=0), 1)
    correct = np.where(train, values, 0.0)
    model_accuracy = (correct.sum(axis=1) + 0.5) / (counts_models + 1)
    item_accuracy = (correct.sum(axis=0) + 0.5) / (counts_items + 1)
    theta_first = logit(model_accuracy)
    theta_first = (theta_first - theta_first.mean()) / (theta_first.std() + 1e-6)
    theta = 0.1 * rng.standard_normal((values.shape[0], dim))
    theta[:, 0] = theta_first
    beta = -logit(np.clip(item_accuracy, 0.02, 0.98))
    init = {"theta": theta, "beta": beta,
            "mu_beta": np.array(beta.mean()), "log_sigma_beta": np.array(np.log(beta.std() + 1e-3))}
    if kind == "2pl":
        init.update(log_alpha=np.zeros(values.shape[1]), mu_log_alpha=np.array(0.0),
                    log_sigma_log_alpha=np.array(-1.0))
    elif kind == "m2pl":
        alpha = 0.1 * rng.standard_normal((values.shape[1], dim))
        alpha[:, 0] += 1.0
        init.update(alpha=alpha, mu_alpha=np.eye(dim)[0], log_sigma_alpha=np.zeros(dim))
    return init


class _Responses:
    """Training responses laid out for a fast masked Bernoulli log-likelihood.

    For observed cells the Bernoulli log-pmf with logit z is ``y·z − softplus(z)``; missing and
    held-out cells contribute nothing (mask semantics). The linear term reduces to matrix-vector
    products, so only ``softplus`` touches every cell: one fused pass instead of the several
    that ``Bernoulli.log_prob`` + masking take, which is what makes 12M responses fit in minutes
    on a CPU. The result is per item, entering the model through ``pyro.factor`` inside the
    items plate, so mini-batches are rescaled by the plate like any observation.
    """

    def __init__(self, values: np.ndarray, train: np.ndarray, device: torch.device):
        self.mask = torch.as_tensor(train, dtype=torch.float32, device=device)
        self.all_observed = bool(train.all())
        correct = np.where(train, np.nan_to_num(values, nan=0.0), 0.0)
        self.correct = torch.as_tensor(correct, dtype=torch.float32, device=device)
        self.correct_per_item = self.correct.sum(0)

    def item_loglik(self, theta: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                    columns: torch.Tensor | None) -> torch.Tensor:
        """Σ over models of the masked log-likelihood, one value per item in ``columns``."""
        correct, mask, correct_per_item = self.correct, self.mask, self.correct_per_item
        if columns is not None:
            correct, mask = correct[:, columns], mask[:, columns]
            correct_per_item = correct_per_item[columns]
        logits = torch.addmm(-beta, theta, alpha.T)
        softplus = torch.nn.functional.softplus(logits)
        if not self.all_observed:
            softplus = softplus * mask
        linear = (alpha * (correct.T @ theta)).sum(-1) - beta * correct_per_item
        return linear - softplus.sum(0)


class _PyroIRT:
    """The Pyro model and its mean-field Normal guide for one fit."""

    def __init__(self, kind: str, dim: int, n_models: int, n_items: int,
                 batch_size: int | None, init: dict[str, np.ndarray], device: torch.device):
        self.kind, self.dim = kind, dim
        self.n_models, self.n_items = n_models, n_items
        self.batch_size = batch_size if batch_size and batch_size < n_items else None
        self.init = {name: torch.as_tensor(value, dtype=torch.float32, device=device)
                     for name, value in init.items()}
        self.device = device

    def sites(self) -> list[str]:
        hyper = ["mu_beta", "log_sigma_beta"]
        if self.kind == "2pl":
            return ["theta", "beta", "log_alpha", *hyper, "mu_log_alpha", "log_sigma_log_alpha"]
        if self.kind == "m2pl":
            return ["theta", "beta", "alpha", *hyper, "mu_alpha", "log_sigma_alpha"]
        return ["theta", "beta", *hyper]

    def _prior(self, name: str, shape: Sequence[int]) -> dist.Distribution:
        loc, scale = HYPER_PRIORS[name]
        base = dist.Normal(torch.tensor(loc, device=self.device),
                           torch.tensor(scale, device=self.device))
        return base.expand(shape).to_event(len(shape)) if shape else base

    def model(self, data: "_Responses") -> None:
        mu_beta = pyro.sample("mu_beta", self._prior("mu_beta", ()))
        sigma_beta = pyro.sample("log_sigma_beta", self._prior("log_sigma_beta", ())).exp()
        if self.kind == "2pl":
            mu_la = pyro.sample("mu_log_alpha", self._prior("mu_log_alpha", ()))
            sigma_la = pyro.sample("log_sigma_log_alpha", self._prior("log_sigma_log_alpha", ())).exp()
        elif self.kind == "m2pl":
            mu_a = pyro.sample("mu_alpha", self._prior("mu_alpha", (self.dim,)))
            sigma_a = pyro.sample("log_sigma_alpha", self._prior("log_sigma_alpha", (self.dim,))).exp()
        zeros = torch.zeros(self.n_models, self.dim, device=self.device)
        theta = pyro.sample("theta", dist.Normal(zeros, 1.0).to_event(2))

        with pyro.plate("items", self.n_items, subsample_size=self.batch_size, dim=-1,
                        device=self.device) as idx:
            beta = pyro.sample("beta", dist.Normal(mu_beta, sigma_beta))
            if self.kind == "2pl":
                alpha = pyro.sample("log_alpha", dist.Normal(mu_la, sigma_la)).exp().unsqueeze(-1)
            elif self.kind == "m2pl":
                alpha = pyro.sample("alpha", dist.Normal(mu_a, sigma_a).to_event(1))
            else:
                alpha = torch.ones(beta.shape[0], 1, device=self.device)
            columns = None if self.batch_size is None else idx
            pyro.factor("obs", data.item_loglik(theta, alpha, beta, columns))

    def _param(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.init[name]
        loc = pyro.param(f"{name}.loc", start.clone())
        scale = pyro.param(f"{name}.scale", torch.full_like(start, INIT_SCALE),
                           constraint=dist.constraints.positive)
        return loc, scale

    def guide(self, data: "_Responses") -> None:
        for name in self.sites():
            if name in ("theta", "beta", "log_alpha", "alpha"):
                continue
            loc, scale = self._param(name)
            event = loc.dim()
            base = dist.Normal(loc, scale)
            pyro.sample(name, base.to_event(event) if event else base)
        loc, scale = self._param("theta")
        pyro.sample("theta", dist.Normal(loc, scale).to_event(2))
        item_params = {name: self._param(name) for name in ("beta", "log_alpha", "alpha")
                       if name in self.sites()}
        with pyro.plate("items", self.n_items, subsample_size=self.batch_size, dim=-1,
                        device=self.device) as idx:
            for name, (loc, scale) in item_params.items():
                site = dist.Normal(loc[idx], scale[idx])
                pyro.sample(name, site.to_event(1) if name == "alpha" else site)

    def posterior(self) -> dict[str, torch.Tensor]:
        store = pyro.get_param_store()
        return {f"{name}.{part}": store[f"{name}.{part}"]
                for name in self.sites() for part in ("loc", "scale")}


def _heldout_loglik(fit: IRTFit, values: np.ndarray, holdout: np.ndarray,
                    rng: np.random.Generator, n_samples: int = 32) -> float | None:
    """Mean log posterior-predictive probability of the held-out responses."""
    rows, cols = np.nonzero(holdout)
    if rows.size == 0:
        return None
    theta_loc, theta_scale = fit.params["theta.loc"], fit.params["theta.scale"]
    alpha, beta = fit.sample_items(n_samples, rng)
    probability = np.zeros(rows.size)
    for s in range(n_samples):
        theta = theta_loc[rows] + theta_scale[rows] * rng.standard_normal((rows.size, fit.dim))
        probability += sigmoid((alpha[s, cols] * theta).sum(-1) - beta[s, cols])
    probability = np.clip(probability / n_samples, 1e-9, 1 - 1e-9)
    y = values[rows, cols]
    return float(np.mean(y * np.log(probability) + (1 - y) * np.log1p(-probability)))
